"""Adaptive scaling queries: Dask's ``adaptive_target``, ``workers_to_close`` and
``check_idle``, computed from the state's records.

Theory of operation
-------------------
A cluster manager's ``Adaptive`` (distributed/deploy/adaptive.py) asks the scheduler every
interval how many workers it wants (``adaptive_target``) and, to scale down, which ones to
close (``workers_to_close(target=, key=, attribute="name")``); the Kubernetes operator
asks ``check_idle`` to shut idle clusters down. These are reads of the state, so they are
plain functions here, pure like the rest of the layer: records in, records out, ``now``
passed in. Two inputs come from the shell because they are user code: the plugins'
``valid_workers_downscaling`` filter (``allowed``) and the pickled ``key`` callable that
groups workers (``group_of``); the shell (``server/adaptive.py``) wraps the records in
the facade's views for them.

The formulas are Dask's (``Scheduler.adaptive_target``, ``workers_to_close``,
``check_idle`` in distributed/scheduler.py, 2026.8.0), with dsched's names: Dask's
``queued`` tasks are dsched's ``ready`` ones and ``unrunnable`` its ``no-worker`` ones.
One difference: dsched keeps no per-prefix task durations, so every task is estimated at
``task_duration`` (``distributed.scheduler.unknown-task-duration``, what Dask uses for a
prefix it has not timed yet), and the occupancy of the tasks processing is that times
their number.

``IdleClock`` is Dask's ``idle_since`` bookkeeping. Dask resets it when its transition
counter moved between two checks; dsched watches the newest entry of the bounded
transition log (a new entry object is a new transition) and the number of tasks, which
also catches a graph whose tasks made no transition yet.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable, Sequence
from typing import TYPE_CHECKING

from dsched.state.edges import NO_WORKER, READY

if TYPE_CHECKING:
    from dsched.state.machine import SchedulerState
    from dsched.state.records import WorkerState

WorkerFilter = Callable[[list["WorkerState"]], list["WorkerState"]]

# Dask samples the first 100 queued tasks' durations and scales up to all of them.
QUEUED_SAMPLE = 100
# Dask's default memory_ratio: keep twice as much memory as the data held.
DEFAULT_MEMORY_RATIO = 2
# More than this share of the memory limit in use asks for twice the workers.
MEMORY_PRESSURE = 0.6


def _everyone(workers: list[WorkerState]) -> list[WorkerState]:
    return workers


def _address(ws: WorkerState) -> Hashable:
    return ws.address


DEFAULT_GROUP: Callable[[WorkerState], Hashable] = _address  # one worker per group


def stored_bytes(ws: WorkerState) -> int:
    """Dask's ``WorkerState.nbytes``: the bytes of the keys the worker holds."""
    return sum(max(ts.nbytes, 0) for ts in ws.has_what)


def runs_long_running_task(ws: WorkerState) -> bool:
    """Dask's ``ws.long_running``: a task seceded on it (a ``worker_client`` task that
    would start over elsewhere if its worker closed)."""
    return any(ts.long_running for ts in ws.processing)


def ready_and_unrunnable(state: SchedulerState) -> int:
    """Dask's ``len(queued) + len(unrunnable)``."""
    return sum(1 for ts in state.tasks.values() if ts.state in (READY, NO_WORKER))


def workers_to_close(
    workers: Sequence[WorkerState],
    *,
    memory_ratio: float | None = None,
    n: int | None = None,
    minimum: int | None = None,
    target: int | None = None,
    group_of: Callable[[WorkerState], Hashable] = DEFAULT_GROUP,
    allowed: WorkerFilter = _everyone,
) -> list[WorkerState]:
    """Dask's ``Scheduler.workers_to_close``: the workers that are cheap to close, whole
    groups (``group_of``) at a time, idle ones holding the fewest bytes first; never one
    running a long-running task nor one ``allowed`` (the plugins' filter) drops."""
    if target is not None and n is None:
        n = len(workers) - target
    if n is not None:
        n = max(n, 0)
        target = len(workers) - n
    if n is None and memory_ratio is None:
        memory_ratio = DEFAULT_MEMORY_RATIO
    if not n and all(ws.processing for ws in workers):
        return []

    valid = allowed([ws for ws in workers if not runs_long_running_task(ws)])
    groups: dict[Hashable, list[WorkerState]] = {}
    for ws in valid:
        groups.setdefault(group_of(ws), []).append(ws)
    limit_bytes = {g: sum(ws.memory_limit or 0 for ws in members) for g, members in groups.items()}
    group_bytes = {g: sum(stored_bytes(ws) for ws in members) for g, members in groups.items()}
    limit = sum(limit_bytes.values())
    total = sum(group_bytes.values())

    def cheapness(group: Hashable) -> tuple[bool, int]:
        is_idle = not any(ws.processing for ws in groups[group])
        return is_idle, -group_bytes[group]

    # Sorted most expensive first: pop() takes the cheapest (Dask's order, ties included).
    candidates = sorted(groups, key=cheapness)
    to_close: list[Hashable] = []
    remaining = len(workers)
    while candidates:
        group = candidates.pop()
        size = len(groups[group])
        if n is None and any(ws.processing for ws in groups[group]):
            break
        if minimum and remaining - size < minimum:
            break
        limit -= limit_bytes[group]
        if (n is not None and remaining - size >= (target or 0)) or (
            memory_ratio is not None and limit >= memory_ratio * total
        ):
            to_close.append(group)
            remaining -= size
        else:
            break
    return [ws for group in to_close for ws in groups[group]]


def adaptive_target(
    state: SchedulerState,
    *,
    target_duration: float,
    task_duration: float,
    allowed: WorkerFilter = _everyone,
) -> int:
    """Dask's ``Scheduler.adaptive_target``: the number of workers the workload asks for
    (seconds of work per ``target_duration``, divided by the threads per worker; twice the
    workers when memory is more than 60% used); below the current count, the workers
    ``workers_to_close`` would not close."""
    workers = list(state.workers.values())
    tasks_ready = ready_and_unrunnable(state)
    queued_occupancy = min(tasks_ready, QUEUED_SAMPLE) * task_duration
    if tasks_ready > QUEUED_SAMPLE:
        queued_occupancy *= tasks_ready / QUEUED_SAMPLE
    processing_occupancy = sum(len(ws.processing) for ws in workers) * task_duration
    cpu = math.ceil((processing_occupancy + queued_occupancy) / target_duration)

    # Avoid a few long tasks asking for many cores.
    waiting = tasks_ready
    for ws in workers:
        if waiting > cpu:
            break
        waiting += len(ws.processing)
    else:
        cpu = min(waiting, cpu)

    if workers:
        nthreads = sum(ws.nthreads for ws in workers)
        if nthreads:
            cpu = math.ceil(cpu / nthreads * len(workers))
    if tasks_ready and not workers:
        cpu = max(1, cpu)

    limit = sum(ws.memory_limit or 0 for ws in workers)
    used = sum(stored_bytes(ws) for ws in workers)
    memory = 2 * len(workers) if limit > 0 and used > MEMORY_PRESSURE * limit else 0

    wanted = max(memory, cpu)
    if wanted >= len(workers):
        return wanted
    return len(workers) - len(workers_to_close(workers, allowed=allowed))


class IdleClock:
    """Dask's ``Scheduler.check_idle`` without the closing (dsched's ``--idle-timeout`` is
    the scheduler's watchdog): since when nothing is ready, unrunnable or processing and no
    task changed state between two checks; None while busy. A scheduler starts idle."""

    def __init__(self, state: SchedulerState, started: float) -> None:
        self.idle_since: float | None = started
        self._marker = self._activity_marker(state)

    @staticmethod
    def _activity_marker(state: SchedulerState) -> tuple[object, int]:
        log = state.transition_log
        return (log[-1] if log else None, len(state.tasks))

    def check(self, state: SchedulerState, now: float) -> float | None:
        marker = self._activity_marker(state)
        last_entry, n_tasks = self._marker
        self._marker = marker
        if marker[0] is not last_entry or marker[1] != n_tasks:
            self.idle_since = None
            return None
        if ready_and_unrunnable(state) or any(ws.processing for ws in state.workers.values()):
            self.idle_since = None
            return None
        if not self.idle_since:
            self.idle_since = now
        return self.idle_since
