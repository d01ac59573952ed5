"""``dsched.LocalCluster``: ``distributed.LocalCluster`` with a dsched scheduler.

Theory of operation
-------------------
``distributed.LocalCluster`` is a ``SpecCluster`` whose scheduler spec is
``{"cls": distributed.Scheduler, "options": {host, port, security, protocol, dashboard,
dashboard_address, ...}}``, built in its constructor, which then starts the cluster
(``SpecCluster._start``) unless it runs on an event loop already. This subclass keeps the
constructor, the worker specs and every method (scale, adapt, close, the context
managers, ``Client(cluster)``), and swaps the scheduler class for
``dsched.deploy.Scheduler`` at the one moment it matters: at the start of ``_start``,
before the spec is instantiated. The options pass through unchanged: the deploy
scheduler takes distributed.Scheduler's keywords.

``processes=False`` (or a ``worker_class`` that is not a Nanny): the workers run in this
process, as in Dask, but the scheduler does not, so ``inproc://`` (which Dask picks then
when no port is given) cannot reach it: the protocol defaults to ``tcp://`` on
127.0.0.1 instead, and asking for ``inproc://`` is a ``ValueError`` that says so.
"""

from __future__ import annotations

import inspect
from typing import Any

import distributed
from distributed import Nanny

from dsched.deploy.scheduler import Scheduler

_LOCAL_CLUSTER_SIGNATURE = inspect.signature(distributed.LocalCluster.__init__)


def _workers_in_process(arguments: dict[str, Any]) -> bool:
    """Dask's rule (distributed/deploy/local.py) for whether workers are processes."""
    processes = arguments.get("processes")
    if processes is not None:
        return not processes
    worker_class = arguments.get("worker_class")
    return worker_class is not None and not issubclass(worker_class, Nanny)


class LocalCluster(distributed.LocalCluster):
    """``distributed.LocalCluster``, same constructor and behaviour, whose scheduler is a
    dsched scheduler process (``dsched.deploy.Scheduler``)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        bound = _LOCAL_CLUSTER_SIGNATURE.bind(self, *args, **kwargs)
        arguments = bound.arguments
        protocol = arguments.get("protocol")
        host = arguments.get("host") or ""
        if protocol is not None and str(protocol).startswith("inproc"):
            raise ValueError(
                "dsched.LocalCluster: the dsched scheduler runs in its own process, which "
                "inproc:// cannot reach; use protocol='tcp://' (the default) or 'tls://'"
            )
        if protocol is None and "://" not in host and _workers_in_process(arguments):
            # Dask would pick inproc:// here (no scheduler port): see the module docstring.
            security = arguments.get("security")
            encrypted = getattr(security, "require_encryption", False) or security is True
            arguments["protocol"] = "tls://" if encrypted else "tcp://"
        super().__init__(*bound.args[1:], **bound.kwargs)  # type: ignore[no-untyped-call]

    async def _start(self) -> None:
        spec = self.scheduler_spec
        if self.scheduler is None and spec is not None and spec.get("cls") is distributed.Scheduler:
            self.scheduler_spec = {**spec, "cls": Scheduler}
        await super()._start()  # type: ignore[no-untyped-call]
