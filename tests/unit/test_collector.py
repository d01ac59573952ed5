"""The server's garbage-collector handling of big graphs (``dsched.server.collector``)."""

from __future__ import annotations

import gc
import weakref
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import dask.order
import pytest
from dask._task_spec import GraphNode, Task, TaskRef

from dsched.server.collector import NEVER, GraphFreezer
from dsched.state.slicing import PART_SIZE


@pytest.fixture(autouse=True)
def _collector_as_it_was() -> Iterator[None]:
    """These tests freeze the heap and change thresholds: give the next test the
    collector they found."""
    thresholds = gc.get_threshold()
    yield
    gc.unfreeze()
    gc.set_threshold(*thresholds)


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


def test_no_cleanup_while_a_graph_is_coming_in() -> None:
    freezer = GraphFreezer()
    cycle = _Cycle()
    alive = weakref.ref(cycle)
    with freezer.graph_coming():
        freezer.freeze()  # as when a big graph's ordering starts: no task in the state yet
        del cycle
        freezer.when_idle(tasks=0)
        assert alive() is not None  # the heap holds the graph: no full collection now
        assert freezer.frozen_since_cleanup
    freezer.when_idle(tasks=0)
    assert alive() is None


def _chain(n: int) -> dict[Any, GraphNode]:
    nodes: dict[Any, GraphNode] = {"t-0": Task("t-0", int)}
    for i in range(1, n):
        nodes[f"t-{i}"] = Task(f"t-{i}", abs, TaskRef(f"t-{i - 1}"))
    return nodes


def _cyclic_garbage_left(order: Callable[[dict[Any, GraphNode]], Mapping[Any, int]]) -> int:
    dsk = _chain(PART_SIZE + 1_000)
    gc.collect()
    try:
        order(dsk)
    finally:
        gc.unfreeze()  # (the freezer froze this process's objects; let the collector see all)
    return gc.collect()


def test_ordering_a_big_graph_frees_dask_orders_cyclic_garbage_at_once() -> None:
    # dask.order's working structures hang off self-referring closures: only the
    # collector frees them. Ordered plainly, they are still there afterwards...
    assert _cyclic_garbage_left(dask.order.order) > PART_SIZE
    # ... through the freezer, one young collection has already freed them.
    assert _cyclic_garbage_left(GraphFreezer().order) < 100


def test_ordering_gives_dask_orders_priorities_and_restores_the_thresholds() -> None:
    before = gc.get_threshold()
    for n in (10, PART_SIZE + 10):
        dsk = _chain(n)
        try:
            assert GraphFreezer().order(dict(dsk)) == dask.order.order(dict(dsk))
        finally:
            gc.unfreeze()
        assert gc.get_threshold() == before
