"""Task graphs for the simulator: synthetic shapes and graphs taken from dask collections.

Theory of operation
-------------------
A ``SimGraph`` is a plain description: per key its dependencies, how long it computes and how
big its output is, plus the keys the client wants and the priority order (``dask.order`` for
collections, construction order for the synthetic ones, which are built in a depth-first
order). Every graph is put together with a ``GraphBuilder``, which applies a seeded
multiplicative jitter to the durations so that runs differ only by the seed.

Graphs from elsewhere are built by their owners with the same ``GraphBuilder``: the graph of
a recorded run (``dsched scheduler --trace``) by ``dsched.tools.trace.replay``, which sits on
a layer above this one (``tests/unit/test_layers.py``): the simulator knows nothing of traces.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "SYNTHETIC",
    "GraphBuilder",
    "Key",
    "SimGraph",
    "SimTask",
    "chains",
    "graph_from_collection",
    "map_tasks",
    "merge",
    "tree",
    "wide",
]

Key = Any


@dataclass(frozen=True, slots=True)
class SimTask:
    key: Key
    dependencies: tuple[Key, ...]
    duration: float  # seconds of compute
    nbytes: int  # size of the output
    annotations: Mapping[str, Any] = field(default_factory=dict)


@dataclass(slots=True)
class SimGraph:
    name: str
    tasks: dict[Key, SimTask]
    keys: list[Key]  # what the client wants
    order: dict[Key, int]  # priority (smaller runs first)

    def __len__(self) -> int:
        return len(self.tasks)


class GraphBuilder:
    """Builds a ``SimGraph`` task by task.

    ``build`` gives the tasks priorities in the order they were added, so add them in the
    order they should run (a caller with priorities of its own replaces ``order``). Each
    duration is multiplied by a factor drawn uniformly from ``[1 - jitter, 1 + jitter]``
    with a generator seeded by ``seed`` (``jitter=0``: durations are kept as given, and the
    generator is never drawn from).
    """

    def __init__(self, name: str, seed: int, jitter: float) -> None:
        self.name = name
        self.rng = random.Random(seed)
        self.jitter = jitter
        self.tasks: dict[Key, SimTask] = {}

    def add(
        self,
        key: Key,
        deps: tuple[Key, ...],
        duration: float,
        nbytes: int,
        annotations: Mapping[str, Any] | None = None,
    ) -> Key:
        """Add a task (``annotations``: e.g. ``{"workers": (address,)}``); returns its key."""
        if self.jitter:
            duration *= self.rng.uniform(1 - self.jitter, 1 + self.jitter)
        self.tasks[key] = SimTask(key, deps, duration, nbytes, dict(annotations or {}))
        return key

    def build(self, keys: list[Key]) -> SimGraph:
        """The graph of the tasks added so far; ``keys`` are the ones the client wants."""
        return SimGraph(self.name, self.tasks, keys, {k: i for i, k in enumerate(self.tasks)})


def merge(
    n: int = 10_000,
    duration: float = 0.0002,
    nbytes: int = 28,
    seed: int = 0,
    jitter: float = 0.2,
) -> SimGraph:
    """n independent tasks, then one task taking all of them (benchmarks' merge-N)."""
    b = GraphBuilder(f"merge-{n}", seed, jitter)
    leaves = tuple(b.add(f"times_ten-{i}", (), duration, nbytes) for i in range(n))
    return b.build([b.add("merge-0", leaves, duration * 10, nbytes)])


def map_tasks(
    n: int = 10_000, duration: float = 0.0002, nbytes: int = 28, seed: int = 0, jitter: float = 0.2
) -> SimGraph:
    """n independent tasks, every one wanted (benchmarks' map-N)."""
    b = GraphBuilder(f"map-{n}", seed, jitter)
    return b.build([b.add(f"inc-{i}", (), duration, nbytes) for i in range(n)])


def tree(
    k: int = 12, duration: float = 0.0002, nbytes: int = 28, seed: int = 0, jitter: float = 0.2
) -> SimGraph:
    """A pairwise binary-tree reduction over 2**k leaves (benchmarks' tree-K)."""
    b = GraphBuilder(f"tree-{k}", seed, jitter)

    def build(level: int, index: int) -> Key:
        if level == 0:
            return b.add(("leaf", index), (), duration, nbytes)
        left = build(level - 1, 2 * index)
        right = build(level - 1, 2 * index + 1)
        return b.add(("add", level, index), (left, right), duration, nbytes)

    return b.build([build(k, 0)])


def chains(
    n_chains: int = 8,
    length: int = 50,
    *,
    duration: float = 0.01,
    nbytes: int = 1_000_000,
    seed: int = 0,
    jitter: float = 0.2,
) -> SimGraph:
    """Independent chains a0 -> a1 -> ...: each link only needs its predecessor's output."""
    b = GraphBuilder(f"chains-{n_chains}x{length}", seed, jitter)
    ends = []
    for c in range(n_chains):
        previous: tuple[Key, ...] = ()
        for i in range(length):
            previous = (b.add((f"chain{c}", i), previous, duration, nbytes),)
        ends.append(previous[0])
    return b.build(ends)


def wide(
    n: int = 400,
    duration: float = 0.05,
    nbytes: int = 50_000_000,
    seed: int = 0,
    jitter: float = 0.2,
) -> SimGraph:
    """A root-heavy graph: n roots with big outputs, combined pairwise (i with n-1-i, like
    ``x + x.T``) into small results that are summed up. Running roots far ahead of the
    combines fills memory; queuing roots keeps it bounded."""
    b = GraphBuilder(f"wide-{n}", seed, jitter)
    roots = [f"random-{i}" for i in range(n)]
    combined = []
    for i in range(n // 2):
        # Build in the order dask.order would run it: both inputs, then the combine.
        for key in (roots[i], roots[n - 1 - i]):
            if key not in b.tasks:
                b.add(key, (), duration, nbytes)
        combined.append(b.add(f"add-{i}", (roots[i], roots[n - 1 - i]), duration / 5, 1000))
    return b.build([b.add("sum-0", tuple(combined), duration / 5, 1000)])


SYNTHETIC: dict[str, Callable[..., SimGraph]] = {
    "merge": merge,
    "map": map_tasks,
    "tree": tree,
    "chains": chains,
    "wide": wide,
}


def graph_from_collection(
    collection: Any,
    *,
    name: str = "collection",
    duration: float = 0.001,
    nbytes: int = 8_000,
    seed: int = 0,
    jitter: float = 0.2,
) -> SimGraph:
    """The graph of a dask collection (anything with ``__dask_graph__``), ordered with
    ``dask.order``. Durations and sizes are not known offline: every task gets ``duration``
    and ``nbytes`` (with jitter)."""
    from dask._task_spec import convert_legacy_graph
    from dask.core import flatten
    from dask.order import order

    graph = convert_legacy_graph(dict(collection.__dask_graph__()))
    priorities = order(graph)
    b = GraphBuilder(name, seed, jitter)
    for key in sorted(graph, key=lambda k: priorities[k]):
        node = graph[key]
        b.add(key, tuple(node.dependencies), duration, nbytes)
    wanted = flatten(collection.__dask_keys__())  # type: ignore[no-untyped-call]
    result = b.build(list(dict.fromkeys(wanted)))
    result.order = {key: priorities[key] for key in result.tasks}
    return result
