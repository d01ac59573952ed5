"""``Client.restart()`` and ``Client.retire_workers()`` against real `dask worker`s."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from distributed import Client

from dsched.testing.cluster import ProcessCluster
from dsched.testing.faults import assert_cluster_clean, wait_for_workers, worker_pids
from dsched.testing.workloads import flaky, make_tree, sleep_then

pytestmark = [
    pytest.mark.integration,
    pytest.mark.timeout(120),
    pytest.mark.skipif(
        os.environ.get("DSCHED_TEST_SCHEDULER", "dsched") != "dsched",
        reason="checks the scheduler's state through dsched_info",
    ),
]


def test_restart_forgets_everything_and_brings_new_workers(nanny_cluster: ProcessCluster):
    assert nanny_cluster.address is not None
    with Client(nanny_cluster.address, set_as_default=False) as client:
        wait_for_workers(client, 2)
        before = worker_pids(client)
        done = client.map(sleep_then, range(4), [0] * 4, pure=False)
        client.gather(done)
        running = client.submit(sleep_then, "slow", 5, pure=False)
        client.restart(timeout=60)
        assert all(f.cancelled() for f in [*done, running])
        after = worker_pids(client)
        assert len(after) == 2
        assert not set(after) & set(before), "restart must replace every worker"
        assert not set(after.values()) & set(before.values())
        job = make_tree(seed=1, n=16)
        job.check(client.compute(job.collection).result(timeout=60))
        done.clear()
        del running
        assert_cluster_clean(client)


def test_retire_worker_moves_its_data_first(tmp_path: Path):
    with (
        ProcessCluster(n_workers=2, nanny=False, scheduler_args=["--validate"]) as cluster,
        Client(cluster.address, set_as_default=False) as client,
    ):
        assert cluster.address is not None
        wait_for_workers(client, 2)
        first, second = sorted(client.nthreads())
        # Results that exist only on the retiring worker; each task counts its runs.
        futures = [
            client.submit(flaky, str(tmp_path / f"runs-{i}"), 0, i, workers=[first], pure=False)
            for i in range(10)
        ]
        client.gather(futures)
        assert all(set(h) == {first} for h in client.who_has(futures).values())
        retiring_pid = worker_pids(client)[first]
        retired = client.retire_workers(workers=[first])
        assert set(retired) == {first}
        # The data moved to the other worker before the retiring one was closed ...
        assert set(client.nthreads()) == {second}
        assert all(set(h) == {second} for h in client.who_has(futures).values())
        assert client.gather(futures) == list(range(10))
        # ... so nothing was recomputed.
        assert all((tmp_path / f"runs-{i}").read_text() == "1" for i in range(10))
        # The retired worker process exits.
        [process] = [w for w in cluster.workers if w.popen.pid == retiring_pid]
        process.popen.wait(30)
        futures.clear()
        assert_cluster_clean(client)
