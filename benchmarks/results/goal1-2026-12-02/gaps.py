import sys
from collections import defaultdict
from itertools import pairwise

from dsched.tools.trace.read import read_trace

for p in sys.argv[1:]:
    t = read_trace(p)
    byw = defaultdict(list)
    for x in t.tasks.values():
        if x.start is not None and x.stop is not None and x.sent is not None and x.graph >= 0:
            byw[x.worker].append(x)
    print(p.split("/")[-1])
    for w, xs in sorted(byw.items()):
        xs.sort(key=lambda x: x.start)
        starve = overhead = fetchwait = 0.0
        ns = no = nf = 0
        for a, b in pairwise(xs):
            gap = b.start - a.stop
            if gap <= 0:
                continue
            if b.sent > a.stop:
                starve += min(gap, b.start - a.stop)
                ns += 1
            elif b.transfers:
                fetchwait += gap
                nf += 1
            else:
                overhead += gap
                no += 1
        comp = sum(x.stop - x.start for x in xs)
        print(
            f"  w{w}: tasks={len(xs)} compute={comp:.2f}s starved={starve:.2f}s ({ns}) "
            f"fetch-gaps={fetchwait:.2f}s ({nf}) other-gaps={overhead:.2f}s ({no}) "
            f"first={xs[0].start:.2f} last={xs[-1].stop:.2f}"
        )
