"""bag-10k-50 placement from a dsched trace: products by (workers that ran their inputs,
worker that ran the product), and where the roots were sent, in order.

    PYTHONPATH=src .venv/bin/python benchmarks/results/goal1-2026-12-02/placement.py FILE.trace...
"""

import sys
from collections import Counter

from dsched.tools.trace.read import read_trace

for p in sys.argv[1:]:
    t = read_trace(p)
    c = Counter()
    first = Counter()
    steal = Counter()
    for x in t.tasks.values():
        if x.key.startswith("('filter-name_length") and x.dependencies:
            hold = tuple(sorted(t.tasks[d].worker for d in x.dependencies))
            c[(hold, x.worker)] += 1
    print(p, sorted(c.items()))
    roots = [x for x in t.tasks.values() if "from_sequence" in x.key]
    roots.sort(key=lambda x: x.sent)
    print(" roots:", [(round(x.sent, 3), x.worker) for x in roots][:50])
