"""A complete user-written scheduling policy for dsched: round robin over the allowed workers.

Load it with ``dsched scheduler --policy roundrobin_policy:RoundRobinPolicy`` (this directory
on PYTHONPATH), or try it offline:
``PYTHONPATH=examples/policies dsched simulate --policy roundrobin_policy:RoundRobinPolicy``.

It implements the whole protocol by hand (no dsched base class), to show what a policy must
do: keep track of running workers, answer every ``TaskReady`` with an ``Assignment`` or a
``NoWorker``, honour restrictions, and never read the clock.
"""

from __future__ import annotations

from collections.abc import Sequence

from dsched.policy.protocol import (
    Assignment,
    Decision,
    NoWorker,
    PolicyEvent,
    TaskCancelled,
    TaskReady,
    WorkerAdded,
    WorkerRemoved,
    WorkerStatus,
)


class RoundRobinPolicy:
    def __init__(self) -> None:
        self.resources: dict[int, dict[str, float]] = {}
        self.running: list[int] = []  # running worker ids, sorted
        self.next = 0

    def handle(self, events: Sequence[PolicyEvent], now: float) -> list[Decision]:
        ready: dict[int, TaskReady] = {}
        for event in events:
            if isinstance(event, WorkerAdded):
                self.resources[event.worker] = dict(event.resources)
                self._set_running(event.worker, event.running)
            elif isinstance(event, WorkerRemoved):
                self.resources.pop(event.worker, None)
                self._set_running(event.worker, False)
            elif isinstance(event, WorkerStatus):
                self._set_running(event.worker, event.running)
            elif isinstance(event, TaskReady):
                ready[event.task] = event
            elif isinstance(event, TaskCancelled):
                ready.pop(event.task, None)
            # TaskAdded, TaskDone, TaskForgotten, StealResult: not needed here.
        # Highest priority first (smaller tuples run first in Dask).
        return [self._place(e) for e in sorted(ready.values(), key=lambda e: e.priority)]

    def _set_running(self, worker: int, running: bool) -> None:
        if running and worker not in self.running:
            self.running = sorted([*self.running, worker])
        elif not running and worker in self.running:
            self.running.remove(worker)

    def _allowed(self, event: TaskReady) -> list[int]:
        def offers(worker: int) -> bool:
            have = self.resources.get(worker, {})
            return all(have.get(name, 0) >= amount for name, amount in event.resources)

        workers = [w for w in self.running if offers(w)]
        if event.allowed is None:
            return workers
        allowed = [w for w in workers if w in event.allowed]
        return allowed if allowed or not event.loose else workers

    def _place(self, event: TaskReady) -> Decision:
        workers = self._allowed(event)
        if not workers:
            return NoWorker(event.task)
        self.next += 1
        return Assignment(event.task, workers[self.next % len(workers)])
