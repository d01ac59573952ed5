"""When tasks were moved (a second compute-task to another worker) in a dsched trace, per
second of the trace.

    .venv/bin/python benchmarks/results/goal1-2026-12-02/steal_times.py FILE.trace...
"""

import sys
from collections import Counter

for p in sys.argv[1:]:
    sends = {}
    times = []
    with open(p) as fh:
        for line in fh:
            f = line.rstrip("\n").split("\t")
            if f[0] == "S":
                kid = f[2]
                if kid in sends and sends[kid] != f[3]:
                    times.append(int(f[1]) / 1e6)
                sends[kid] = f[3]
    c = Counter(int(t) for t in times)
    print(p.split("/")[-1], len(times), "moves by second:", sorted(c.items()))
