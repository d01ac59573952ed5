"""A simple locality-and-load placement policy.

Theory of operation
-------------------
Every ready task is placed in the batch it arrives in (no scheduler-side queue): the worker
keeps its own priority queue and runs ``nthreads`` tasks at a time, so short tasks never wait
on a round trip to the scheduler. The batch's events are folded first (finished tasks,
worker changes), then its ready tasks are placed in priority order, so the result depends
neither on the order in which the runtime listed them nor on where in the batch a worker
appeared. Two rules:

* Root tasks (no inputs, no restrictions) that become ready in the same batch are sorted by
  priority and cut into contiguous blocks, one per worker, sized so every worker ends up with
  the same load per thread. Neighbours in ``dask.order`` usually feed the same reduction, so
  contiguous blocks keep those reductions local.
* Any other task goes to the allowed, running worker with the lowest estimated start time:
  the time to fetch the inputs it lacks (bytes / bandwidth) plus the time to drain the tasks
  already assigned to it (load / nthreads x mean task duration). Only the holders of its
  inputs and the least loaded worker are candidates, so the cost is O(inputs + workers).

Load is the set of tasks assigned to a worker and not yet reported done; ``TaskDone`` removes
one. The mean duration is a moving average of the durations workers report; the bandwidth is
the configured one until the runtime measures it (``BandwidthMeasured``, wanted).

A task with no running candidate is ``Unplaceable`` if no worker at all satisfies its
restrictions (``common.unplaceable_reason``), else ``NoWorker``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from operator import attrgetter

from dsched.policy.common import unplaceable_reason
from dsched.policy.protocol import (
    Assignment,
    BandwidthMeasured,
    Decision,
    NoWorker,
    PolicyEvent,
    TaskCancelled,
    TaskDone,
    TaskReady,
    Unplaceable,
    WorkerAdded,
    WorkerRemoved,
    WorkerResources,
    WorkerStatus,
)

# Dask's default bandwidth estimate (distributed.scheduler.bandwidth), bytes per second.
DEFAULT_BANDWIDTH = 100e6
# Dask's default guess for a task of unknown duration (distributed.scheduler.unknown-task-duration).
UNKNOWN_TASK_DURATION = 0.5
# Weight of the newest measurement in the moving average of task durations.
DURATION_SMOOTHING = 0.05
# Placement order within a batch: Dask priority, then task id (C-level key).
_PRIORITY_ORDER = attrgetter("priority", "task")


@dataclass(slots=True)
class _Worker:
    id: int
    nthreads: int
    resources: dict[str, float]
    running: bool
    assigned: set[int] = field(default_factory=set)

    def load_per_thread(self) -> float:
        return len(self.assigned) / self.nthreads

    def offers(self, resources: tuple[tuple[str, float], ...]) -> bool:
        return all(self.resources.get(name, 0.0) >= amount for name, amount in resources)


class LocalityPolicy:
    wants = frozenset({BandwidthMeasured})

    def __init__(self, bandwidth: float = DEFAULT_BANDWIDTH) -> None:
        self._bandwidth = bandwidth
        self._workers: dict[int, _Worker] = {}
        self._mean_duration = UNKNOWN_TASK_DURATION

    def handle(self, events: Sequence[PolicyEvent], now: float) -> list[Decision]:
        ready: dict[int, TaskReady] = {}
        for event in events:
            if isinstance(event, TaskReady):
                ready[event.task] = event
            elif isinstance(event, TaskDone):
                self._task_done(event)
            elif isinstance(event, WorkerAdded):
                self._workers[event.worker] = _Worker(
                    event.worker, max(event.nthreads, 1), dict(event.resources), event.running
                )
            elif isinstance(event, WorkerRemoved):
                self._workers.pop(event.worker, None)
            elif isinstance(event, WorkerStatus):
                worker = self._workers.get(event.worker)
                if worker is not None:
                    worker.running = event.running
            elif isinstance(event, WorkerResources):
                worker = self._workers.get(event.worker)
                if worker is not None:
                    worker.resources = dict(event.resources)
            elif isinstance(event, BandwidthMeasured):
                self._bandwidth = event.bytes_per_second
            elif isinstance(event, TaskCancelled):
                ready.pop(event.task, None)  # nothing is queued across batches
        decisions: list[Decision] = []
        roots: list[TaskReady] = []
        for event in sorted(ready.values(), key=_PRIORITY_ORDER):
            if event.inputs or event.allowed is not None or event.resources:
                decisions.append(self._place(event) or self._cannot_place(event))
            else:
                roots.append(event)
        if roots:
            decisions.extend(self._place_roots(roots))
        return decisions

    def _cannot_place(self, event: TaskReady) -> NoWorker | Unplaceable:
        reason = unplaceable_reason(event, self._workers)
        return NoWorker(event.task) if reason is None else Unplaceable(event.task, reason)

    def _task_done(self, event: TaskDone) -> None:
        worker = self._workers.get(event.worker)
        if worker is not None:
            worker.assigned.discard(event.task)
        if event.duration is not None:
            self._mean_duration += DURATION_SMOOTHING * (event.duration - self._mean_duration)

    def _assign(self, task: int, worker: _Worker) -> Assignment:
        worker.assigned.add(task)
        return Assignment(task, worker.id)

    def _candidates(self, event: TaskReady) -> list[_Worker]:
        running = [w for w in self._workers.values() if w.running and w.offers(event.resources)]
        if event.allowed is None:
            return running
        allowed = [w for w in running if w.id in event.allowed]
        if allowed or not event.loose:
            return allowed
        return running

    def _place(self, event: TaskReady) -> Assignment | None:
        """Assign the task to its best running candidate, or None if it has none."""
        candidates = self._candidates(event)
        if not candidates:
            return None
        by_id = {w.id: w for w in candidates}
        local_bytes = dict.fromkeys(by_id, 0)
        total_bytes = 0
        for task_input in event.inputs:
            total_bytes += task_input.nbytes
            for holder in task_input.holders:
                if holder in local_bytes:
                    local_bytes[holder] += task_input.nbytes
        least_loaded = min(candidates, key=lambda w: (w.load_per_thread(), w.id))
        shortlist = {least_loaded.id} | {w for w, nbytes in local_bytes.items() if nbytes}

        def start_time(worker_id: int) -> tuple[float, int]:
            worker = by_id[worker_id]
            fetch = (total_bytes - local_bytes[worker_id]) / self._bandwidth
            drain = worker.load_per_thread() * self._mean_duration
            return fetch + drain, worker_id

        return self._assign(event.task, by_id[min(shortlist, key=start_time)])

    def _place_roots(self, roots: list[TaskReady]) -> list[Decision]:
        workers = sorted((w for w in self._workers.values() if w.running), key=lambda w: w.id)
        if not workers:
            return [NoWorker(event.task) for event in roots]
        total_threads = sum(w.nthreads for w in workers)
        total_load = sum(len(w.assigned) for w in workers) + len(roots)
        decisions: list[Decision] = []
        next_root = 0
        for index, worker in enumerate(workers):
            if index == len(workers) - 1:
                share = len(roots) - next_root  # the last worker takes the rounding remainder
            else:
                target = total_load * worker.nthreads / total_threads
                share = max(0, min(round(target) - len(worker.assigned), len(roots) - next_root))
            decisions.extend(
                self._assign(event.task, worker) for event in roots[next_root : next_root + share]
            )
            next_root += share
        return decisions
