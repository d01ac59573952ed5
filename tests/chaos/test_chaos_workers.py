"""Kill workers (SIGKILL) at random moments while real workloads run; every answer must be
right and the cluster must end empty.

The moments and victims come from ``random.Random(f"{workload}-{seed}")``; the OS decides
where exactly in the graph a kill lands, so each seed explores a neighbourhood of
interleavings rather than one exact schedule. The scheduler runs with ``--validate``, so an
invariant broken by any step fails the scheduler (and then the test) right away.
"""

from __future__ import annotations

import random
import time

import pytest
from distributed import Client

from dsched.testing.cluster import ProcessCluster
from dsched.testing.faults import (
    assert_cluster_clean,
    kill_random_worker,
    wait_for_workers,
)
from dsched.testing.workloads import WORKLOADS, task_shuffle_config

pytestmark = [pytest.mark.integration, pytest.mark.timeout(150)]

N_WORKERS = 2
RESULT_TIMEOUT_S = 120


def run_with_kills(cluster: ProcessCluster, workload: str, seed: int) -> int:
    rng = random.Random(f"{workload}-{seed}")
    assert cluster.address is not None
    with task_shuffle_config(), Client(cluster.address, set_as_default=False) as client:
        wait_for_workers(client, N_WORKERS)
        job = WORKLOADS[workload](seed)
        future = client.compute(job.collection)
        kills = 0
        for _ in range(rng.randint(1, 2)):
            time.sleep(rng.uniform(0.05, 1.0))  # the random moment is the point of the test
            if future.done():
                break
            if kill_random_worker(cluster, client, rng) is not None:
                kills += 1
        try:
            job.check(future.result(timeout=RESULT_TIMEOUT_S))
        except Exception as exc:
            raise AssertionError(
                f"{workload} seed {seed} after {kills} kills: {exc!r}\n"
                + cluster.describe_processes(lines=30)
            ) from exc
        del future
        wait_for_workers(client, N_WORKERS)
        assert_cluster_clean(client)
    return kills


@pytest.mark.parametrize("workload", sorted(WORKLOADS))
def test_worker_killed_under_nanny(nanny_cluster: ProcessCluster, workload: str, seed: int):
    run_with_kills(nanny_cluster, workload, seed)


@pytest.mark.parametrize("workload", sorted(WORKLOADS))
def test_worker_killed_without_nanny(bare_cluster: ProcessCluster, workload: str, seed: int):
    run_with_kills(bare_cluster, workload, seed)
