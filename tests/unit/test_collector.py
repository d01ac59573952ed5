"""The server's garbage-collector handling of big graphs (``dsched.server.collector``)."""

from __future__ import annotations

import gc
import weakref

from dsched.server.collector import NEVER, GraphFreezer


def test_an_intake_collects_only_the_young_generation_and_restores_the_thresholds() -> None:
    before = gc.get_threshold()
    freezer = GraphFreezer()
    with freezer.intake():
        assert gc.get_threshold() == (before[0], NEVER, NEVER)
    assert gc.get_threshold() == before
    try:
        with freezer.intake():
            raise KeyError("the intake failed")
    except KeyError:
        pass
    assert gc.get_threshold() == before


class _Cycle:
    def __init__(self) -> None:
        self.me = self


def test_cyclic_garbage_a_freeze_kept_is_collected_once_no_task_is_left() -> None:
    freezer = GraphFreezer()
    cycle = _Cycle()
    alive = weakref.ref(cycle)
    freezer.freeze()  # as after a part of a big graph: the cycle is frozen with the rest
    del cycle
    gc.collect()
    assert alive() is not None  # frozen: out of the collector's reach
    freezer.when_idle(tasks=3)  # tasks left: nothing happens
    assert alive() is not None
    freezer.when_idle(tasks=0)
    assert alive() is None
    assert gc.get_freeze_count() > 0  # what is alive is frozen again
    assert not freezer.frozen_since_cleanup
