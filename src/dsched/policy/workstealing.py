"""The ``workstealing`` policy: rsds's placement by input locality, balanced by stealing.

Theory of operation
-------------------
As in rsds (Böhm et al., "Runtime vs Scheduler", WORKS 2020): every ready task is placed at
once, in b-level order (longest path to a sink first, then Dask priority), on the worker
where the transfer cost of its inputs is lowest (0 for an input it holds, its size
otherwise); ties go to the least loaded worker (tasks per thread). Candidates are only the
holders of its inputs and the least loaded worker (O(inputs) per task), or every allowed
worker for a restricted task.

Locality alone piles work onto the workers that hold data, so after each batch
``balance()`` (see ``common``) lets every running worker with fewer tasks than threads steal
not-yet-started tasks from the most overloaded one with Dask's ``steal-request`` protocol:
a steal succeeds only if the victim had not started the task. Restricted tasks are never
stolen.
"""

from __future__ import annotations

from dsched.policy.common import BasePolicy
from dsched.policy.protocol import Decision


class WorkStealingPolicy(BasePolicy):
    steals = True

    def schedule(self) -> list[Decision]:
        if not self.pending:
            return []
        # rsds: the fewest bytes to move, then the lightest load.
        return self.place_by_blevel(
            lambda w, local, total: (total - local.get(w.id, 0), len(w.assigned) / w.nthreads, w.id)
        )
