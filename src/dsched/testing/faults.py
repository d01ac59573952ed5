"""Fault injection against a ``ProcessCluster``: kill workers, and check that nothing leaks.

Used by the chaos tests and ``dsched soak``. Every process signalled here is one the cluster
started (a ``dask worker`` process, or the worker process its nanny started): PIDs come from
the cluster's own records or from the workers themselves (``os.getpid`` run on each).
"""

from __future__ import annotations

import os
import random
import signal
import time
from collections.abc import Callable
from typing import Any

from distributed import Client

from dsched.testing.cluster import ProcessCluster

POLL_INTERVAL_S = 0.05


class NotReached(AssertionError):
    """A condition did not hold within its deadline."""


def wait_until(condition: Callable[[], bool], timeout: float, describe: Callable[[], str]) -> None:
    """Poll ``condition`` until it holds; raise ``NotReached(describe())`` after ``timeout``."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise NotReached(f"not reached within {timeout:g} s: {describe()}")
        time.sleep(POLL_INTERVAL_S)


def dsched_info(client: Client) -> dict[str, Any]:
    """The dsched scheduler's own summary (``dsched_info`` RPC); runs validate() there.

    Against the stock `dask scheduler` (how the tests themselves are validated) the same
    counts come from ``run_on_scheduler``.
    """
    try:
        # (Client is not annotated; its scheduler rpc answers any op by attribute.)
        return dict(client.sync(client.scheduler.dsched_info))  # type: ignore[no-untyped-call, union-attr]
    except Exception:
        return dict(client.run_on_scheduler(_stock_scheduler_info))  # type: ignore[no-untyped-call]


def _stock_scheduler_info(dask_scheduler: Any) -> dict[str, Any]:
    return {
        "tasks": len(dask_scheduler.tasks),
        "clients": len([c for c in dask_scheduler.clients if c != "fire-and-forget"]),
        "workers": len(dask_scheduler.workers),
        "valid": True,
        "rss": 0,
    }


def worker_pids(client: Client) -> dict[str, int]:
    """{worker address: pid of the worker process} for the workers that answer."""
    return dict(client.run(os.getpid, on_error="ignore"))


def worker_data_counts(client: Client) -> dict[str, int]:
    return dict(client.run(lambda dask_worker: len(dask_worker.data), on_error="ignore"))


def kill_random_worker(cluster: ProcessCluster, client: Client, rng: random.Random) -> str | None:
    """SIGKILL one worker process chosen by ``rng``; without a nanny, start a replacement.

    Returns the killed worker's address, or None if no worker answered.
    """
    pids = worker_pids(client)
    if not pids:
        return None
    address = rng.choice(sorted(pids))
    pid = pids[address]
    if not cluster.nanny:
        # The worker process is one the cluster started itself: kill it through its Popen.
        owned = [w for w in cluster.workers if w.popen.pid == pid and w.is_running()]
        if not owned:
            return None
        owned[0].popen.kill()
        owned[0].popen.wait(10)
        cluster.add_worker()
    else:
        # A child of a nanny the cluster started; the nanny restarts it under a new address.
        os.kill(pid, signal.SIGKILL)
    return address


def wait_for_workers(client: Client, n: int, timeout: float = 60) -> None:
    wait_until(
        lambda: len(client.nthreads()) >= n,  # type: ignore[no-untyped-call]
        timeout,
        lambda: f"{n} workers did not come back: {sorted(client.nthreads())}",  # type: ignore[no-untyped-call]
    )


def assert_cluster_clean(client: Client, timeout: float = 30) -> dict[str, Any]:
    """Wait until the scheduler tracks no task and no worker holds data; check validate().

    ``client`` must hold no futures. Returns the last ``dsched_info``.
    """
    last: dict[str, Any] = {}

    def clean() -> bool:
        info = dsched_info(client)
        data = worker_data_counts(client)
        last.update(info=info, data=data)
        assert info.get("valid", True), f"validate() failed on the scheduler: {info}"
        return info["tasks"] == 0 and not any(data.values())

    wait_until(clean, timeout, lambda: f"cluster not clean: {last}")
    return dict(last["info"])
