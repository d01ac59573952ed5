"""Ratios of ``dsched bench`` results with several dsched variants in one interleaved run.

    .venv/bin/python benchmarks/results/goal1-2026-12-02/table3.py RESULTS.json [BASELINE]

Per workload: median makespan of each scheduler, and for every scheduler other than the
baseline (``dask`` unless given) the ratio baseline median / its median, with the ratio
of each repeat's back-to-back runs in brackets.
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
    kinds: list[str] = []
    for run in runs:
        if run["scheduler"] not in kinds:
            kinds.append(run["scheduler"])
        if run["status"] == "ok":
            times[run["workload"]][run["scheduler"]][run["repeat"]] = run["makespan_s"]
    others = [k for k in kinds if k != baseline]
    short = {k: k.replace("dsched:g1_head_policy:DaskPolicy", "HEAD policy") for k in kinds}
    print(
        "| workload | "
        + " | ".join(f"{short[k]} s" for k in kinds)
        + " | "
        + " | ".join(f"{short[k]} ratio (per repeat)" for k in others)
        + " |"
    )
    print("|---|" + "---:|" * len(kinds) + "---|" * len(others))
    logs: dict[str, list[float]] = defaultdict(list)
    for workload, by in times.items():
        med = {k: statistics.median(by[k].values()) for k in kinds if by.get(k)}
        cells = [f"{med[k]:.2f}" if k in med else "-" for k in kinds]
        ratios = []
        for k in others:
            if k not in med or baseline not in med:
                ratios.append("-")
                continue
            r = med[baseline] / med[k]
            logs[k].append(math.log(r))
            per = ", ".join(
                f"{by[baseline][i] / by[k][i]:.2f}" for i in sorted(by[k]) if i in by[baseline]
            )
            ratios.append(f"{r:.2f}x ({per})")
        print(f"| {workload} | " + " | ".join(cells) + " | " + " | ".join(ratios) + " |")
    print(
        "| **geometric mean** | "
        + " | ".join("" for _ in kinds)
        + " | "
        + " | ".join(f"**{math.exp(statistics.mean(logs[k])):.2f}x**" for k in others)
        + " |"
    )


if __name__ == "__main__":
    main(*sys.argv[1:])
