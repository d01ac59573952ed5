"""The ``random`` policy: every ready task goes to a uniformly random allowed worker.

Theory of operation
-------------------
A baseline (rsds found it surprisingly competitive on real clusters: it spreads load, and
the workers' own priority queues keep the order sensible). Ready tasks of a batch are
decided in priority order, each on a worker drawn from a ``random.Random(seed)``: an
unrestricted task draws from the running workers (O(1): a list kept in worker-id order),
a restricted one from the running workers that satisfy its restrictions. No queue, no
stealing. Deterministic given the seed and the event sequence.
"""

from __future__ import annotations

import random as _random

from dsched.policy.common import BasePolicy, PolicyConfig
from dsched.policy.protocol import Decision


class RandomPolicy(BasePolicy):
    def __init__(self, config: PolicyConfig | None = None) -> None:
        super().__init__(config)
        self._rng = _random.Random(self.config.seed)

    def schedule(self) -> list[Decision]:
        if not self.pending:
            return []
        decisions: list[Decision] = []
        running = sorted(self.running.values(), key=lambda w: w.id)
        for event in sorted(self.pending.values(), key=lambda e: (e.priority, e.task)):
            candidates = self.candidates(event)
            pool = running if candidates is None else candidates
            if pool:
                decisions.append(self.assign(event, self._rng.choice(pool)))
            else:
                decisions.append(self.no_worker(event))
        return decisions
