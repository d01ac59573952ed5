"""A py-spy raw profile of the scheduler, grouped by thread and by what the time is for.

    .venv/bin/python benchmarks/results/goal3-2026-12-02/profile_groups.py \\
        benchmarks/results/goal3-2026-12-02/profile-tree14.raw.gz

The profile is ``py-spy record --format raw -r 500 --threads`` (collapsed stacks, one count
per line); a stack goes to the first group, in the order below, that one of its frames
names, else to its thread's "other".
"""

from __future__ import annotations

import collections
import gzip
import sys

RATE_HZ = 500
GROUPS = [
    ("intake: unpickle the expression", ["_deserialize_expression"]),
    ("intake: materialize + cull", ["_materialize"]),
    ("intake: pickle each task", ["_build_task_specs"]),
    ("intake: dask.order", ["order (dask/order.py", "GraphFreezer.order"]),
    ("intake: cut into parts", ["graph_parts"]),
    ("loop: decode (msgpack)", ["loads (dsched/wire/codec.py"]),
    ("loop: take the graph into the state", ["Streams.update_graph", "Streams._update_graph"]),
    ("loop: policy", ["BasePolicy.handle"]),
    ("loop: state machine (worker messages, placement)", ["SchedulerState.handle"]),
    ("loop: encode + write", ["Reactor._carry_out"]),
    ("loop: stream dispatch, decoders, reactor", ["Streams.run"]),
]


def main() -> None:
    groups: collections.Counter[str] = collections.Counter()
    threads: collections.Counter[str] = collections.Counter()
    with gzip.open(sys.argv[1], "rt") as lines:
        for line in lines:
            stack, _, count = line.rstrip().rpartition(" ")
            frames = stack.split(";")
            thread = "intake" if "intake" in frames[0] else "loop"
            threads[thread] += int(count)
            for name, needles in GROUPS:
                if name.startswith(thread) and any(n in f for f in frames for n in needles):
                    groups[name] += int(count)
                    break
            else:
                groups[f"{thread}: other (asyncio, collector, ...)"] += int(count)
    for thread in ("loop", "intake"):
        print(f"{thread}: {threads[thread] / RATE_HZ:.2f} s")
        for name, count in groups.most_common():
            if name.startswith(thread):
                share = count / threads[thread] * 100
                print(f"  {name}: {count / RATE_HZ:.2f} s ({share:.0f} %)")


if __name__ == "__main__":
    main()
