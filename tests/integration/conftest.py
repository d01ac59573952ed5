"""Fixtures that run the acceptance workloads against a real scheduler process.

The scheduler under test comes from the environment, so the same tests validate dsched and
stock Dask:

    DSCHED_TEST_SCHEDULER=dsched   (default) `python -m dsched scheduler`
    DSCHED_TEST_SCHEDULER=dask     `dask scheduler`, the reference behaviour
    DSCHED_TEST_SCHEDULER_ARGS     extra scheduler arguments, shell-quoted (dsched only)

Workers and clients are always unmodified `dask worker` processes and `distributed.Client`s.
"""

from __future__ import annotations

import os
import shlex
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import dask
import pytest
from distributed import Client

from dsched.testing.cluster import DASK_SCHEDULER_KINDS, ProcessCluster

SCHEDULER_KIND = os.environ.get("DSCHED_TEST_SCHEDULER", "dsched")
SCHEDULER_ARGS = shlex.split(os.environ.get("DSCHED_TEST_SCHEDULER_ARGS", ""))
N_WORKERS = 2

CONNECT_TIMEOUT_S = 30
# How long a finished test may take to let go of everything: releasing keys is asynchronous.
CLEANUP_DEADLINE_S = 30
_POLL_INTERVAL_S = 0.05

if SCHEDULER_KIND not in ("dsched", *DASK_SCHEDULER_KINDS):
    raise pytest.UsageError(
        f"DSCHED_TEST_SCHEDULER={SCHEDULER_KIND!r}: expected 'dsched' or 'dask'"
    )


def scheduler_task_count(client: Client) -> int:
    """How many tasks the scheduler still tracks (for every client together)."""
    if SCHEDULER_KIND in DASK_SCHEDULER_KINDS:
        return int(client.run_on_scheduler(lambda dask_scheduler: len(dask_scheduler.tasks)))
    info = client.sync(client.scheduler.dsched_info)
    return int(info["tasks"])


def worker_data_counts(client: Client) -> dict[str, int]:
    """How many keys each worker holds in memory, by worker address."""
    return client.run(lambda dask_worker: len(dask_worker.data))


def wait_until(condition: Callable[[], bool], timeout: float, describe: Callable[[], str]) -> None:
    """Poll ``condition`` until it holds; fail with ``describe()`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"not reached within {timeout:g} s: {describe()}")
        time.sleep(_POLL_INTERVAL_S)


@pytest.fixture(name="wait_until")
def wait_until_fixture() -> Callable[[Callable[[], bool], float, Callable[[], str]], None]:
    """The polling helper for tests (test modules should not import conftest)."""
    return wait_until


@pytest.fixture(scope="session")
def scheduler_kind() -> str:
    """DSCHED_TEST_SCHEDULER: "dsched", or "dask"/"dask-inf" (the reference)."""
    return SCHEDULER_KIND


@pytest.fixture(scope="session")
def cluster() -> Iterator[ProcessCluster]:
    """One scheduler and two single-threaded workers (with nannies) for the whole session.

    Session-scoped because starting processes costs seconds; the `client` fixture checks after
    every test that the cluster is empty again, so tests cannot leak state into each other.
    """
    with ProcessCluster(
        scheduler_kind=SCHEDULER_KIND,
        n_workers=N_WORKERS,
        threads_per_worker=1,
        scheduler_args=SCHEDULER_ARGS if SCHEDULER_KIND == "dsched" else (),
        # Tasks reference functions of the test modules by module name (plain pickle does that
        # for importable module-level functions), so the scheduler, which unpickles graphs, and
        # the workers must be able to import the test modules too.
        extra_pythonpath=[Path(__file__).parent],
    ) as started:
        yield started


@pytest.fixture
def cluster_address(cluster: ProcessCluster) -> str:
    assert cluster.address is not None
    return cluster.address


@pytest.fixture
def client(cluster: ProcessCluster, cluster_address: str) -> Iterator[Client]:
    """A fresh Client per test; afterwards, asserts that no task or data is left anywhere."""
    with Client(cluster_address, timeout=CONNECT_TIMEOUT_S) as test_client:
        assert len(test_client.nthreads()) == N_WORKERS, (
            "a worker was lost in an earlier test\n" + cluster.describe_processes()
        )
        yield test_client
    assert_cluster_is_clean(cluster, cluster_address)


@pytest.fixture
def default_client(cluster: ProcessCluster, cluster_address: str) -> Iterator[Client]:
    """A fresh Client with Dask's default configuration (P2P shuffles and rechunks, as a
    user gets them); afterwards, asserts that no task or data is left anywhere."""
    with Client(cluster_address, timeout=CONNECT_TIMEOUT_S) as test_client:
        assert len(test_client.nthreads()) == N_WORKERS, (
            "a worker was lost in an earlier test\n" + cluster.describe_processes()
        )
        assert dask.utils.get_default_shuffle_method() == "p2p"
        yield test_client
    assert_cluster_is_clean(cluster, cluster_address)


def assert_cluster_is_clean(cluster: ProcessCluster, address: str) -> None:
    """Once the test's client is gone, the scheduler and workers must drop everything."""
    with Client(address, timeout=CONNECT_TIMEOUT_S, set_as_default=False) as observer:
        last_seen = "(not polled yet)"

        def is_clean() -> bool:
            nonlocal last_seen
            tasks = scheduler_task_count(observer)
            data = worker_data_counts(observer)
            last_seen = f"scheduler tasks: {tasks}, keys in worker memory: {data}"
            return tasks == 0 and not any(data.values())

        wait_until(
            is_clean,
            CLEANUP_DEADLINE_S,
            lambda: (
                f"cluster not clean after the test ({last_seen})\n"
                + cluster.describe_processes(lines=20)
            ),
        )
