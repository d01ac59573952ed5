"""What the HTTP routes compute from the scheduler: Dask's ``adaptive_target``,
``check_idle``, ``workers_to_close(n=)`` and ``/json/counts.json``, read from the state.

``adaptive_target`` follows Dask's formula (distributed/scheduler.py) with one estimate
for every task: ``distributed.scheduler.unknown-task-duration`` (dsched keeps no task
durations), so the occupancy is that duration times the tasks processing, and scaling
down keeps every worker that has tasks processing (Dask asks ``workers_to_close``, which
also weighs memory).
"""

from __future__ import annotations

import math
import time
from collections import Counter
from typing import TYPE_CHECKING

import dask
from dask.utils import parse_timedelta

if TYPE_CHECKING:
    from dsched.server.scheduler import Scheduler
    from dsched.state.records import WorkerState

_ACTIVE = ("ready", "no-worker", "processing")  # Dask: queued, unrunnable, processing


def _nbytes(ws: WorkerState) -> int:
    return sum(max(ts.nbytes, 0) for ts in ws.has_what)


def adaptive_target(scheduler: Scheduler, target_duration: float | str | None = None) -> int:
    if target_duration is None:
        target_duration = dask.config.get("distributed.adaptive.target-duration")
    target = float(parse_timedelta(target_duration))
    duration = float(
        parse_timedelta(dask.config.get("distributed.scheduler.unknown-task-duration"))
    )
    state = scheduler.state
    workers = list(state.workers.values())
    tasks_ready = sum(1 for ts in state.tasks.values() if ts.state in ("ready", "no-worker"))
    processing = sum(len(ws.processing) for ws in workers)
    # Dask: the first 100 queued tasks' durations, scaled up to all of them.
    cpu = math.ceil((processing + tasks_ready) * duration / target)
    # Avoid a few long tasks asking for many cores.
    for ws in workers:
        if tasks_ready > cpu:
            break
        tasks_ready += len(ws.processing)
    else:
        cpu = min(tasks_ready, cpu)
    if workers:
        nthreads = sum(ws.nthreads for ws in workers)
        cpu = math.ceil(cpu / nthreads * len(workers)) if nthreads else cpu
    if tasks_ready and not workers:
        cpu = max(1, cpu)
    limit = sum(ws.memory_limit or 0 for ws in workers)
    used = sum(_nbytes(ws) for ws in workers)
    memory = 2 * len(workers) if limit > 0 and used > 0.6 * limit else 0
    wanted = max(memory, cpu)
    if wanted >= len(workers):
        return wanted
    idle = sum(1 for ws in workers if not ws.processing)
    return max(wanted, len(workers) - idle)


def workers_to_close(scheduler: Scheduler, n: int) -> list[str]:
    """Dask's ``workers_to_close(n=n)`` with one worker per group: idle workers first,
    those holding the fewest bytes first; never a worker running a long-running task."""
    candidates = [
        ws
        for ws in scheduler.state.workers.values()
        if not any(ts.long_running for ts in ws.processing)
    ]
    candidates.sort(key=lambda ws: (bool(ws.processing), _nbytes(ws)))
    return [ws.address for ws in candidates[: max(n, 0)]]


class IdleTracker:
    """Dask's ``Scheduler.check_idle``: the time since which nothing is queued, unrunnable
    or processing and no task changed state between two checks; None while busy. The
    scheduler starts idle (``idle_since`` is its start time). It does not close the
    scheduler: ``--idle-timeout`` is the scheduler's own watchdog."""

    def __init__(self, scheduler: Scheduler) -> None:
        self.scheduler = scheduler
        self.idle_since: float | None = scheduler.started
        self._last: tuple[int, tuple[tuple[str, int], ...]] | None = None

    def check(self) -> float | None:
        tasks = self.scheduler.state.tasks
        states = Counter(ts.state for ts in tasks.values())
        snapshot = (len(tasks), tuple(sorted(states.items())))
        changed = self._last is not None and snapshot != self._last
        self._last = snapshot
        if changed or any(states[state] for state in _ACTIVE):
            self.idle_since = None
            return None
        if not self.idle_since:
            self.idle_since = time.time()
        return self.idle_since


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
