"""Code clients send to run in the scheduler process: ``run_function``
(``Client.run_on_scheduler``) and ``feed`` (``distributed.progress`` and other diagnostics).

Theory of operation
-------------------
Both run pickled callables against the ``SchedulerFacade`` (``facade.py``), which stands
in for Dask's ``Scheduler`` object.

* ``run_function(function, args, kwargs, wait)`` is Dask's (scheduler.py ``run_function``):
  it logs a ``run-function`` event on topic ``all`` and hands over to
  ``distributed.worker.run`` itself, which unpickles, passes ``dask_scheduler=`` when the
  function takes it, awaits coroutine functions (or runs them in the background with
  ``wait=False``) and replies ``{"status": "OK", "result": to_serialize(result)}`` or
  ``error_message(exc)``; the codec encodes distributed's ``Serialize`` wrappers.
* ``feed(function, setup, teardown, interval)`` is Dask's ``Scheduler.feed``: ``state =
  setup(scheduler)`` (awaited if awaitable), then every ``interval`` the comm gets
  ``function(scheduler[, state])``, until the peer closes the comm or the scheduler stops;
  ``teardown(scheduler, state)`` runs at the end. The comm belongs to the feed from then
  on (``TAKEN_OVER``). Waiting between writes is a sleep bounded by the interval, raced
  against the comm closing, so a closed peer ends the feed at once.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import pickle
from typing import Any

from dask.utils import parse_timedelta

from dsched.comm import CommClosedError
from dsched.comm.tcp import Comm
from dsched.server.ops import TAKEN_OVER, RpcOp
from dsched.server.plugins import Plugins

logger = logging.getLogger("dsched.scheduler")


class RemoteCode:
    """The op provider of ``run_function`` and ``feed``."""

    def __init__(self, plugins: Plugins, stopped: asyncio.Event) -> None:
        self.plugins = plugins
        self.stopped = stopped

    def rpc_ops(self) -> dict[str, RpcOp]:
        return {"run_function": self.run_function, "feed": self.feed}

    async def run_function(self, comm: Comm, args: dict[str, Any]) -> Any:
        from distributed.worker import run

        function = args.get("function")
        self.plugins.log_event("all", {"action": "run-function", "function": function})
        return await run(  # type: ignore[no-untyped-call]
            self.plugins.facade,
            comm,
            function=function,
            args=args.get("args") or (),
            kwargs=args.get("kwargs") or None,
            wait=args.get("wait", True),
        )

    async def feed(self, comm: Comm, args: dict[str, Any]) -> Any:
        interval = float(parse_timedelta(args.get("interval", "1s")))
        function = _unpickle(args.get("function"))
        setup = _unpickle(args.get("setup"))
        teardown = _unpickle(args.get("teardown"))
        scheduler = self.plugins.facade
        state = setup(scheduler) if setup else None
        if inspect.isawaitable(state):
            state = await state
        lost = asyncio.ensure_future(comm.wait_lost())
        try:
            while not self.stopped.is_set() and function is not None:
                response = function(scheduler) if state is None else function(scheduler, state)
                comm.write(response)
                await asyncio.wait({lost}, timeout=interval)
                if lost.done():
                    break
        except (OSError, CommClosedError):
            pass
        finally:
            lost.cancel()
            if teardown:
                teardown(scheduler, state)
        return TAKEN_OVER


def _unpickle(payload: Any) -> Any:
    if not payload:
        return None
    return pickle.loads(payload)
