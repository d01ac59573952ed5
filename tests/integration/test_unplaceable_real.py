"""Tasks no worker can run, on a real cluster: they wait (as with Dask), the scheduler says
why once, and they run when a suitable worker joins.

One `dask worker` without resources; the test starts a second one with ``--resources GPU=1``
itself (and stops it, by its PID). Run with the default policy in process and with
``locality`` in a policy process, so ``Unplaceable`` also crosses the process boundary.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
from distributed import Client

from dsched.testing.cluster import ManagedProcess, ProcessCluster, worker_command
from dsched.testing.workloads import inc

pytestmark = [pytest.mark.integration, pytest.mark.timeout(150)]

GPU_WARNING = "can never run on the current workers: no worker offers resources {'GPU': 1}"
PINNED_WARNING = "none of the workers it is restricted to is connected"


@pytest.fixture(
    params=[["--policy", "dask"], ["--policy", "locality", "--policy-process"]],
    ids=["dask", "locality-process"],
)
def cluster(request: pytest.FixtureRequest) -> Iterator[ProcessCluster]:
    with ProcessCluster(scheduler_kind="dsched", n_workers=1, scheduler_args=request.param) as c:
        yield c


def scheduler_log(cluster: ProcessCluster) -> str:
    assert cluster.scheduler is not None
    return cluster.scheduler.log_path.read_text(errors="replace")


def test_a_task_no_worker_can_run_waits_is_reported_once_and_runs_on_a_new_worker(
    cluster: ProcessCluster,
    tmp_path: Path,
    wait_until: Callable[[Callable[[], bool], float, Callable[[], str]], None],
) -> None:
    assert cluster.address is not None
    with Client(cluster.address, timeout=30) as client:
        gpu = client.submit(inc, 1, resources={"GPU": 1}, key="gpu-inc")
        nowhere = client.submit(inc, 2, workers=["tcp://127.0.0.1:1"], key="pinned-inc")
        wait_until(
            lambda: (
                GPU_WARNING in scheduler_log(cluster) and PINNED_WARNING in scheduler_log(cluster)
            ),
            30,
            lambda: scheduler_log(cluster)[-3000:],
        )
        time.sleep(1.0)  # heartbeats and the like must not bring the task back to the policy
        assert gpu.status == "pending" and nowhere.status == "pending"
        assert scheduler_log(cluster).count(GPU_WARNING) == 1
        client.cancel(nowhere)

        local_directory = tmp_path / "gpu-worker"
        local_directory.mkdir()
        gpu_worker = ManagedProcess.start(
            "gpu worker",
            [*worker_command(cluster.address, local_directory), "--resources", "GPU=1"],
            tmp_path / "gpu-worker.log",
            dict(os.environ, PYTHONUNBUFFERED="1"),
        )
        try:
            assert gpu.result(timeout=60) == 2
            [gpu_address] = [
                w for w, info in client.scheduler_info()["workers"].items() if info["resources"]
            ]
            assert client.who_has([gpu])[gpu.key] == (gpu_address,)
            assert scheduler_log(cluster).count(GPU_WARNING) == 1
            del gpu

            # An 8 MB transfer to the GPU worker: it measures it, and its next heartbeat
            # moves the scheduler's bandwidth estimate off the configured 100 MB/s.
            [plain] = [w for w in client.nthreads() if w != gpu_address]
            data = client.submit(np.ones, 1_000_000, workers=[plain], key="ones")
            total = client.submit(np.sum, data, resources={"GPU": 1}, key="sum-ones")
            assert total.result(timeout=60) == 1_000_000
            wait_until(
                lambda: abs(client.sync(client.scheduler.dsched_info)["bandwidth"] - 100e6) > 1e6,
                10,
                lambda: repr(client.sync(client.scheduler.dsched_info)),
            )
            del data, total
            info = client.sync(client.scheduler.dsched_info)
            assert info["valid"], info
        finally:
            gpu_worker.request_stop()
            gpu_worker.wait_stopped(cluster.stop_timeout)
