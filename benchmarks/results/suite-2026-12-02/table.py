"""The README's table from ``dsched bench`` results: per-workload ratio, geometric mean.

    .venv/bin/python benchmarks/results/suite-2026-12-02/table.py RESULTS.json [BASELINE]

Ratio = BASELINE median makespan / dsched median (BASELINE: ``dask`` unless given), over the
runs that finished; ``pairs`` is how many runs of each were ok. Per repeat, the ratio of
the two runs made back to back (``dsched bench`` interleaves them) is also shown.
"""

from __future__ import annotations

import json
import math
import statistics
import sys
from collections import defaultdict


def main(path: str, baseline: str = "dask") -> None:
    with open(path) as f:
        runs = json.load(f)["runs"]
    times: dict[str, dict[str, dict[int, float]]] = defaultdict(lambda: defaultdict(dict))
    order: list[str] = []
    for run in runs:
        if run["workload"] not in order:
            order.append(run["workload"])
        if run["status"] == "ok":
            times[run["workload"]][run["scheduler"]][run["repeat"]] = run["makespan_s"]
    print(f"| workload | {baseline} s | dsched s | ratio | per repeat |")
    print("|---|---:|---:|---:|---|")
    ratios = []
    for workload in order:
        base, ours = times[workload][baseline], times[workload]["dsched"]
        if not base or not ours:
            print(f"| {workload} | {len(base)} ok | {len(ours)} ok | - | |")
            continue
        ratio = statistics.median(base.values()) / statistics.median(ours.values())
        ratios.append(ratio)
        pairs = ", ".join(f"{base[r] / ours[r]:.2f}" for r in sorted(base) if r in ours)
        print(
            f"| {workload} | {statistics.median(base.values()):.2f} | "
            f"{statistics.median(ours.values()):.2f} | {ratio:.2f}x | {pairs} |"
        )
    if ratios:
        geomean = math.exp(sum(math.log(r) for r in ratios) / len(ratios))
        print(f"| **geometric mean ({len(ratios)})** | | | **{geomean:.2f}x** | |")


if __name__ == "__main__":
    main(*sys.argv[1:])
