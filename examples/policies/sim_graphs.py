"""Dask collections for ``dsched simulate --graph sim_graphs:NAME`` (benchmark-like shapes).

PYTHONPATH=examples/policies dsched simulate --graph sim_graphs:numpy_5000_10
"""

from __future__ import annotations

from typing import Any

import dask.array as da


def numpy_5000_10() -> Any:
    """benchmarks.md numpy-5000-10: (x + x.T)[::2, N//2:].mean(axis=1).sum(), 10x10 chunks."""
    n, p = 5000, 10
    # Seeded: an unseeded array gets new keys every run, and dask.order breaks ties by key,
    # so the simulated makespan would change from run to run.
    x = da.random.default_rng(0).random((n, n), chunks=(n // p, n // p))
    y = x + x.T
    return y[::2, n // 2 :].mean(axis=1).sum()
