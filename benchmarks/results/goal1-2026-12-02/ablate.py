"""Simulator ablation of the goal1 policy changes on recorded bag-10k-50 traces.

    PYTHONPATH=src .venv/bin/python benchmarks/results/goal1-2026-12-02/ablate.py trace/*.trace

Replays each trace (graph_from_trace: measured durations and sizes) on 2 x 1 simulated
workers with the final DaskPolicy, and with each change swapped back to HEAD's code.
"""

import sys

from dsched.policy.common import PolicyConfig
from dsched.policy.dask_like import DaskPolicy
from dsched.sim.engine import ClusterSpec, simulate
from dsched.tools.trace.read import read_trace
from dsched.tools.trace.replay import graph_from_trace

orig = {n: getattr(DaskPolicy, n) for n in ("worth_moving", "_fill_slots")}


def old_fill(self):
    import heapq

    head = self._peek()
    if head is None or not self.running:
        return []
    decisions = []
    workers = sorted(self.running.values(), key=lambda w: (len(w.assigned) / w.nthreads, w.id))
    for worker in workers:
        free = self.slots(worker, self.estimate(head)) - len(worker.assigned)
        while free > 0:
            event = self._peek()
            if event is None:
                return decisions
            heapq.heappop(self._queue)
            del self._queued[event.task]
            decisions.append(self.assign(event, worker))
            free -= 1
        head = self._peek()
        if head is None:
            break
    return decisions


def old_worth(self, nbytes, est):
    return nbytes / self.bandwidth <= 2 * est


variants = {
    "final (spread + worth_moving)": {},
    "without spread": {"_fill_slots": old_fill},
    "without worth_moving": {"worth_moving": old_worth},
    "neither (HEAD)": {"_fill_slots": old_fill, "worth_moving": old_worth},
}
for path in sys.argv[1:]:
    run = graph_from_trace(read_trace(path))
    for name, patch in variants.items():
        for n, f in orig.items():
            setattr(DaskPolicy, n, f)
        for n, f in patch.items():
            setattr(DaskPolicy, n, f)
        cluster = ClusterSpec(n_workers=2, nthreads=1)
        r = simulate(run.graph, DaskPolicy(PolicyConfig()), cluster, policy_name="dask")
        print(
            f"{path.split('/')[-1]:28s} {name:30s} makespan={r.makespan:.3f} "
            f"steals={r.steals_succeeded}/{r.steals_requested} transfers={r.transfers}",
            flush=True,
        )
