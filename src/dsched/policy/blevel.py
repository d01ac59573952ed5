"""The ``blevel`` policy: list scheduling by b-level with earliest-start-time placement.

Theory of operation
-------------------
Classic HEFT-like list scheduling, done online. Ready tasks of a batch are taken in b-level
order (longest path to a sink first, computed from ``TaskAdded``; Dask priority breaks
ties). Each goes to the worker where it can start earliest::

    start(w) = max(drain(w), fetch(w))
    drain(w) = tasks assigned to w / threads of w x mean task duration
    fetch(w) = bytes of its inputs w does not hold / bandwidth

The mean task duration is a moving average of measured durations (``unknown-task-duration``
until one is measured); bandwidth is ``distributed.scheduler.bandwidth`` until the runtime
measures it from the workers' transfers (``BandwidthMeasured``, wanted). Candidates are the
holders of its inputs plus the least loaded worker (O(inputs) per task), or every allowed
worker for a restricted task. No queue and no stealing: every decision is final.

Where the inputs are comes from the live replica map (``ReplicaAdded`` / ``ReplicaRemoved``,
wanted; see ``common``) rather than from the holders listed when the task became ready, so
copies made by other tasks' fetches reported in the same batch count as local. That costs
the runtime about one event per replica freed or fetched.
"""

from __future__ import annotations

from dsched.policy.common import BasePolicy, PolicyConfig
from dsched.policy.protocol import (
    BandwidthMeasured,
    Decision,
    ReplicaAdded,
    ReplicaRemoved,
    TaskDone,
)

DURATION_SMOOTHING = 0.05


class BLevelPolicy(BasePolicy):
    wants = frozenset({BandwidthMeasured, ReplicaAdded, ReplicaRemoved})

    def __init__(self, config: PolicyConfig | None = None) -> None:
        super().__init__(config)
        self._mean_duration = self.config.unknown_task_duration
        self._measured = False

    def on_done(self, event: TaskDone) -> None:
        if event.duration is None:
            return
        if not self._measured:
            self._mean_duration, self._measured = event.duration, True
        else:
            self._mean_duration += DURATION_SMOOTHING * (event.duration - self._mean_duration)

    def schedule(self) -> list[Decision]:
        if not self.pending:
            return []
        bandwidth = self.bandwidth
        mean = self._mean_duration
        # Earliest start: the later of draining the worker's queue and fetching the inputs.
        return self.place_by_blevel(
            lambda w, local, total: (
                max(w.load() * mean, (total - local.get(w.id, 0)) / bandwidth),
                w.load(),
                w.id,
            )
        )
