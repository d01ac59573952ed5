"""dask.array fancy indexing on a real cluster: graphs whose keys hold numpy integers.

``vindex`` builds its chunk keys from numpy index arithmetic, so its graphs have keys such
as ``("vindex-merge-abc", np.int64(0))`` and dependencies such as
``("rechunk-merge-abc", np.int64(0), np.int64(0))``; graph optimization fuses most of them
away, ``optimize_graph=False`` keeps them all, and fusion keeps some when vindex is not the
last step. Such keys travel in compute-task, free-keys, task-finished, key-in-memory,
client-releases-keys, ...: msgpack cannot encode numpy scalars, so Dask pickles each one
(``{"__Pickled__": i}``), and the scheduler must do the same and take them back as the
same keys. Before dsched did, the message was dropped and the client waited forever.

Every case runs as compute and as persist, with and without graph optimization, and its
result must equal numpy's; the ``client`` fixture then checks that every key was released
everywhere (which takes the numpy keys through the release path too).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import dask.array as da
import numpy as np
import pytest
from dask._task_spec import convert_legacy_graph
from dask.base import collections_to_expr
from distributed import Client, futures_of, wait

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

RESULT_TIMEOUT_S = 60

BASE = np.arange(400).reshape(20, 20)

# name -> (the dask expression on x, the same indexing on a numpy array)
Indexing = Callable[[da.Array], da.Array]
CASES: dict[str, tuple[Indexing, Callable[[np.ndarray], np.ndarray]]] = {
    "vindex": (lambda x: x.vindex[[1, 5, 7], [2, 3, 4]], lambda a: a[[1, 5, 7], [2, 3, 4]]),
    "vindex-across-chunks": (
        lambda x: x.vindex[[1, 15, 7, 19], [2, 13, 4, 0]],
        lambda a: a[[1, 15, 7, 19], [2, 13, 4, 0]],
    ),
    "rows": (lambda x: x[np.array([3, 1, 2])], lambda a: a[np.array([3, 1, 2])]),
    "both-axes": (
        lambda x: x[np.array([13, 1, 7])][:, np.array([4, 0, 19])],
        lambda a: a[np.array([13, 1, 7])][:, np.array([4, 0, 19])],
    ),
    # Fancy rows, then a pointwise selection of the result: numpy keys even when optimized.
    "rows-then-vindex": (
        lambda x: x[np.array([13, 1, 7])].vindex[[0, 2], [1, 3]],
        lambda a: a[np.array([13, 1, 7])][[0, 2], [1, 3]],
    ),
}
# The cases whose graphs must have numpy keys (checked, so that the test keeps testing
# what it is meant to when dask changes): optimize_graph values for which they do.
NUMPY_KEYED = {
    "vindex": {False},
    "vindex-across-chunks": {False},
    "rows-then-vindex": {False, True},
}


def _key_parts(key: object) -> Iterator[object]:
    if isinstance(key, tuple):
        for part in key:
            yield from _key_parts(part)
    else:
        yield key


def numpy_keys(collection: da.Array, optimize_graph: bool) -> list[object]:
    """The keys and dependencies with numpy parts in the graph the client will send."""
    expr = collections_to_expr([collection], optimize_graph).optimize()
    graph = convert_legacy_graph(dict(expr.__dask_graph__()))
    keys = [*graph, *(dep for node in graph.values() for dep in node.dependencies)]
    return [key for key in keys if any(isinstance(p, np.generic) for p in _key_parts(key))]


@pytest.fixture
def x() -> da.Array:
    # Uneven chunks, so that the indices fall into several chunks on both axes.
    return da.from_array(BASE, chunks=(6, 7))


@pytest.mark.parametrize("optimize_graph", [False, True], ids=["unoptimized", "optimized"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_fancy_indexing_computes_like_numpy(
    client: Client, x: da.Array, case: str, optimize_graph: bool
) -> None:
    indexing, reference = CASES[case]
    expected = reference(BASE)
    selection = indexing(x)
    if optimize_graph in NUMPY_KEYED.get(case, set()):
        assert numpy_keys(selection, optimize_graph), "dask no longer makes numpy keys here"

    computed = client.compute(selection, optimize_graph=optimize_graph)
    np.testing.assert_array_equal(computed.result(timeout=RESULT_TIMEOUT_S), expected)
    del computed

    # persist: the client holds futures of the graph's own output keys (some with numpy
    # parts), learns of them through key-in-memory and releases them by key.
    persisted = client.persist(selection, optimize_graph=optimize_graph)
    futures = futures_of(persisted)
    wait(futures, timeout=RESULT_TIMEOUT_S)
    assert all(future.status == "finished" for future in futures)
    who_has = client.who_has(futures)
    assert set(who_has) == {future.key for future in futures}
    assert all(who_has.values()), who_has
    np.testing.assert_array_equal(persisted.compute(), expected)
    # ... and as the input of a new graph (a dependency key from the previous one).
    total = client.compute(persisted.sum(), optimize_graph=optimize_graph)
    assert total.result(timeout=RESULT_TIMEOUT_S) == expected.sum()
    del persisted, futures, total
