"""Fixtures for fault-injection tests: clusters whose workers the tests may kill.

Each cluster here is private to this directory (the integration suite's shared cluster must
never lose a worker). ``--chaos-seeds N`` runs every randomized chaos test with N seeds
(default 1; the seeds are 0..N-1, so a failure is reproduced with the same N).
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from dsched.testing.cluster import ProcessCluster

SCHEDULER_KIND = os.environ.get("DSCHED_TEST_SCHEDULER", "dsched")
N_WORKERS = 2


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--chaos-seeds",
        type=int,
        default=1,
        help="how many seeds each randomized chaos test runs with (default 1)",
    )


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "seed" in metafunc.fixturenames:
        metafunc.parametrize("seed", range(metafunc.config.getoption("--chaos-seeds")))


def _cluster(nanny: bool, **kwargs: object) -> ProcessCluster:
    return ProcessCluster(
        scheduler_kind=SCHEDULER_KIND,
        n_workers=N_WORKERS,
        threads_per_worker=1,
        nanny=nanny,
        scheduler_args=["--validate"] if SCHEDULER_KIND == "dsched" else [],
        **kwargs,  # type: ignore[arg-type]
    )


@pytest.fixture(scope="session")
def nanny_cluster() -> Iterator[ProcessCluster]:
    """Two `dask worker`s under nannies: a killed worker process comes back, re-registered."""
    with _cluster(nanny=True) as cluster:
        yield cluster


@pytest.fixture(scope="session")
def bare_cluster() -> Iterator[ProcessCluster]:
    """Two `dask worker --no-nanny`s: a killed worker is replaced by a new process."""
    with _cluster(nanny=False) as cluster:
        yield cluster
