"""``subscribe_worker_status``: the feed cluster managers read (``distributed.deploy.Cluster``
opens it at start and keeps ``scheduler_info`` from it). Validated against both schedulers."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterator
from typing import Any

import pytest
from distributed.comm import connect

from dsched.testing.cluster import DASK_SCHEDULER_KINDS, ProcessCluster

SCHEDULER_KIND = os.environ.get("DSCHED_TEST_SCHEDULER", "dsched")
WAIT_S = 60

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]


@pytest.fixture
def one_worker_cluster() -> Iterator[ProcessCluster]:
    kind = SCHEDULER_KIND if SCHEDULER_KIND in DASK_SCHEDULER_KINDS else "dsched"
    with ProcessCluster(scheduler_kind=kind, n_workers=1, threads_per_worker=1) as cluster:
        yield cluster


async def _next_update(comm: Any) -> list[Any]:
    """The next feed message: the feed is batched, so a read may hold several."""
    batch = await asyncio.wait_for(comm.read(), WAIT_S)
    return list(batch)


def test_the_feed_reports_workers_joining_and_leaving(one_worker_cluster: ProcessCluster):
    cluster = one_worker_cluster
    assert cluster.address is not None

    async def watch() -> None:
        comm = await connect(cluster.address)
        await comm.write({"op": "subscribe_worker_status"})
        info = await asyncio.wait_for(comm.read(), WAIT_S)
        assert info["type"] == "Scheduler"
        ((first, identity),) = info["workers"].items()
        assert "metrics" not in identity and "last_seen" not in identity
        assert identity["nthreads"] == 1
        new = cluster.add_worker()  # a `dask worker` with a nanny
        updates: list[Any] = []
        while not any(u[0] == "add" for u in updates):
            updates += await _next_update(comm)
        ((_, added),) = [u for u in updates if u[0] == "add"]
        ((address, new_identity),) = added["workers"].items()
        assert address != first and "metrics" not in new_identity
        new.request_stop()
        updates = []
        while ["remove", address] not in [list(u) for u in updates]:
            updates += await _next_update(comm)
        new.wait_stopped(WAIT_S)
        await comm.close()

    asyncio.run(watch())
