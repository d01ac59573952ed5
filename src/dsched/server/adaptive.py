"""The adaptive-scaling RPCs: ``adaptive_target``, ``workers_to_close`` and ``check_idle``.

Theory of operation
-------------------
The computations are the pure functions of ``dsched.ext.adaptive``; this op provider only
feeds them what lives in the shell: the Dask configuration (``distributed.adaptive.
target-duration``, ``distributed.scheduler.unknown-task-duration``, read per call as
Dask does), the clock, and user code, which sees workers as the facade's ``WorkerView``
(what Dask's code gets as a ``WorkerState``): the scheduler plugins'
``valid_workers_downscaling`` filter, the pickled ``key`` that groups workers, and the
``attribute`` read from each chosen worker. The HTTP routes (``/api/v1/adaptive_target``,
``/api/v1/check_idle``, ``/api/v1/retire_workers``) call the same methods, so both share
one ``IdleClock``, as Dask's routes and RPCs share ``idle_since``.
"""

from __future__ import annotations

import pickle
import time
from collections.abc import Callable, Hashable
from typing import TYPE_CHECKING, Any

import dask
from dask.utils import parse_timedelta

from dsched.ext import adaptive
from dsched.server.facade import WorkerView
from dsched.server.ops import RpcOp, call

if TYPE_CHECKING:
    from dsched.server.plugins import Plugins
    from dsched.state.machine import SchedulerState
    from dsched.state.records import WorkerState


class AdaptiveOps:
    def __init__(self, state: SchedulerState, plugins: Plugins, started: float) -> None:
        self.state = state
        self.plugins = plugins
        self.idle_clock = adaptive.IdleClock(state, started)

    def rpc_ops(self) -> dict[str, RpcOp]:
        return {
            "adaptive_target": call(self.adaptive_target),
            "workers_to_close": call(self.workers_to_close),
            "check_idle": call(self.check_idle),
        }

    def _allowed(self, workers: list[WorkerState]) -> list[WorkerState]:
        """The plugins' ``valid_workers_downscaling``, on views, back to records."""
        views = self.plugins.valid_workers_downscaling([WorkerView(ws) for ws in workers])
        return [view._record for view in views]

    def adaptive_target(self, target_duration: float | str | None = None) -> int:
        # distributed's defaults, for a process that has not imported distributed yet.
        if target_duration is None:
            target_duration = dask.config.get("distributed.adaptive.target-duration", "5s")
        task_duration = dask.config.get("distributed.scheduler.unknown-task-duration", "500ms")
        return adaptive.adaptive_target(
            self.state,
            target_duration=float(parse_timedelta(target_duration)),
            task_duration=float(parse_timedelta(task_duration)),
            allowed=self._allowed,
        )

    def workers_to_close(
        self,
        *,
        memory_ratio: float | None = None,
        n: int | None = None,
        key: Callable[[Any], Hashable] | bytes | None = None,
        minimum: int | None = None,
        target: int | None = None,
        attribute: str = "address",
    ) -> list[Any]:
        if isinstance(key, bytes):
            # Dask's Adaptive sends its worker_key pickled; the caller is trusted as it is
            # by every other op that carries pickled code (run_function, plugins).
            key = pickle.loads(key)
        group_of = adaptive.DEFAULT_GROUP if key is None else _on_view(key)
        chosen = adaptive.workers_to_close(
            list(self.state.workers.values()),
            memory_ratio=memory_ratio,
            n=n,
            minimum=minimum,
            target=target,
            group_of=group_of,
            allowed=self._allowed,
        )
        return [getattr(WorkerView(ws), attribute) for ws in chosen]

    def check_idle(self) -> float | None:
        return self.idle_clock.check(self.state, time.time())


def _on_view(key: Callable[[Any], Hashable] | bytes) -> Callable[[WorkerState], Hashable]:
    """A ``key`` of Dask's (a function of a ``WorkerState``) applied to the view."""
    if not callable(key):
        raise TypeError(f"workers_to_close: key must be a callable, got {key!r:.100}")

    def group_of(ws: WorkerState) -> Hashable:
        return key(WorkerView(ws))

    return group_of
