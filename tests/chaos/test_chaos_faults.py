"""Deterministic faults: a task that kills its worker, flaky tasks with retries, a client
SIGKILLed mid-computation, a worker that stops heartbeating, and the scheduler's shutdown.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import dask
import pytest
from dask import delayed
from distributed import Client
from distributed.scheduler import KilledWorker

from dsched.testing.cluster import ProcessCluster
from dsched.testing.faults import (
    assert_cluster_clean,
    dsched_info,
    wait_for_workers,
    wait_until,
    worker_pids,
)
from dsched.testing.workloads import flaky, kill_my_process, make_tree, sleep_then

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

SCHEDULER_KIND = os.environ.get("DSCHED_TEST_SCHEDULER", "dsched")
needs_dsched = pytest.mark.skipif(
    SCHEDULER_KIND != "dsched", reason="checks the scheduler's state through dsched_info"
)
RESULT_TIMEOUT_S = 90


def dedicated_cluster(nanny: bool, n_workers: int, **env: str) -> ProcessCluster:
    return ProcessCluster(
        scheduler_kind=SCHEDULER_KIND,
        n_workers=n_workers,
        nanny=nanny,
        scheduler_args=["--validate"] if SCHEDULER_KIND == "dsched" else [],
        scheduler_env=env,
    )


# ------------------------------------------------------------------------- KilledWorker
@pytest.fixture(scope="module")
def fragile_cluster() -> Iterator[ProcessCluster]:
    """allowed-failures=1: the second worker death under one task makes it KilledWorker."""
    with dedicated_cluster(
        nanny=True, n_workers=2, DASK_DISTRIBUTED__SCHEDULER__ALLOWED_FAILURES="1"
    ) as cluster:
        yield cluster


@needs_dsched
def test_task_killing_its_workers_fails_with_killed_worker(fragile_cluster: ProcessCluster):
    assert fragile_cluster.address is not None
    with Client(fragile_cluster.address, set_as_default=False) as client:
        deadly = client.submit(kill_my_process, pure=False)
        with pytest.raises(KilledWorker, match="kill_my_process"):
            deadly.result(timeout=RESULT_TIMEOUT_S)
        # The exception the future keeps has a traceback whose frames refer to the future
        # itself, so `del` would not drop the last reference (stock Dask alike): release it.
        deadly.release()
        # The nannies bring the workers back and the cluster works as before.
        wait_for_workers(client, 2)
        job = make_tree(seed=5, n=32)
        job.check(client.compute(job.collection).result(timeout=RESULT_TIMEOUT_S))
        assert_cluster_clean(client)


# ------------------------------------------------------------------------- retries
def test_retries_on_submit_rerun_a_flaky_task(nanny_cluster: ProcessCluster, tmp_path: Path):
    assert nanny_cluster.address is not None
    with Client(nanny_cluster.address, set_as_default=False) as client:
        ok = client.submit(flaky, str(tmp_path / "ok"), 2, 42, retries=2, pure=False)
        assert ok.result(timeout=RESULT_TIMEOUT_S) == 42
        assert (tmp_path / "ok").read_text() == "3"

        too_few = client.submit(flaky, str(tmp_path / "few"), 3, 7, retries=1, pure=False)
        with pytest.raises(RuntimeError, match="flaky failure 2 of 3"):
            too_few.result(timeout=RESULT_TIMEOUT_S)
        assert (tmp_path / "few").read_text() == "2"
        too_few.release()  # an erred future is kept alive by its own traceback
        del ok, too_few
        assert_cluster_clean(client)


def test_retries_annotation_reruns_a_flaky_task(nanny_cluster: ProcessCluster, tmp_path: Path):
    assert nanny_cluster.address is not None
    with Client(nanny_cluster.address, set_as_default=False) as client:
        with dask.annotate(retries=3):
            value = delayed(flaky)(str(tmp_path / "annotated"), 3, 11, dask_key_name="flaky-a")
        total = delayed(sum)([value, 1], dask_key_name="flaky-total")
        assert client.compute(total).result(timeout=RESULT_TIMEOUT_S) == 12
        assert (tmp_path / "annotated").read_text() == "4"
        del total
        assert_cluster_clean(client)


# ------------------------------------------------------------------------- client loss
CLIENT_SCRIPT = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from distributed import Client, wait
    from dsched.testing.workloads import make_merge, sleep_then

    address, marker = sys.argv[1], Path(sys.argv[2])
    client = Client(address)
    slow = client.map(sleep_then, range(400), [0.02] * 400, pure=False)
    merged = client.compute(make_merge(seed=3, n=300).collection)
    wait(slow[:20])  # some results are in worker memory, most tasks are still to run
    marker.write_text("running")
    time.sleep(600)  # the test SIGKILLs us here
    """
)


@needs_dsched
def test_client_killed_mid_computation_leaves_nothing(
    nanny_cluster: ProcessCluster, tmp_path: Path
):
    assert nanny_cluster.address is not None
    marker = tmp_path / "client-running"
    with Client(nanny_cluster.address, set_as_default=False) as observer:
        wait_for_workers(observer, 2)
        proc = subprocess.Popen(
            [sys.executable, "-c", CLIENT_SCRIPT, nanny_cluster.address, str(marker)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            wait_until(
                lambda: marker.exists() or proc.poll() is not None,
                60,
                lambda: "the client subprocess never got going",
            )
            assert proc.poll() is None, "the client subprocess exited early"
            busy = dsched_info(observer)
            assert busy["clients"] == 2 and busy["tasks"] > 0, busy
        finally:
            proc.kill()  # SIGKILL: no close-client, the socket just drops
            proc.wait(10)
        info = assert_cluster_clean(observer)
        assert info["clients"] == 1, info  # only the observer is left


# ------------------------------------------------------------------------- worker-ttl
@needs_dsched
def test_silent_worker_is_removed_after_worker_ttl_and_its_work_redone(tmp_path: Path):
    with dedicated_cluster(
        nanny=False, n_workers=2, DASK_DISTRIBUTED__SCHEDULER__WORKER_TTL="3s"
    ) as cluster:
        assert cluster.address is not None
        with Client(cluster.address, set_as_default=False) as client:
            wait_for_workers(client, 2)
            futures = client.map(sleep_then, range(60), [0.05] * 60, pure=False)
            wait_until(
                lambda: sum(f.done() for f in futures) >= 10,
                60,
                lambda: "no progress before the stop",
            )
            victim = cluster.workers[0]
            [victim_address] = [a for a, p in worker_pids(client).items() if p == victim.popen.pid]
            os.kill(victim.popen.pid, signal.SIGSTOP)
            try:
                # A spare, so that the test does not depend on the other worker's heartbeats
                # keeping within the short TTL on a loaded machine.
                cluster.add_worker()
                wait_until(
                    lambda: victim_address not in client.nthreads(),
                    30,
                    lambda: f"the stopped worker is still registered: {client.nthreads()}",
                )
                assert client.gather(futures) == list(range(60))
            finally:
                os.kill(victim.popen.pid, signal.SIGCONT)
            # Woken up, the removed worker learns it was closed and exits by itself.
            victim.popen.wait(30)
            futures.clear()
            assert_cluster_clean(client)


# ------------------------------------------------------------------------- shutdown
def test_scheduler_sigterm_closes_workers_and_clients():
    with dedicated_cluster(nanny=True, n_workers=2) as cluster:
        assert cluster.address is not None and cluster.scheduler is not None
        client = Client(cluster.address, set_as_default=False)
        try:
            # Running when the scheduler goes (a worker finishes its running task on close).
            pending = client.submit(sleep_then, 1, 3, pure=False)
            wait_until(
                lambda: any(client.processing().values()),
                30,
                lambda: "the task never started",
            )
            cluster.scheduler.request_stop()  # SIGTERM
            cluster.scheduler.popen.wait(30)
            assert cluster.scheduler.popen.returncode == 0, cluster.scheduler.describe()
            # Every `dask worker` process (nanny and worker) exits on the scheduler's close.
            for worker in cluster.workers:
                worker.popen.wait(30)
            # The client notices that its scheduler is gone.
            wait_until(
                lambda: client.status != "running",
                30,
                lambda: f"client status is still {client.status}",
            )
            # ... and cancels what it was waiting for instead of waiting forever.
            wait_until(pending.cancelled, 30, lambda: f"future is {pending.status}")
        finally:
            client.close(timeout=5)
