"""The floor table of ``floor.json`` (see ``floor.py``), as markdown.

.venv/bin/python benchmarks/results/goal3-2026-12-02/table.py floor.json
"""

from __future__ import annotations

import json
import statistics
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any


def main() -> None:
    records: list[dict[str, Any]] = json.loads(Path(sys.argv[1]).read_text())
    runs: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
    for record in records:
        runs[record["workload"], record["scheduler"]].append(record)
    print(
        "| workload | tasks | dask s | dsched s | ratio | dask / 10 s | client s "
        "| dask's graph code s (unpickle + materialize + order) | left for the rest of a "
        "scheduler s | dsched's rest now s |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for workload in dict.fromkeys(r["workload"] for r in records):
        dask = runs[workload, "dask"]
        dsched = runs[workload, "dsched"]
        dask_s = statistics.median(r["makespan_s"] for r in dask)
        dsched_s = statistics.median(r["makespan_s"] for r in dsched)
        client_s = statistics.median(r["client_s"] for r in dsched)
        first = dsched[0]
        library_s = sum(first.get(k, 0.0) for k in ("deserialize_s", "materialize_s", "order_s"))
        budget = dask_s / 10
        print(
            f"| {workload} | {first['tasks']} | {dask_s:.2f} | {dsched_s:.2f} | "
            f"{dask_s / dsched_s:.1f}x | {budget:.2f} | {client_s:.2f} | "
            f"{library_s:.2f} ({first.get('deserialize_s', 0):.2f} + "
            f"{first.get('materialize_s', 0):.2f} + {first.get('order_s', 0):.2f}) | "
            f"{budget - client_s - library_s:.2f} | {dsched_s - client_s - library_s:.2f} |"
        )

    print()
    print(
        "| workload | scheduler | makespan s | Client process CPU s | scheduler CPU s "
        "| zero workers CPU s | all CPU / 2 cores s |"
    )
    print("|---|---|---:|---:|---:|---:|---:|")
    for (workload, scheduler), group in runs.items():
        if "scheduler_cpu_s" not in group[0]:
            continue
        cpu = {
            k: statistics.median(r[k] for r in group)
            for k in ("client_process_cpu_s", "scheduler_cpu_s", "workers_cpu_s")
        }
        print(
            f"| {workload} | {scheduler} | {statistics.median(r['makespan_s'] for r in group):.2f}"
            f" | {cpu['client_process_cpu_s']:.2f} | {cpu['scheduler_cpu_s']:.2f} | "
            f"{cpu['workers_cpu_s']:.2f} | {sum(cpu.values()) / 2:.2f} |"
        )


if __name__ == "__main__":
    main()
