"""Which tasks fetched inputs, from a ``dsched scheduler --trace`` file.

    .venv/bin/python benchmarks/results/suite-2026-12-02/transfers.py FILE.trace...

Per consumer prefix: tasks, tasks that fetched anything (``X`` records), and of those how
many ran on a worker holding *none* of their inputs (placed away from all their data:
what the ``dask`` policy's guess guard is about) versus on a holder of some of them (a
task whose inputs are spread over both workers fetches wherever it runs). Also how many
tasks were started on a worker other than the one first written to (steals).
"""

from __future__ import annotations

import ast
import json
import sys
from collections import Counter, defaultdict


def prefix(key: str) -> str:
    try:
        name = ast.literal_eval(key)[0] if key.startswith("(") else key
    except (ValueError, SyntaxError):
        name = key
    return str(name).rsplit("-", 1)[0]


def analyse(path: str) -> None:
    keys: dict[str, str] = {}
    deps: dict[str, list[str]] = {}
    ran_on: dict[str, str] = {}
    first_sent: dict[str, str] = {}
    fetched: Counter[str] = Counter()
    with open(path) as f:
        for line in f:
            part = line.rstrip("\n").split("\t")
            kind = part[0]
            if kind == "K":
                keys[part[1]] = json.loads(part[3])
            elif kind == "D":
                deps[part[1]] = part[3:]
            elif kind == "S":
                first_sent.setdefault(part[2], part[3])
            elif kind == "F":
                ran_on[part[2]] = part[3]
            elif kind == "X":
                fetched[part[1]] += 1
    rows: dict[str, Counter[str]] = defaultdict(Counter)
    for kid, worker in ran_on.items():
        row = rows[prefix(keys.get(kid, kid))]
        row["tasks"] += 1
        if first_sent.get(kid) != worker:
            row["moved by steal"] += 1
        if not fetched[kid]:
            continue
        row["fetched"] += 1
        row["fetches"] += fetched[kid]
        holders = {ran_on.get(d) for d in deps.get(kid, ())}
        row["on a holder" if worker in holders else "on a non-holder"] += 1
    total: Counter[str] = Counter()
    print(path)
    cols = ["tasks", "fetched", "fetches", "on a non-holder", "on a holder", "moved by steal"]
    print(f"  {'prefix':28s}" + "".join(f"{c:>16s}" for c in cols))
    for name, row in sorted(rows.items(), key=lambda r: -r[1]["fetches"]):
        total.update(row)
        if row["fetches"]:
            print(f"  {name[:28]:28s}" + "".join(f"{row[c]:16d}" for c in cols))
    print(f"  {'total':28s}" + "".join(f"{total[c]:16d}" for c in cols))


if __name__ == "__main__":
    for trace in sys.argv[1:]:
        analyse(trace)
