"""Keep the cyclic garbage collector off the records of a big graph.

Theory of operation
-------------------
Every record the state machine keeps (tasks, their sets of dependencies and dependents),
and every GraphNode the intake materializes, is an object the cyclic collector tracks, and
it walks a whole generation in one go while holding the GIL. A graph of a million tasks is
some 15 million such objects, nearly all long-lived: the middle generation (up to 20 x
50,000 survivors, ``dsched.cli.tune_garbage_collector``) took up to 1.8 s a collection and
a full collection seconds, stalling the loop while the graph came in. So:

* while the intake thread materializes a graph (``intake``), only the young generation is
  collected: its garbage is found as before, its survivors just wait;
* once a big graph (one taken in as parts, ``dsched.state.slicing``) is materialized, and
  after each of its parts is taken in, ``gc.freeze()`` moves every tracked object to the
  permanent generation, in O(1): the collector then only walks what was created since.

Frozen objects are still freed by reference counting, which frees every record the state
machine forgets (it breaks its own cycles). Only cyclic garbage among the objects alive at
a freeze (an exception's traceback being handled at that moment, say) escapes the
collector; so once the scheduler holds no task at all, ``when_idle`` unfreezes, collects
everything (the heap is small then: a few tenths of a second, once per big graph) and
freezes again what is left, as start-up does; never while a graph is coming in
(``graph_coming``: between its arrival and its last part the state may hold no task, but
the heap holds the graph, and a full collection then would walk all of it). Small graphs
change nothing but the pause of their intake's young collections.

``dask.order`` needs the collector itself: its working structures (about 1 KB a task)
hang off closures that refer to themselves, so reference counting never frees them. Left
to the young collections they would be promoted, wait for a middle-generation collection
that intake puts off, and after a big graph's freeze stay until the scheduler is idle
(tree-14: 29 MB of RSS held for the graph's lifetime, on a peak of 150 MB). So a big
graph is frozen just before ``order`` runs dask.order, with no collection at all, and one
young collection right after frees all it left: a walk of only what ordering allocated
(tree-14: ~20 ms; without the freeze the walk also takes in the graph's live records, 4x
longer). That young collection holds the GIL, about 1.2 us a task (0.35 s at 262k
tasks, 2.4 s at 2M, on an idle core), so beyond ``COLLECT_AFTER_ORDER_MAX`` tasks the
graph is ordered as before and its ordering garbage kept until idle: a loop stall over a
second is the worse trade there. A small graph is ordered as it comes: its garbage waits
for the next middle-generation collection, and freezing it would cost a full collection
when idle.
"""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Iterator, Mapping
from typing import Any

import dask.order
from dask.typing import Key

from dsched.graph.intake import SKELETON_ORDER_MAX
from dsched.state.slicing import PART_SIZE

# A threshold the middle and old generations never reach while a graph is materialized.
NEVER = 1 << 30
# The biggest graph whose ordering garbage is collected at once (a ~0.3 s pause): the
# biggest that intake orders as a skeleton, after pickling (the freeze before ordering
# would otherwise catch the whole graph).
COLLECT_AFTER_ORDER_MAX = SKELETON_ORDER_MAX


class GraphFreezer:
    def __init__(self) -> None:
        self.frozen_since_cleanup = False
        # Graphs between their arrival and their last part taken in: the state machine
        # may hold no task yet, but the heap is full of them.
        self.graphs_coming = 0

    @contextlib.contextmanager
    def graph_coming(self) -> Iterator[None]:
        """Around a graph's whole reception (in the loop): no idle cleanup meanwhile."""
        self.graphs_coming += 1
        try:
            yield
        finally:
            self.graphs_coming -= 1

    @contextlib.contextmanager
    def intake(self) -> Iterator[None]:
        """Around a graph's intake (in the intake thread): collect the young generation only."""
        saved = gc.get_threshold()
        gc.set_threshold(saved[0], NEVER, NEVER)
        try:
            yield
        finally:
            gc.set_threshold(*saved)

    def order(self, dsk: dict[Key, Any]) -> Mapping[Key, int]:
        """``dask.order.order(dsk)``; for a big graph, the cyclic garbage it leaves is freed
        at once."""
        if not PART_SIZE < len(dsk) <= COLLECT_AFTER_ORDER_MAX:
            return dask.order.order(dsk)
        self.freeze()
        saved = gc.get_threshold()
        gc.set_threshold(NEVER, NEVER, NEVER)
        try:
            return dask.order.order(dsk)
        finally:
            gc.set_threshold(*saved)
            gc.collect(0)

    def freeze(self) -> None:
        """A big graph's records are long-lived: stop walking them."""
        gc.freeze()
        self.frozen_since_cleanup = True

    def when_idle(self, tasks: int) -> None:
        """Collect what the freezes kept from the collector, once no task is left."""
        if self.frozen_since_cleanup and tasks == 0 and not self.graphs_coming:
            self.frozen_since_cleanup = False
            gc.unfreeze()
            gc.collect()
            gc.freeze()
