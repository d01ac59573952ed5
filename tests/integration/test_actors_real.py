"""Actors against real clients and workers: ``submit(cls, actor=True)``.

The client's ``Actor`` handle calls methods and reads attributes on the worker holding the
instance; with ``direct_to_workers`` unset (the default) every call goes through the
scheduler's ``proxy`` RPC. Actors are placed on the worker with the fewest actors, and an
actor whose worker dies errs (it is not recomputed) and the client sees it.

(Named ``_real`` because tests/unit/test_actors.py already takes the module name.)
"""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest
from distributed import Actor, Client

from conftest import CONNECT_TIMEOUT_S, SCHEDULER_KIND, assert_cluster_is_clean, wait_until
from dsched.testing.cluster import ProcessCluster

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

HERE = Path(__file__).parent


class Counter:
    """The actor of Dask's documentation."""

    n = 0

    def __init__(self, start: int = 0) -> None:
        self.n = start

    def increment(self, by: int = 1) -> int:
        self.n += by
        return self.n


def worker_pids(client: Client) -> dict[str, int]:
    return client.run(os.getpid)  # type: ignore[no-any-return]


def test_an_actor_works_through_the_scheduler_from_two_clients(
    client: Client, cluster_address: str
) -> None:
    future = client.submit(Counter, 10, actor=True)
    counter = future.result(timeout=30)
    assert isinstance(counter, Actor)
    assert counter.increment().result(timeout=30) == 11
    assert counter.increment(5).result(timeout=30) == 16
    assert counter.n == 16
    # A second client reaches the same instance (same worker, same state). (Through a
    # dataset: in Dask, a bare Future(key, client=other) of an actor never resolves.)
    client.publish_dataset(counter=future)
    with Client(cluster_address, timeout=CONNECT_TIMEOUT_S, set_as_default=False) as other:
        theirs = other.get_dataset("counter").result(timeout=30)
        assert isinstance(theirs, Actor)
        assert theirs.increment().result(timeout=30) == 17
        assert theirs.increment(3).result(timeout=30) == 20
        assert theirs.n == 20
        del theirs
    client.unpublish_dataset("counter")
    assert counter.n == 20
    del counter
    future.release()


def test_actors_go_to_the_worker_with_the_fewest_actors(client: Client) -> None:
    futures = [client.submit(Counter, i, actor=True) for i in range(4)]
    client.gather(futures)
    holders = [next(iter(h)) for h in client.who_has(futures).values()]
    assert sorted(holders.count(w) for w in set(holders)) == [2, 2], holders
    # Methods work on each, wherever it is.
    assert [f.result().increment().result(timeout=30) for f in futures] == [1, 2, 3, 4]
    for f in futures:
        f.release()


@pytest.fixture
def own_cluster() -> Iterator[ProcessCluster]:
    """Two workers without nannies: a worker killed here stays dead (the session's cluster
    must keep its two workers)."""
    with ProcessCluster(
        scheduler_kind=SCHEDULER_KIND,
        n_workers=2,
        nanny=False,
        scheduler_args=["--validate"] if SCHEDULER_KIND == "dsched" else [],
        extra_pythonpath=[HERE],
    ) as started:
        yield started


def test_an_actor_whose_worker_is_killed_errs_and_the_client_sees_it(
    own_cluster: ProcessCluster,
) -> None:
    assert own_cluster.address is not None
    # (The default client: an Actor handle binds to it.)
    with Client(own_cluster.address, timeout=CONNECT_TIMEOUT_S) as client:
        future = client.submit(Counter, actor=True)
        counter = future.result(timeout=30)
        assert counter.increment().result(timeout=30) == 1
        (home,) = client.who_has([future])[future.key]
        os.kill(worker_pids(client)[home], signal.SIGKILL)
        wait_until(
            lambda: future.status == "error",
            30,
            lambda: f"the actor's future is {future.status}\n" + own_cluster.describe_processes(20),
        )
        with pytest.raises(RuntimeError, match="Worker holding Actor was lost"):
            future.result(timeout=10)
        # The handle refuses to talk to a lost actor.
        with pytest.raises(RuntimeError, match="Worker holding Actor was lost"):
            _ = counter.n
        # It was not recomputed: the surviving worker holds nothing.
        wait_until(lambda: len(client.nthreads()) == 1, 30, lambda: "the worker stays")
        assert not any(client.has_what().values())
        future.release()
        del counter
        assert_cluster_is_clean(own_cluster, own_cluster.address)
