"""What tests ask about P2P shuffles, for dsched and for the reference ``dask scheduler``.

Theory of operation
-------------------
A shuffle leaves state in three places: the scheduler (active runs, archived runs, pinned
output tasks), each worker's ``ShuffleWorkerPlugin`` (active and closing runs) and each
worker's local directory (one ``shuffle-<id>-<run_id>`` directory per run, deleted when the
run closes). ``assert_no_shuffle_state`` waits until all three are empty, which is how a
shuffle must end whether it succeeded, failed, was cancelled or lost a worker. The
scheduler side is read with ``dsched_info`` from dsched and with ``run_on_scheduler`` from
Dask's ``ShuffleSchedulerPlugin``, so the same tests validate both schedulers.
"""

from __future__ import annotations

import os
import time
from typing import Any

import numpy as np
import pandas as pd  # type: ignore[import-untyped]  # no pandas-stubs installed
from distributed import Client

from dsched.testing.faults import dsched_info, wait_until

BARRIER_PREFIX = "shuffle-barrier-"
PARTITION_ROWS = 2000


def partition(i: int) -> pd.DataFrame:
    """Input partition ``i`` of the fault tests: random keys, unique row ids."""
    rng = np.random.default_rng(i)
    ids = np.arange(PARTITION_ROWS) + i * PARTITION_ROWS
    return pd.DataFrame({"k": rng.integers(0, 10_000, PARTITION_ROWS), "i": ids})


def slow_partition(i: int) -> pd.DataFrame:
    """``partition(i)``, slowly: a shuffle of these has a transfer phase seconds long, long
    enough for a test to act in the middle of it (workers import this module by name)."""
    time.sleep(0.15)
    return partition(i)


def barrier_keys(*collections: Any) -> list[str]:
    """The P2P barrier keys of the collections' optimized graph (what the client sends)."""
    from dask.base import collections_to_expr

    expr = collections_to_expr(collections, optimize_graph=True).optimize()
    graph = expr.__dask_graph__()  # type: ignore[no-untyped-call]
    return [key for key in graph if isinstance(key, str) and key.startswith(BARRIER_PREFIX)]


def _dask_scheduler_state(dask_scheduler: Any) -> dict[str, int]:
    plugin = dask_scheduler.plugins["shuffle"]
    return {
        "active": len(plugin.active_shuffles),
        "runs": sum(len(runs) for runs in plugin._shuffles.values()),
    }


def scheduler_shuffle_state(client: Client) -> dict[str, int]:
    """Counts of what the scheduler holds for shuffles (every value 0 when none is left)."""
    info = dsched_info(client)
    if "p2p" in info:
        return dict(info["p2p"])
    return dict(client.run_on_scheduler(_dask_scheduler_state))  # type: ignore[no-untyped-call]


def _worker_state(dask_worker: Any) -> dict[str, Any]:
    runs = dask_worker.plugins["shuffle"].shuffle_runs
    directories = sorted(
        name for name in os.listdir(dask_worker.local_directory) if name.startswith("shuffle-")
    )
    return {"active": len(runs._active_runs), "runs": len(runs._runs), "dirs": directories}


def worker_shuffle_state(client: Client) -> dict[str, dict[str, Any]]:
    """Per worker: active and closing shuffle runs, and shuffle directories left on disk."""
    return dict(client.run(_worker_state))


def _task_state(dask_scheduler: Any, key: str) -> str | None:
    ts = dask_scheduler.tasks.get(key)
    return None if ts is None else str(ts.state)


def task_state(client: Client, key: str) -> str | None:
    """The scheduler's state of ``key`` (None once forgotten), from either scheduler."""
    state = client.run_on_scheduler(_task_state, key=key)  # type: ignore[no-untyped-call]
    return None if state is None else str(state)


def active_shuffles(client: Client) -> int:
    return scheduler_shuffle_state(client)["active"]


def assert_no_shuffle_state(client: Client, timeout: float = 30) -> None:
    """Wait until neither the scheduler nor any worker holds anything of any shuffle."""
    last: dict[str, Any] = {}

    def empty() -> bool:
        last["scheduler"] = scheduler_shuffle_state(client)
        last["workers"] = worker_shuffle_state(client)
        return not any(last["scheduler"].values()) and not any(
            state["active"] or state["runs"] or state["dirs"]
            for state in last["workers"].values()
        )

    wait_until(empty, timeout, lambda: f"shuffle state left: {last}")
