"""The goal1 dask policy without the deeper stealing (hungry = one task per thread)."""

from dsched.policy.common import BasePolicy, WorkerInfo
from dsched.policy.dask_like import DaskPolicy as _New


class DaskPolicy(_New):
    def hungry(self, worker: WorkerInfo) -> bool:
        return BasePolicy.hungry(self, worker)
