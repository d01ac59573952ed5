"""The benchmark workloads of ``shared/benchmarks.md``, all generated locally and seeded.

A workload name carries its parameters (``merge-10k``, ``numpy-5000-10``, ...), parsed by
``get_workload``. ``Workload.prepare(client)`` builds the graph *untimed* and returns a
``Prepared``: ``run()`` does the timed part (``client.compute(...).result()`` or ``map`` +
``gather``) and returns the result, ``check(result)`` raises ``AssertionError`` if it is wrong
(the reference is computed locally, outside the timing, and cached per process).

Task functions are module-level in this installed module, so Dask pickles them by reference
and both the scheduler (which unpickles graphs) and the workers import them by name.
"""

from __future__ import annotations

import math
import operator
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

from distributed import Client

__all__ = ["WORKLOAD_FAMILIES", "Prepared", "Workload", "get_workload"]

# dask and distributed leave much of their API unannotated (Client.compute, Client.gather,
# dask.compute, dask.bag.from_sequence, ...): calls into it carry a targeted
# ``type: ignore[no-untyped-call]``.


# ---------------------------------------------------------------------- task functions
def inc(x: int) -> int:
    return x + 1


def times_ten(x: int) -> int:
    return x * 10


def merge_values(*values: int) -> int:
    return sum(values)


def sleep_times_ten(x: int, seconds: float) -> int:
    time.sleep(seconds)
    return x * 10


def name_length(pair: Any) -> int:
    return len(pair["name"])


def older_than_30(person: dict[str, Any]) -> bool:
    return bool(person["age"] > 30)


def first_is_older(pair: tuple[dict[str, Any], dict[str, Any]]) -> bool:
    return bool(pair[0]["age"] > pair[1]["age"])


# ---------------------------------------------------------------------- records
@dataclass
class Prepared:
    """A built graph: ``run()`` is the timed part, ``check`` validates its result."""

    run: Callable[[], Any]
    check: Callable[[Any], None]
    n_tasks: int


@dataclass(frozen=True)
class Workload:
    name: str
    family: str
    params: tuple[Any, ...]
    # Whether the graph's shape is independent of computed values (zero workers can run it).
    zero_ok: bool
    builder: Callable[..., Prepared]

    def prepare(self, client: Client) -> Prepared:
        configure_dask()
        return self.builder(client, *self.params)


def configure_dask() -> None:
    """Task-based shuffles and rechunks for every scheduler (dsched has no P2P extension),
    so all schedulers run the same graphs."""
    import dask

    dask.config.set({"dataframe.shuffle.method": "tasks", "array.rechunk.method": "tasks"})


def _count_tasks(*collections: Any) -> int:
    from dask.base import collections_to_expr

    expr = collections_to_expr(collections, optimize_graph=True).optimize()
    return len(expr.__dask_graph__())  # type: ignore[no-untyped-call]


def _compute(client: Client, *collections: Any) -> Callable[[], Any]:
    def run() -> Any:
        futures = client.compute(list(collections))  # type: ignore[no-untyped-call]
        return client.gather(futures)  # type: ignore[no-untyped-call]

    return run


def _close(expected: float | Callable[[], float], rel: float = 1e-6) -> Callable[[Any], None]:
    """A check against ``expected``; a callable is only called when a result is checked, so
    zero-worker runs (never checked) do not compute references locally."""

    def check(result: Any) -> None:
        target = expected() if callable(expected) else expected
        value = result[0] if isinstance(result, list | tuple) and len(result) == 1 else result
        if isinstance(result, list | tuple) and len(result) > 1:
            value = sum(float(v) for v in result)
        assert math.isclose(float(value), target, rel_tol=rel, abs_tol=1e-9), (
            f"expected {target!r}, got {value!r}"
        )

    return check


_REFERENCES: dict[str, float] = {}


def _reference(name: str, make: Callable[[], Any]) -> float:
    """A workload's expected value, computed once per process on the local thread pool."""
    if name not in _REFERENCES:
        import dask
        from dask.base import compute

        with dask.config.set(scheduler="threads"):
            results = compute(*make())  # type: ignore[no-untyped-call]
        _REFERENCES[name] = float(sum(float(r) for r in results))
    return _REFERENCES[name]


# ---------------------------------------------------------------------- builders
def build_merge(client: Client, n: int) -> Prepared:
    from dask.delayed import delayed

    graph = delayed(merge_values)(*[delayed(times_ten)(i) for i in range(n)])
    return Prepared(_compute(client, graph), _close(10 * sum(range(n))), n + 1)


def build_merge_slow(client: Client, n: int, seconds: float) -> Prepared:
    from dask.delayed import delayed

    graph = delayed(merge_values)(*[delayed(sleep_times_ten)(i, seconds) for i in range(n)])
    return Prepared(_compute(client, graph), _close(10 * sum(range(n))), n + 1)


def build_map(client: Client, n: int) -> Prepared:
    inputs = list(range(n))

    def run() -> Any:
        return client.gather(client.map(inc, inputs))  # type: ignore[no-untyped-call]

    def check(result: Any) -> None:
        if result and result[0] is None:  # zero workers: placeholders
            return
        assert list(result) == [i + 1 for i in inputs], "map results differ"

    return Prepared(run, check, n)


def build_tree(client: Client, k: int) -> Prepared:
    from dask.delayed import delayed

    level = [delayed(times_ten)(i) for i in range(2**k)]
    while len(level) > 1:
        level = [delayed(operator.add)(a, b) for a, b in zip(level[::2], level[1::2], strict=True)]
    n_tasks = 2 ** (k + 1) - 1
    return Prepared(_compute(client, level[0]), _close(10 * sum(range(2**k))), n_tasks)


def _numpy_graph(n: int, p: int) -> Any:
    import dask.array as da

    x = da.random.default_rng(0).random((n, n), chunks=(n // p, n // p))  # type: ignore[no-untyped-call]
    y = x + x.T
    return y[::2, n // 2 :].mean(axis=1).sum()


def build_numpy(client: Client, n: int, p: int) -> Prepared:
    graph = _numpy_graph(n, p)
    expected = partial(_reference, f"numpy-{n}-{p}", lambda: (_numpy_graph(n, p),))
    return Prepared(_compute(client, graph), _close(expected, 1e-9), _count_tasks(graph))


def _xarray_graph(chunk: int) -> Any:
    import dask.array as da
    import numpy as np
    import pandas as pd  # type: ignore[import-untyped]  # no pandas-stubs installed
    import xarray as xr

    time_index = pd.date_range("2013-01-01", periods=2920, freq="6h")
    lat = np.linspace(75.0, 15.0, 25)
    lon = np.linspace(200.0, 330.0, 53)
    values = 240.0 + 60.0 * da.random.default_rng(0).random(  # type: ignore[no-untyped-call]
        (2920, 25, 53), chunks=(-1, chunk, chunk)
    )
    data = xr.DataArray(
        values, coords={"time": time_index, "lat": lat, "lon": lon}, dims=("time", "lat", "lon")
    )
    climatology = data.groupby("time.week").mean("time")
    anomaly = data.groupby("time.week") - climatology
    return anomaly.sum().data


def build_xarray(client: Client, chunk: int) -> Prepared:
    graph = _xarray_graph(chunk)
    expected = partial(_reference, f"xarray-{chunk}", lambda: (_xarray_graph(chunk),))
    return Prepared(_compute(client, graph), _close(expected, 1e-6), _count_tasks(graph))


def _people(n: int) -> list[dict[str, Any]]:
    rng = random.Random(0)
    letters = "abcdefghijklmnopqrstuvwxyz"
    return [
        {
            "name": "".join(rng.choice(letters) for _ in range(rng.randint(3, 12))).title(),
            "age": rng.randint(0, 100),
            "id": i,
        }
        for i in range(n)
    ]


def _bag_graph(n: int, partitions: int) -> Any:
    import dask.bag as db

    people = db.from_sequence(_people(n), npartitions=partitions).filter(older_than_30)  # type: ignore[no-untyped-call]
    pairs = people.product(people).filter(first_is_older)
    return pairs.pluck(1).map(name_length).sum()


def _bag_expected(n: int) -> float:
    # The same computation in plain Python, in O(n log n): for each person older than 30 (as
    # the second of a pair), count the older ones (the first of the pair).
    import bisect

    adults = [p for p in _people(n) if p["age"] > 30]
    ages = sorted(p["age"] for p in adults)
    total = 0
    for person in adults:
        older = len(ages) - bisect.bisect_right(ages, person["age"])
        total += older * len(person["name"])
    return float(total)


def build_bag(client: Client, n: int, partitions: int) -> Prepared:
    graph = _bag_graph(n, partitions)
    return Prepared(_compute(client, graph), _close(_bag_expected(n)), _count_tasks(graph))


def _timeseries(days: int, freq: str, partition_freq: str, **kwargs: Any) -> Any:
    import dask
    import pandas as pd

    start = pd.Timestamp("2020-01-01")
    return dask.datasets.timeseries(  # type: ignore[no-untyped-call]
        start=start,
        end=start + pd.Timedelta(days=days),
        freq=freq,
        partition_freq=partition_freq,
        seed=0,
        **kwargs,
    )


def _groupby_graph(days: int, freq: str, partition_freq: str) -> Any:
    df = _timeseries(days, freq, partition_freq)
    grouped = df.groupby("name")["x"].mean().sum()
    resampled = df[(df.x > 0) | (df.y < 0)]["x"].resample("2s").mean().sum()
    return grouped, resampled


def build_groupby(client: Client, days: int, freq: str, partition_freq: str) -> Prepared:
    graphs = _groupby_graph(days, freq, partition_freq)
    key = f"groupby-{days}-{freq}-{partition_freq}"
    expected = partial(_reference, key, lambda: _groupby_graph(days, freq, partition_freq))
    return Prepared(_compute(client, *graphs), _close(expected, 1e-6), _count_tasks(*graphs))


def _join_graph(days: int, freq: str, partition_freq: str) -> Any:
    df = _timeseries(
        days, freq, partition_freq, dtypes={"value": float, "name": str, "id": int}, id_lam=100
    )
    joined = df.merge(df, on="id", how="inner", shuffle_method="tasks")
    return (joined.value_x + joined.value_y).sum()


def build_join(client: Client, days: int, freq: str, partition_freq: str) -> Prepared:
    graph = _join_graph(days, freq, partition_freq)
    key = f"join-{days}-{freq}-{partition_freq}"
    expected = partial(_reference, key, lambda: (_join_graph(days, freq, partition_freq),))
    return Prepared(_compute(client, graph), _close(expected, 1e-6), _count_tasks(graph))


# ---------------------------------------------------------------------- names
def _int(text: str) -> int:
    text = text.lower()
    if text.endswith("k"):
        return int(float(text[:-1]) * 1000)
    return int(text)


# family -> (builder, parameter parsers, zero_ok)
WORKLOAD_FAMILIES: dict[
    str, tuple[Callable[..., Prepared], tuple[Callable[[str], Any], ...], bool]
] = {
    "merge": (build_merge, (_int,), True),
    "merge_slow": (build_merge_slow, (_int, float), True),
    "map": (build_map, (_int,), True),
    "tree": (build_tree, (int,), True),
    "numpy": (build_numpy, (int, int), True),
    "xarray": (build_xarray, (int,), True),
    "bag": (build_bag, (_int, int), True),
    "groupby": (build_groupby, (int, str, str), True),
    "join": (build_join, (int, str, str), True),
}

# The full set of benchmarks.md.
FULL_SET = (
    "merge-10k",
    "merge-25k",
    "merge-50k",
    "merge_slow-2000-0.01",
    "merge_slow-500-0.1",
    "map-10k",
    "map-50k",
    "tree-12",
    "tree-14",
    "numpy-5000-10",
    "numpy-5000-50",
    "numpy-10000-100",
    "xarray-5",
    "xarray-25",
    "bag-10k-10",
    "bag-10k-50",
    "groupby-30-1s-1h",
    "groupby-90-1s-8h",
    "join-1-1s-1h",
    "join-1-1s-10min",
)


def get_workload(name: str) -> Workload:
    """Parse ``family-param-param`` (e.g. ``merge-10k``, ``groupby-30-1s-1h``)."""
    # The issue-14 families (realdata.py) and the P2P ones (p2p.py) import from this
    # module, so they join here.
    from dsched.bench.p2p import P2P_FAMILIES
    from dsched.bench.realdata import REAL_DATA_FAMILIES

    families = {**WORKLOAD_FAMILIES, **REAL_DATA_FAMILIES, **P2P_FAMILIES}
    family, _, rest = name.partition("-")
    if family not in families:
        raise ValueError(f"unknown workload {name!r}; families: {', '.join(families)}")
    builder, parsers, zero_ok = families[family]
    texts = rest.split("-") if rest else []
    if len(texts) != len(parsers):
        raise ValueError(f"workload {name!r}: {family} takes {len(parsers)} parameter(s)")
    try:
        params = tuple(parse(text) for parse, text in zip(parsers, texts, strict=True))
    except ValueError as error:
        raise ValueError(f"workload {name!r}: bad parameter: {error}") from None
    return Workload(name, family, params, zero_ok, builder)
