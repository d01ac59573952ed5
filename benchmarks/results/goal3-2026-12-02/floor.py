"""Goal 3's floor: how much of a 1/10-of-Dask makespan dask's own code already takes.

    .venv/bin/python benchmarks/results/goal3-2026-12-02/floor.py --out floor.json

Theory of operation
-------------------
Goal 3 asks for a zero-mode makespan per task of at most a tenth of ``dask scheduler``'s.
The makespan (``dsched bench``: from the Client's call to its results) also holds work no
scheduler of Dask graphs can skip: the Client optimizing and serializing the graph, and on
the scheduler dask's own code that defines the graph's meaning (unpickling the expression,
materializing it, ``dask.order``), which Dask's scheduler runs as well. For each workload
this measures, on a fresh zero-8 cluster per scheduler, interleaved:

* the makespan under ``dask scheduler`` and dsched (as ``dsched bench`` does);
* the Client's own share: the time inside ``Client.compute`` / ``Client.map`` (optimize,
  serialize, hand to the stream), wrapped around the bench's own call;
* the CPU seconds of the scheduler, of the zero workers' process and of this (the Client's)
  process during the run: on 2 cores, all of it competes for the same two;

and in this process (its collector tuned as the scheduler's), on the same graph's
``update-graph`` message as it arrives, the CPU of deserializing, materializing and
ordering it (compute workloads; ``client.map`` sends its own priorities, so nothing is
ordered). The budget left for everything else of the scheduler (its state machine, policy,
wire and the pickling of each task for the worker) is
then ``dask makespan / 10 - client share - dask library share``.
"""

from __future__ import annotations

import argparse
import json
import operator
import os
import sys
import time
from pathlib import Path
from typing import Any

import dask.order
from dask.delayed import delayed
from distributed import Client

from dsched.bench import workloads
from dsched.cli import tune_garbage_collector
from dsched.graph import intake
from dsched.testing.cluster import ProcessCluster

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "memory-2026-12-02"))
from breakdown import update_graph_message


def _tree(k: int) -> Any:
    level = [delayed(workloads.times_ten)(i) for i in range(2**k)]
    while len(level) > 1:
        pairs = zip(level[::2], level[1::2], strict=True)
        level = [delayed(operator.add)(a, b) for a, b in pairs]
    return level[0]


COLLECTIONS = {
    "tree-14": lambda: [_tree(14)],
    "xarray-25": lambda: [workloads._xarray_graph(25)],
    "groupby-30-1s-1h": lambda: list(workloads._groupby_graph(30, "1s", "1h")),
}


def library_share(name: str) -> dict[str, float]:
    """CPU seconds of dask's own graph code on the scheduler side (a graph per collection),
    from the second of two passes: the first unpickling in a process imports modules."""
    if name not in COLLECTIONS:
        return {}
    tune_garbage_collector()  # as the scheduler process does
    messages = [update_graph_message(c) for c in COLLECTIONS[name]()]
    for _ in range(2):
        totals = {"deserialize_s": 0.0, "materialize_s": 0.0, "order_s": 0.0}
        for msg in messages:
            started = time.process_time()
            expression = intake._deserialize_expression(msg["expr_ser"])
            deserialized = time.process_time()
            dsk, _ = intake._materialize(expression, set(msg["keys"]))
            del expression
            materialized = time.process_time()
            dask.order.order(dsk)
            ordered = time.process_time()
            totals["deserialize_s"] += deserialized - started
            totals["materialize_s"] += materialized - deserialized
            totals["order_s"] += ordered - materialized
    return totals


def _cpu(pids: list[int]) -> float:
    """User + system CPU seconds of these processes (Linux /proc)."""
    total = 0.0
    for pid in pids:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


def run_once(name: str, scheduler: str) -> dict[str, float]:
    with ProcessCluster(scheduler_kind=scheduler, n_workers=8, worker_kind="zero") as cluster:
        client = Client(cluster.address, set_as_default=False)  # type: ignore[no-untyped-call]
        try:
            client.submit(workloads.inc, 0, pure=False).result()
            prepared = workloads.get_workload(name).prepare(client)
            inside = [0.0]
            for method in ("compute", "map"):
                real = getattr(client, method)

                def timed(*args: Any, _real: Any = real, **kwargs: Any) -> Any:
                    started = time.perf_counter()
                    try:
                        return _real(*args, **kwargs)
                    finally:
                        inside[0] += time.perf_counter() - started

                setattr(client, method, timed)
            assert cluster.scheduler is not None
            pids = {
                "scheduler": [cluster.scheduler.popen.pid],
                "workers": [w.popen.pid for w in cluster.workers],
            }
            cpu_before = {role: _cpu(p) for role, p in pids.items()}
            own_before = time.process_time()
            started = time.perf_counter()
            prepared.run()
            makespan = time.perf_counter() - started
            record = {"makespan_s": makespan, "client_s": inside[0], "tasks": prepared.n_tasks}
            record["client_process_cpu_s"] = time.process_time() - own_before
            for role, p in pids.items():
                record[f"{role}_cpu_s"] = _cpu(p) - cpu_before[role]
            return record
        finally:
            client.close()  # type: ignore[no-untyped-call]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workloads", default="tree-14,xarray-25,groupby-30-1s-1h,map-10k")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    workloads.configure_dask()
    records = []
    for name in args.workloads.split(","):
        library = library_share(name)
        for repeat in range(args.repeats):
            for scheduler in ("dask", "dsched"):
                record = {"workload": name, "scheduler": scheduler, "repeat": repeat}
                record.update(run_once(name, scheduler))
                record.update(library)
                records.append(record)
                print(json.dumps(record), flush=True)
                args.out.write_text(json.dumps(records, indent=1))


if __name__ == "__main__":
    main()
