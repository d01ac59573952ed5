"""(goal1 copy of realdata/task_stream.py: traces every dsched kind, dsched:<policy> too.)
Where a workload's time goes on dask and dsched, from the Client's task stream.

    .venv/bin/python benchmarks/results/realdata/task_stream.py array-4000-500-matmul \\
        --schedulers dask,dsched --repeats 2

Theory of operation
-------------------
The same measure for both schedulers: each run starts a fresh cluster (2 single-thread
``dask worker``s, as ``dsched bench``'s real-2x1), builds the workload untimed, and runs it
inside ``distributed.get_task_stream`` (the scheduler's task stream: one record per task
with the worker's ``startstops``). From the records: the span, the compute seconds and
task count per worker, the transfers (count, seconds, and how many inputs were fetched
from the other worker), and each worker's idle time (span - compute - transfer). With
``--trace-dir`` dsched also records its per-task trace there (``dsched trace report``).
Runs alternate between the schedulers.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

from dask.utils import key_split
from distributed import Client, get_task_stream

from dsched.bench.workloads import get_workload, inc
from dsched.testing.cluster import ProcessCluster


def summarize(records: list[dict[str, Any]], makespan: float) -> dict[str, Any]:
    compute: dict[str, float] = defaultdict(float)
    transfer: dict[str, float] = defaultdict(float)
    tasks: dict[str, int] = defaultdict(int)
    transfers = 0
    # Transfers by the prefix of the task that waited for them: which stage moves data.
    by_prefix: dict[str, int] = defaultdict(int)
    start = min(s["start"] for r in records for s in r["startstops"])
    stop = max(s["stop"] for r in records for s in r["startstops"])
    for record in records:
        worker = record["worker"]
        tasks[worker] += 1
        for part in record["startstops"]:
            length = part["stop"] - part["start"]
            if part["action"] == "compute":
                compute[worker] += length
            elif part["action"] == "transfer":
                transfer[worker] += length
                transfers += 1
                by_prefix[key_split(record["key"])] += 1
    span = stop - start
    workers = sorted(tasks)
    return {
        "makespan_s": makespan,
        "span_s": span,
        "tasks": dict(tasks),
        "compute_s": {w: round(compute[w], 3) for w in workers},
        "transfer_s": {w: round(transfer[w], 3) for w in workers},
        "transfers": transfers,
        "idle_s": {w: round(span - compute[w] - transfer[w], 3) for w in workers},
        "transfers_by_prefix": dict(sorted(by_prefix.items(), key=lambda kv: -kv[1])),
    }


def run(workload_name: str, kind: str, trace: Path | None) -> dict[str, Any]:
    args = [] if trace is None or not kind.startswith("dsched") else ["--trace", str(trace)]
    with ProcessCluster(scheduler_kind=kind, n_workers=2, scheduler_args=args) as cluster:
        client = Client(cluster.address, set_as_default=False)  # type: ignore[no-untyped-call]
        try:
            client.submit(inc, 0, pure=False).result()  # type: ignore[no-untyped-call]
            prepared = get_workload(workload_name).prepare(client)
            with get_task_stream(client) as stream:  # type: ignore[no-untyped-call]
                begin = time.perf_counter()
                prepared.run()
                makespan = time.perf_counter() - begin
            return summarize(stream.data, makespan)
        finally:
            client.close()  # type: ignore[no-untyped-call]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("workload")
    parser.add_argument("--schedulers", default="dask,dsched")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--trace-dir", type=Path)
    args = parser.parse_args(argv)
    results: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for repeat in range(args.repeats):
        for kind in args.schedulers.split(","):
            trace = None
            if args.trace_dir is not None:
                args.trace_dir.mkdir(parents=True, exist_ok=True)
                label = kind.split(":")[1] if ":" in kind else kind
                trace = args.trace_dir / f"{args.workload}-{label}-{repeat}.trace"
            summary = run(args.workload, kind, trace)
            results[kind].append(summary)
            print(kind, json.dumps(summary), flush=True)
    for kind, runs in results.items():
        print(
            f"{kind:8s} makespan {statistics.median(r['makespan_s'] for r in runs):.2f} s, "
            f"transfers {statistics.median(r['transfers'] for r in runs):.0f}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
