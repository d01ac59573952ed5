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
freezes again what is left, as start-up does. Small graphs change nothing but the pause of
their intake's young collections.
"""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Iterator

# A threshold the middle and old generations never reach while a graph is materialized.
NEVER = 1 << 30


class GraphFreezer:
    def __init__(self) -> None:
        self.frozen_since_cleanup = False

    @contextlib.contextmanager
    def intake(self) -> Iterator[None]:
        """Around a graph's intake (in the intake thread): collect the young generation only."""
        saved = gc.get_threshold()
        gc.set_threshold(saved[0], NEVER, NEVER)
        try:
            yield
        finally:
            gc.set_threshold(*saved)

    def freeze(self) -> None:
        """A big graph's records are long-lived: stop walking them."""
        gc.freeze()
        self.frozen_since_cleanup = True

    def when_idle(self, tasks: int) -> None:
        """Collect what the freezes kept from the collector, once no task is left."""
        if self.frozen_since_cleanup and tasks == 0:
            self.frozen_since_cleanup = False
            gc.unfreeze()
            gc.collect()
            gc.freeze()
