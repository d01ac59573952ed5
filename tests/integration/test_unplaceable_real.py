"""Tasks no worker can run, on a real cluster: they wait (as with Dask), the scheduler says
why once, and they run when a suitable worker joins.

One `dask worker` without resources; the test starts a second one with ``--resources GPU=1``
itself (and stops it, by its PID). Run with the default policy in process and with
``locality`` in a policy process, so ``Unplaceable`` also crosses the process boundary.
With DSCHED_TEST_SCHEDULER=dask the same scenario runs on the stock scheduler (which logs
nothing about such tasks: the checks of dsched's own reports are skipped there).

Nothing here waits for time to pass: every wait is for something the cluster reports (a log
line, a result, a heartbeat's reply), bounded, with the state in the failure message.
Heartbeats are not awaited on their timer but sent on demand (``Worker.heartbeat()`` through
``Client.run``: it returns once the scheduler has replied, i.e. applied it).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from distributed import Client

from dsched.testing.cluster import (
    DASK_SCHEDULER_KINDS,
    ManagedProcess,
    ProcessCluster,
    worker_command,
)
from dsched.testing.workloads import inc

pytestmark = [pytest.mark.integration, pytest.mark.timeout(150)]

WaitUntil = Callable[[Callable[[], bool], float, Callable[[], str]], None]

GPU_WARNING = "can never run on the current workers: no worker offers resources {'GPU': 1}"
PINNED_WARNING = "none of the workers it is restricted to is connected"
NO_WORKER_KEYS = ("gpu-inc", "pinned-inc")
# Workers import this module (from here) to run report_heartbeat, pickled by reference.
HERE = Path(__file__).parent


@pytest.fixture(
    params=[["--policy", "dask"], ["--policy", "locality", "--policy-process"]],
    ids=["dask", "locality-process"],
)
def cluster(request: pytest.FixtureRequest, scheduler_kind: str) -> Iterator[ProcessCluster]:
    args: list[str] = request.param
    if scheduler_kind in DASK_SCHEDULER_KINDS:
        if "--policy-process" in args:
            pytest.skip("dsched's placement policies do not apply to the stock scheduler")
        args = []
    with ProcessCluster(
        scheduler_kind=scheduler_kind,
        n_workers=1,
        scheduler_args=args,
        extra_pythonpath=[HERE],
    ) as c:
        yield c


async def report_heartbeat(dask_worker: Any) -> None:
    """Run on a worker: send a heartbeat now; returns when the scheduler has replied."""
    await dask_worker.heartbeat()


def scheduler_log(cluster: ProcessCluster) -> str:
    assert cluster.scheduler is not None
    return cluster.scheduler.log_path.read_text(errors="replace")


def scheduler_bandwidth(client: Client, scheduler_kind: str) -> float:
    """The scheduler's transfer bandwidth estimate (bytes/s)."""
    if scheduler_kind in DASK_SCHEDULER_KINDS:
        return float(client.run_on_scheduler(lambda dask_scheduler: dask_scheduler.bandwidth))
    return float(client.sync(client.scheduler.dsched_info)["bandwidth"])


def dask_task_states(client: Client) -> dict[str, str]:
    return dict(
        client.run_on_scheduler(
            lambda dask_scheduler, keys=NO_WORKER_KEYS: {
                key: dask_scheduler.tasks[key].state for key in keys if key in dask_scheduler.tasks
            }
        )
    )


def test_a_task_no_worker_can_run_waits_is_reported_once_and_runs_on_a_new_worker(
    cluster: ProcessCluster, scheduler_kind: str, tmp_path: Path, wait_until: WaitUntil
) -> None:
    assert cluster.address is not None
    is_dsched = scheduler_kind not in DASK_SCHEDULER_KINDS
    with Client(cluster.address, timeout=30) as client:
        configured_bandwidth = scheduler_bandwidth(client, scheduler_kind)
        gpu = client.submit(inc, 1, resources={"GPU": 1}, key="gpu-inc")
        nowhere = client.submit(inc, 2, workers=["tcp://127.0.0.1:1"], key="pinned-inc")
        if is_dsched:
            # The event: the scheduler has looked at both and said why they cannot run.
            wait_until(
                lambda: (
                    GPU_WARNING in scheduler_log(cluster)
                    and PINNED_WARNING in scheduler_log(cluster)
                ),
                30,
                lambda: scheduler_log(cluster)[-3000:],
            )
        else:
            wait_until(
                lambda: set(dask_task_states(client).values()) == {"no-worker"},
                30,
                lambda: f"task states: {dask_task_states(client)}",
            )

        # Heartbeats and the like must not bring the tasks back to the policy. Rather than
        # sleeping and hoping some happen, make them happen: heartbeats from every worker
        # (each applied once client.run returns), a client identity call...
        for _ in range(2):
            client.run(report_heartbeat)
        client.scheduler_info()
        # ... and a task through the policy: it answers in order, so anything it had to say
        # about the heartbeats (another warning) is in the log once this task is done.
        assert client.submit(inc, 10, key="after-heartbeats").result(timeout=60) == 11
        assert gpu.status == "pending" and nowhere.status == "pending"
        if is_dsched:
            assert scheduler_log(cluster).count(GPU_WARNING) == 1, scheduler_log(cluster)[-3000:]
        client.cancel(nowhere)

        local_directory = tmp_path / "gpu-worker"
        local_directory.mkdir()
        gpu_worker = ManagedProcess.start(
            "gpu worker",
            [*worker_command(cluster.address, local_directory), "--resources", "GPU=1"],
            tmp_path / "gpu-worker.log",
            dict(
                os.environ,
                PYTHONUNBUFFERED="1",
                PYTHONPATH=os.pathsep.join(filter(None, [str(HERE), os.environ.get("PYTHONPATH")])),
            ),
        )
        try:
            assert gpu.result(timeout=60) == 2
            [gpu_address] = [
                w for w, info in client.scheduler_info()["workers"].items() if info["resources"]
            ]
            assert client.who_has([gpu])[gpu.key] == (gpu_address,)
            if is_dsched:
                assert scheduler_log(cluster).count(GPU_WARNING) == 1
            del gpu

            # An 8 MB transfer to the GPU worker: it measures it (Dask's worker folds any
            # transfer above 1 MB into its estimate: 0.95 x old + 0.05 x measured), and
            # its next heartbeat blends that estimate into the scheduler's.
            [plain] = [w for w in client.nthreads() if w != gpu_address]
            data = client.submit(np.ones, 1_000_000, workers=[plain], key="ones")
            total = client.submit(np.sum, data, resources={"GPU": 1}, key="sum-ones")
            assert total.result(timeout=60) == 1_000_000
            [measured] = client.run(
                lambda dask_worker: dask_worker.bandwidth, workers=[gpu_address]
            ).values()
            # How fast the transfer went depends on the machine's load; that it changed the
            # worker's estimate does not (unless it ran at exactly the configured speed).
            assert measured != configured_bandwidth, "the transfer was not measured"
            client.run(report_heartbeat, workers=[gpu_address])
            estimate = scheduler_bandwidth(client, scheduler_kind)
            # Every heartbeat so far reported either the configured bandwidth or `measured`
            # (the plain worker never received anything big), so the scheduler's estimate is
            # a blend of the two, now with a share of `measured`: off the configured value,
            # towards the measured one.
            moved = (estimate - configured_bandwidth) / (measured - configured_bandwidth)
            assert 0 < moved <= 1 + 1e-9, (
                f"scheduler estimate {estimate:.6g} B/s, configured {configured_bandwidth:.6g}, "
                f"GPU worker's estimate {measured:.6g}"
            )
            del data, total
            if is_dsched:
                info = client.sync(client.scheduler.dsched_info)
                assert info["valid"], info
        finally:
            gpu_worker.request_stop()
            gpu_worker.wait_stopped(cluster.stop_timeout)
