"""P2P workloads (issue 11): a timeseries ``set_index`` and a hash join, at any size.

Theory of operation
-------------------
Both families shuffle with ``shuffle_method="p2p"`` passed per call, which overrides the
task-based default the bench configures for every scheduler (``workloads.configure_dask``),
so the data moves worker to worker through distributed's shuffle plugin and the scheduler
only coordinates. Names carry the size:

* ``p2psetindex-D``: ``dask.datasets.timeseries`` over D days at 1 s (86,400 rows a day,
  in one-hour partitions), ``set_index("id")``: a full all-to-all shuffle of every
  column, reduced to a value that depends on which rows landed in which partition.
* ``p2pjoin-D``: such a frame joined with one at 2 s on the timestamp column, a hash join
  (two shuffles whose outputs feed one merge task per partition), reduced to a checksum.

The expected values come from the same graphs with ``shuffle_method="tasks"`` on the local
thread pool (P2P needs a distributed cluster), computed outside the timing, once per process.
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
)

__all__ = ["P2P_FAMILIES", "P2P_SET"]


def _partition_signature(part: Any) -> Any:
    """One value per output partition: its x total times its smallest index (0 if empty)."""
    import pandas as pd  # type: ignore[import-untyped]  # no pandas-stubs installed

    value = float(part.x.sum() * part.index.min()) if len(part) else 0.0
    return pd.Series([value])


def _setindex_graph(days: int, method: str) -> tuple[Any, ...]:
    df = _timeseries(days, "1s", "1h")
    indexed = df.set_index("id", shuffle_method=method)
    placed = indexed.map_partitions(_partition_signature, meta=("x", float))
    return (indexed.x.sum() + placed.sum(),)


def _join_graph(days: int, method: str) -> tuple[Any, ...]:
    # Joined on the timestamp (unique on each side, every other one on both), as a column:
    # no divisions to align on, so both sides are hash-shuffled.
    left = _timeseries(days, "1s", "1h").reset_index()
    right = _timeseries(days, "2s", "1h").reset_index()[["timestamp", "y"]]
    joined = left.merge(right.rename(columns={"y": "z"}), on="timestamp", shuffle_method=method)
    return ((joined.x * joined.z).sum() + joined.id.sum(),)


def _builder(
    name: str, graph: Callable[[int, str], tuple[Any, ...]]
) -> Callable[[Client, int], Prepared]:
    def build(client: Client, days: int) -> Prepared:
        graphs = graph(days, "p2p")
        expected = partial(_reference, f"{name}-{days}", lambda: graph(days, "tasks"))
        return Prepared(_compute(client, *graphs), _close(expected, 1e-6), _count_tasks(*graphs))

    return build


# Not for zero workers: P2P tasks run distributed's shuffle code on real workers.
P2P_FAMILIES: dict[str, tuple[Callable[..., Prepared], tuple[Callable[[str], Any], ...], bool]] = {
    "p2psetindex": (_builder("p2psetindex", _setindex_graph), (_int,), False),
    "p2pjoin": (_builder("p2pjoin", _join_graph), (_int,), False),
}

# Two sizes of each: 2 days (172,800 rows, 48 partitions) and 8 days (691,200 rows, 192).
P2P_SET = ("p2psetindex-2", "p2psetindex-8", "p2pjoin-2", "p2pjoin-8")
