"""Workloads shaped like users' real graphs (issue 14): big-chunk arrays, timeseries frames,
map over futures, a list-argument merge. All data generated locally and seeded.

Theory of operation
-------------------
Each family here is looked up next to ``workloads.WORKLOAD_FAMILIES`` (the rsds-derived
ones: ``workloads.get_workload`` imports ``REAL_DATA_FAMILIES`` when called), so ``dsched bench
--workloads array-4000-500-matmul,...`` runs them with the same interleaving, timing and
checks. Names carry the parameters:

* ``array-N-C-OP``: ``da.random.default_rng(0).random((N, N), chunks=C)``, then OP:
  ``sum`` (``x.sum()``), ``meanstd`` (``x.mean(axis=0)`` and ``x.std(axis=1)``), ``matmul``
  (``(x @ x.T).sum()``: every output block reads a row and a column of blocks, so placement
  decides the transfers), ``persist`` (``client.persist(x)``, wait, then ``x.sum()`` and
  ``(x - x.mean(axis=0)).std()`` on the persisted blocks: the reductions' placement must
  follow the data).
* ``ts-D-P-OP``: ``dask.datasets.timeseries`` over D days at 1 s (D=2: 172,800 rows) in
  P partitions (``1h``, ...), then OP: ``agg`` (``groupby("name").agg({"x": "mean", "y":
  "max", "id": "count"})``, a tree reduction), ``aggsplit`` (the same with ``split_out=4``:
  a task shuffle of the partial aggregates), ``merge`` (the frame merged with a 26-row
  per-name table on ``name``: a broadcast-sized right side), ``setindex``
  (``set_index("id", shuffle_method="tasks")``), each reduced to a checkable scalar.
* ``mapmap-N``: ``a = client.map(inc, range(N))``; ``b = client.map(inc, a)``; gather b
  (both maps and the gather are timed: the second map's tasks depend on futures, one each).
* ``listmerge-N``: ``delayed(sum)([delayed(times_ten)(i) for i in range(N)])``: the N
  inputs are one list argument, not N positional ones.

Every check compares with a reference computed locally on the threaded scheduler
(outside the timing, cached per process) or in closed form.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

from distributed import Client

from dsched.bench.workloads import (
    Prepared,
    _close,
    _compute,
    _count_tasks,
    _int,
    _reference,
    _timeseries,
    inc,
    times_ten,
)

__all__ = ["REAL_DATA_FAMILIES", "REAL_DATA_SET"]

ARRAY_OPS = ("sum", "meanstd", "matmul", "persist")
TS_OPS = ("agg", "aggsplit", "merge", "setindex")


def _random(n: int, chunk: int) -> Any:
    import dask.array as da

    return da.random.default_rng(0).random((n, n), chunks=(chunk, chunk))  # type: ignore[no-untyped-call]


def _array_graph(n: int, chunk: int, op: str) -> tuple[Any, ...]:
    x = _random(n, chunk)
    if op == "sum":
        return (x.sum(),)
    if op == "meanstd":
        return (x.mean(axis=0).sum(), x.std(axis=1).sum())
    if op == "matmul":
        return ((x @ x.T).sum(),)
    if op == "persist":
        return (x.sum(), (x - x.mean(axis=0)).std())
    raise ValueError(f"array op {op!r} is not one of {', '.join(ARRAY_OPS)}")


def build_array(client: Client, n: int, chunk: int, op: str) -> Prepared:
    graphs = _array_graph(n, chunk, op)
    expected = partial(_reference, f"array-{n}-{chunk}-{op}", lambda: _array_graph(n, chunk, op))
    if op != "persist":
        return Prepared(_compute(client, *graphs), _close(expected, 1e-6), _count_tasks(*graphs))

    def run() -> Any:
        from distributed import futures_of
        from distributed.client import _wait

        x = client.persist(_random(n, chunk))  # type: ignore[no-untyped-call]
        client.sync(_wait, futures_of(x))  # type: ignore[no-untyped-call]
        reductions = (x.sum(), (x - x.mean(axis=0)).std())
        futures = client.compute(list(reductions))  # type: ignore[no-untyped-call]
        return client.gather(futures)  # type: ignore[no-untyped-call]

    return Prepared(run, _close(expected, 1e-6), _count_tasks(*graphs))


def _names_table() -> Any:
    import pandas as pd  # type: ignore[import-untyped]  # no pandas-stubs installed

    names = [
        "Alice", "Bob", "Charlie", "Dan", "Edith", "Frank", "George", "Hannah", "Ingrid",
        "Jerry", "Kevin", "Laura", "Michael", "Norbert", "Oliver", "Patricia", "Quinn", "Ray",
        "Sarah", "Tim", "Ursula", "Victor", "Wendy", "Xavier", "Yvonne", "Zelda",
    ]  # fmt: skip
    return pd.DataFrame({"name": names, "weight": [float(i + 1) for i in range(len(names))]})


def _partition_signature(part: Any) -> Any:
    """One value per partition: its x total times its smallest index (0 when empty)."""
    import pandas as pd

    value = float(part.x.sum() * part.index.min()) if len(part) else 0.0
    return pd.Series([value])


def _ts_graph(days: int, partition_freq: str, op: str) -> tuple[Any, ...]:
    import dask.dataframe as dd

    df = _timeseries(days, "1s", partition_freq)
    if op in ("agg", "aggsplit"):
        split_out = 4 if op == "aggsplit" else 1
        aggregated = df.groupby("name").agg(
            {"x": "mean", "y": "max", "id": "count"}, split_out=split_out
        )
        return (aggregated.x.sum() + aggregated.y.sum() + aggregated.id.sum(),)
    if op == "merge":
        table = dd.from_pandas(_names_table(), npartitions=1)  # type: ignore[no-untyped-call]
        merged = df.merge(table, on="name", how="inner")
        return ((merged.x * merged.weight).sum(),)
    if op == "setindex":
        indexed = df.set_index("id", shuffle_method="tasks")
        # A value that depends on which rows landed in which partition.
        placed = indexed.map_partitions(_partition_signature, meta=("x", float))
        return (indexed.x.sum() + placed.sum(),)
    raise ValueError(f"timeseries op {op!r} is not one of {', '.join(TS_OPS)}")


def build_ts(client: Client, days: int, partition_freq: str, op: str) -> Prepared:
    graphs = _ts_graph(days, partition_freq, op)
    key = f"ts-{days}-{partition_freq}-{op}"
    expected = partial(_reference, key, lambda: _ts_graph(days, partition_freq, op))
    return Prepared(_compute(client, *graphs), _close(expected, 1e-6), _count_tasks(*graphs))


def build_mapmap(client: Client, n: int) -> Prepared:
    inputs = list(range(n))

    def run() -> Any:
        first = client.map(inc, inputs)
        second = client.map(inc, first)
        return client.gather(second)  # type: ignore[no-untyped-call]

    def check(result: Any) -> None:
        assert list(result) == [i + 2 for i in inputs], "map over futures: results differ"

    return Prepared(run, check, 2 * n)


def build_listmerge(client: Client, n: int) -> Prepared:
    from dask.delayed import delayed

    graph = delayed(sum)([delayed(times_ten)(i) for i in range(n)])
    return Prepared(_compute(client, graph), _close(10 * sum(range(n))), n + 1)


def _choice(options: tuple[str, ...]) -> Callable[[str], str]:
    def parse(text: str) -> str:
        if text not in options:
            raise ValueError(f"{text!r} is not one of {', '.join(options)}")
        return text

    return parse


# family -> (builder, parameter parsers, zero_ok), as workloads.WORKLOAD_FAMILIES
REAL_DATA_FAMILIES: dict[
    str, tuple[Callable[..., Prepared], tuple[Callable[[str], Any], ...], bool]
] = {
    "array": (build_array, (int, int, _choice(ARRAY_OPS)), True),
    "ts": (build_ts, (int, str, _choice(TS_OPS)), True),
    "mapmap": (build_mapmap, (_int,), True),
    "listmerge": (build_listmerge, (_int,), True),
}

# The issue-14 set: ~10-30 s each on 2 single-thread workers.
REAL_DATA_SET = (
    "array-4000-500-sum",
    "array-4000-500-meanstd",
    "array-4000-500-matmul",
    "array-4000-500-persist",
    "ts-2-1h-agg",
    "ts-2-1h-aggsplit",
    "ts-2-1h-merge",
    "ts-2-1h-setindex",
    "mapmap-10k",
    "listmerge-10k",
)
