r"""Per key prefix of a dsched trace: tasks, compute total/median/p90, first start, last stop,
tasks per worker; then each worker's busy fraction per 0.5 s.

    PYTHONPATH=src .venv/bin/python \
        benchmarks/results/goal1-2026-12-02/prefix_stats.py FILE.trace...
"""

import ast
import statistics
import sys
from collections import defaultdict

from dsched.tools.trace.read import read_trace


def prefix(key):
    try:
        name = ast.literal_eval(key)[0] if key.startswith("(") else key
    except Exception:
        name = key
    return str(name).rsplit("-", 1)[0]


for path in sys.argv[1:]:
    t = read_trace(path)
    by = defaultdict(list)
    for tt in t.tasks.values():
        if tt.start is not None and tt.stop is not None:
            by[prefix(tt.key)].append(tt)
    print(path)
    for p, ts in sorted(by.items(), key=lambda kv: -len(kv[1])):
        d = sorted(x.stop - x.start for x in ts)
        per_w = defaultdict(int)
        for x in ts:
            per_w[x.worker] += 1
        first = min(x.start for x in ts)
        last = max(x.stop for x in ts)
        med_ms = statistics.median(d) * 1e3
        p90_ms = d[int(0.9 * len(d))] * 1e3
        print(
            f"  {p[:30]:30s} n={len(ts):5d} total={sum(d):7.3f}s med={med_ms:7.2f}ms "
            f"p90={p90_ms:7.2f}ms first={first:6.2f} last={last:6.2f} perworker={dict(per_w)}"
        )
    # busy timeline per worker, 0.5s bins
    span0 = min(x.start for ts in by.values() for x in ts)
    bins = defaultdict(lambda: defaultdict(float))
    for ts in by.values():
        for x in ts:
            b = int((x.start - span0) / 0.5)
            bins[x.worker][b] += x.stop - x.start
    for w in sorted(bins):
        mx = max(bins[w])
        print(f"  w{w:d} busy/0.5s:", " ".join(f"{bins[w][i] / 0.5:.1f}" for i in range(mx + 1)))
