"""What the HTTP routes compute from the scheduler: Dask's ``adaptive_target``,
``check_idle``, ``workers_to_close(n=)`` and ``/json/counts.json``, read from the state.

``adaptive_target``, ``workers_to_close`` and ``check_idle`` are the scheduler's RPCs of
those names (``server/adaptive.py`` over the pure ``ext/adaptive.py``: Dask's formulas,
with ``distributed.scheduler.unknown-task-duration`` as every task's estimate, since
dsched keeps no task durations).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from dsched.server.scheduler import Scheduler
    from dsched.state.records import WorkerState


def _nbytes(ws: WorkerState) -> int:
    return sum(max(ts.nbytes, 0) for ts in ws.has_what)


def adaptive_target(scheduler: Scheduler, target_duration: float | str | None = None) -> int:
    """Dask's ``adaptive_target``: the scheduler's RPC of the same name."""
    return scheduler.adaptive.adaptive_target(target_duration)


def workers_to_close(scheduler: Scheduler, n: int) -> list[str]:
    """Dask's ``workers_to_close(n=n)`` (what ``/api/v1/retire_workers {"n": n}`` retires):
    the scheduler's RPC of the same name."""
    return [str(address) for address in scheduler.adaptive.workers_to_close(n=n)]


class IdleTracker:
    """Dask's ``Scheduler.check_idle`` for ``/api/v1/check_idle``: the scheduler's
    ``check_idle`` RPC, whose idle clock the route shares (as Dask's route and RPC share
    ``idle_since``). It does not close the scheduler: ``--idle-timeout`` is the
    scheduler's own watchdog."""

    def __init__(self, scheduler: Scheduler) -> None:
        self.scheduler = scheduler

    def check(self) -> float | None:
        return self.scheduler.adaptive.check_idle()


def counts(scheduler: Scheduler) -> dict[str, int]:
    """Dask's ``/json/counts.json``."""
    state = scheduler.state
    erred = released = waiting = waiting_data = 0
    unrunnable = 0
    for ts in state.tasks.values():
        if ts.exception_blame is not None:
            erred += 1
        elif ts.state == "released":
            released += 1
        if ts.waiting_on:
            waiting += 1
        if ts.waiters:
            waiting_data += 1
        if ts.state == "no-worker":
            unrunnable += 1
    workers = list(state.workers.values())
    idle = saturated = 0
    for ws in workers:
        if ws.status == "running":
            idle += len(ws.processing) < ws.nthreads
            saturated += len(ws.processing) > ws.nthreads
    return {
        "bytes": sum(_nbytes(ws) for ws in workers),
        "clients": len(scheduler.reactor.clients),
        "cores": sum(ws.nthreads for ws in workers),
        "erred": erred,
        "hosts": len({ws.host for ws in workers}),
        "idle": idle,
        "memory": sum(len(ws.has_what) for ws in workers),
        "processing": sum(len(ws.processing) for ws in workers),
        "released": released,
        "saturated": saturated,
        "tasks": len(state.tasks),
        "unrunnable": unrunnable,
        "waiting": waiting,
        "waiting_data": waiting_data,
        "workers": len(workers),
        "desired_workers": adaptive_target(scheduler),
    }
