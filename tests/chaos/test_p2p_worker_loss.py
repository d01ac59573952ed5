"""A worker SIGKILLed in the middle of a P2P shuffle: the answer is still right, and
afterwards neither the scheduler nor any worker holds anything of the shuffle.

The shuffle's inputs are slow (each partition takes a while to make), so the transfer phase
lasts seconds; the kill happens once the scheduler has an active shuffle (transfer phase)
or once the barrier is in memory (unpack phase, which many small output partitions on
single-threaded workers make long enough to land in). The nanny restarts the killed
worker, whose shuffle runs die with it: the scheduler fails the run on the other workers
and restarts the whole shuffle. Validated against ``dask scheduler`` too.
"""

from __future__ import annotations

import os
import signal

import dask.dataframe as dd
import numpy as np
import pandas as pd
import pytest
from distributed import Client

from dsched.testing.cluster import ProcessCluster
from dsched.testing.faults import assert_cluster_clean, wait_for_workers, wait_until, worker_pids
from dsched.testing.p2p import (
    active_shuffles,
    assert_no_shuffle_state,
    barrier_keys,
    partition,
    slow_partition,
    task_state,
)

SCHEDULER_KIND = os.environ.get("DSCHED_TEST_SCHEDULER", "dsched")
pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

N_WORKERS = 2
RESULT_TIMEOUT_S = 120
PARTITIONS = 24


def _kill_one_worker(client: Client) -> str:
    pids = worker_pids(client)
    address = sorted(pids)[0]
    os.kill(pids[address], signal.SIGKILL)  # a child of a nanny the cluster started
    return address


def _run(cluster: ProcessCluster, phase: str) -> None:
    assert cluster.address is not None
    # The default client: with none, dask picks a task-based shuffle over P2P.
    with Client(cluster.address) as client:
        wait_for_workers(client, N_WORKERS)
        collection = dd.from_map(slow_partition, range(PARTITIONS)).set_index(
            "k", npartitions=120 if phase == "unpack" else 8
        )
        (barrier,) = barrier_keys(collection)
        future = client.compute(collection)
        if phase == "transfer":
            wait_until(
                lambda: active_shuffles(client) > 0 or future.done(),
                RESULT_TIMEOUT_S,
                lambda: "the shuffle never became active",
            )
        else:
            wait_until(
                lambda: task_state(client, barrier) == "memory"
                or future.done(),
                RESULT_TIMEOUT_S,
                lambda: "the barrier never finished",
            )
        assert not future.done(), f"the shuffle ended before the {phase} phase could be hit"
        _kill_one_worker(client)
        result = future.result(timeout=RESULT_TIMEOUT_S)
        expected = pd.concat([partition(i) for i in range(PARTITIONS)])
        assert len(result) == len(expected)
        np.testing.assert_array_equal(np.sort(result["i"].to_numpy()), np.sort(expected["i"]))
        assert result.index.is_monotonic_increasing
        if SCHEDULER_KIND == "dsched":
            # (Dask logs this too, but not to the log that get_scheduler_logs reads.)
            logs = [text for _, text in client.get_scheduler_logs(n=1000)]
            assert any("restarted due to stimulus" in text for text in logs), (
                "the shuffle was not restarted: the kill missed it"
            )
        future.release()
        wait_for_workers(client, N_WORKERS)
        assert_no_shuffle_state(client)
        assert_cluster_clean(client)


@pytest.mark.parametrize("phase", ["transfer", "unpack"])
def test_worker_killed_during_a_shuffle(nanny_cluster: ProcessCluster, phase: str) -> None:
    _run(nanny_cluster, phase)
