"""A task that pickles on the client but cannot be pickled again by the scheduler.

dsched pickles each task once, at graph intake (``dsched.graph.intake``): the graph errs with
the pickler's own exception (what ``distributed.protocol.pickle.dumps`` raises), the client
raises it from the future, and everything else carries on.

Dask pickles a task when it dispatches it, inside the write of the worker's whole batch: the
write fails ("Failed to Serialize", "Error in batched write"), the scheduler aborts the
stream, the worker shuts down for good ("worker-handle-scheduler-connection-broken", its
nanny with it), and the task goes to the next worker. Measured with 2026.8.0 and two
workers: both were lost, and neither the bad task nor a good one submitted right after it
ever finished (the client waited until its timeout). That is not a behaviour to copy, so
this test runs against dsched only.
"""

from __future__ import annotations

from typing import Any

import pytest
from distributed import Client

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]


class PicklesOnce:
    """Pickles on the client; the copy unpickled on the scheduler refuses to pickle again."""

    def __init__(self, unpickled: bool = False) -> None:
        self.unpickled = unpickled

    def __reduce__(self) -> tuple[Any, ...]:
        if self.unpickled:
            raise TypeError("PicklesOnce: this copy was unpickled and refuses to pickle again")
        return (PicklesOnce, (True,))


def one(_: object) -> int:
    return 1


def test_task_that_cannot_be_pickled_again_errs_with_the_picklers_exception(
    client: Client, scheduler_kind: str
) -> None:
    if scheduler_kind != "dsched":
        pytest.skip("Dask loses every worker and the client hangs (see the module docstring)")
    bad = client.submit(one, PicklesOnce(), key="repickle-bad")
    with pytest.raises(TypeError, match="this copy was unpickled and refuses to pickle again"):
        bad.result(timeout=30)
    assert bad.status == "error"
    # Nothing else is affected: the workers are still there and run the next graph.
    assert client.submit(one, 2, key="repickle-good").result(timeout=30) == 1
    assert len(client.nthreads()) == 2
