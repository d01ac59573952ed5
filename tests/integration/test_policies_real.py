"""A representative subset of the core workloads with every policy, on real clusters.

Each parameter gets its own short-lived cluster (dsched with ``--policy NAME``, two
single-thread `dask worker` processes), so a policy that loses a task or misplaces a
restricted one fails here, and so does one that leaves the state machine inconsistent
(``dsched_info`` runs ``validate()`` once at the end of every test). The full core suite
runs with any policy via ``DSCHED_TEST_SCHEDULER_ARGS="--policy NAME"``.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import dask
import dask.array as da
import numpy as np
import pytest
from dask import delayed
from distributed import Client

from dsched.testing.cluster import ProcessCluster
from dsched.testing.workloads import inc, merge_all, times_ten

pytestmark = [pytest.mark.integration, pytest.mark.timeout(150)]

RESULT_TIMEOUT_S = 60

CONFIGS = {
    "locality": ["--policy", "locality"],
    "random": ["--policy", "random"],
    "workstealing": ["--policy", "workstealing"],
    "blevel": ["--policy", "blevel"],
    "dask": ["--policy", "dask"],
    "workstealing-process": ["--policy", "workstealing", "--policy-process"],
}


def slow_add(x: int, y: int) -> int:
    time.sleep(0.02)
    return x + y


def fail(x: int) -> int:
    raise ValueError(f"bad {x}")


@pytest.fixture(params=sorted(CONFIGS), scope="module")
def config(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture(scope="module")
def client(config: str) -> Iterator[Client]:
    with (
        ProcessCluster(
            scheduler_kind="dsched",
            n_workers=2,
            scheduler_args=CONFIGS[config],
            extra_pythonpath=[Path(__file__).parent],
        ) as cluster,
        dask.config.set({"dataframe.shuffle.method": "tasks", "array.rechunk.method": "tasks"}),
        Client(cluster.address, timeout=30) as c,
    ):
        yield c
        info = c.sync(c.scheduler.dsched_info)
        assert info.get("valid", True), info


def test_merge_map_array_errors_and_restrictions(client: Client) -> None:
    n = 1000
    total = delayed(merge_all)(*[delayed(times_ten)(x) for x in range(n)])
    assert client.compute(total).result(timeout=RESULT_TIMEOUT_S) == 10 * sum(range(n))

    futures = client.map(inc, range(300))
    assert client.gather(futures) == list(range(1, 301))
    del futures

    x = da.random.RandomState(0).random((200, 200), chunks=(50, 50))
    expected = np.asarray(x) + np.asarray(x).T
    assert np.allclose(client.compute((x + x.T).sum()).result(RESULT_TIMEOUT_S), expected.sum())

    with pytest.raises(ValueError, match="bad 3"):
        client.submit(fail, 3).result(RESULT_TIMEOUT_S)

    workers = sorted(client.nthreads())
    pinned = client.map(inc, range(20), workers=[workers[1]], key=[f"pin-{i}" for i in range(20)])
    client.gather(pinned)
    who_has = client.who_has(pinned)
    assert {w for holders in who_has.values() for w in holders} == {workers[1]}


def test_tasks_piled_on_one_worker_spread_out(client: Client, config: str) -> None:
    """Every task's input lives on one worker; locality-first policies put them all there,
    and work stealing (real steal-request/steal-response with dask workers) moves some."""
    workers = sorted(client.nthreads())
    [seed] = client.scatter([1], workers=[workers[0]])
    futures = [client.submit(slow_add, seed, i, pure=False) for i in range(60)]
    assert client.gather(futures) == [1 + i for i in range(60)]
    if config.startswith("workstealing"):
        # Placement alone puts all 60 on workers[0]: the other one only gets stolen tasks.
        computed_on = {w for holders in client.who_has(futures).values() for w in holders}
        assert workers[1] in computed_on
    # Whatever the policy, the graph finishes and the cluster is consistent.
    info = client.sync(client.scheduler.dsched_info)
    assert info.get("valid", True), info
