"""Client APIs served by the scheduler's own state, end to end.

``Client.set_metadata`` / ``get_metadata``, ``get_task_stream`` (and the
``get_task_stream`` context manager), ``recreate_error_locally`` /
``recreate_task_locally``, ``story``, ``replicate``, ``rebalance``, ``client.amm`` and
``Worker.set_resources`` against real ``dask worker`` processes. The same tests run
against ``dask scheduler`` (``DSCHED_TEST_SCHEDULER=dask``), which is how the expected
behaviour was checked. Every wait waits for a condition, with a bound.
"""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from distributed import Client, get_task_stream, wait

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

SCHEDULER_KIND = os.environ.get("DSCHED_TEST_SCHEDULER", "dsched")

WAIT_S = 30
WaitUntil = Callable[[Callable[[], bool], float, Callable[[], str]], None]


def inc(x: int) -> int:
    return x + 1


def div(x: int, y: int) -> float:
    return x / y


def slow_inc(x: int, delay: float) -> int:
    time.sleep(delay)
    return x + 1


def total(*xs: int) -> int:
    return sum(xs)


def blob(i: int, size: int) -> bytes:
    return bytes([i % 256]) * size


async def offer_foo(dask_worker: Any) -> None:
    await dask_worker.set_resources(FOO=1)


@pytest.fixture
def amm_stopped(client: Client) -> Iterator[None]:
    """The active memory manager (on by default in Dask's config) stopped for the test,
    started again afterwards."""
    client.amm.stop()
    try:
        yield
    finally:
        client.amm.start()


def test_metadata_nested_default_and_forgotten(client: Client, wait_until: WaitUntil) -> None:
    name = f"meta-{uuid.uuid4().hex}"
    client.set_metadata(name, 123)
    assert client.get_metadata(name) == 123
    client.set_metadata([name, "a", "b"], 1)  # 123 is no dict: replaced by one
    assert client.get_metadata(name) == {"a": {"b": 1}}
    assert client.get_metadata([name, "a"]) == {"b": 1}
    assert client.get_metadata([name, "missing"], default="dflt") == "dflt"
    with pytest.raises(KeyError):
        client.get_metadata([name, "missing"])
    # Metadata of a task goes when the task is forgotten.
    future = client.submit(inc, 1, key=f"task-{name}")
    assert future.result(timeout=WAIT_S) == 2
    client.set_metadata(future.key, {"x": 1})
    assert client.get_metadata(future.key) == {"x": 1}
    key = future.key
    del future
    wait_until(
        lambda: client.get_metadata(key, default=None) is None,
        WAIT_S,
        lambda: f"metadata of {key} still {client.get_metadata(key, default=None)!r}",
    )
    assert client.get_metadata(name) == {"a": {"b": 1}}  # not a task: stays


def test_task_stream_records_results_and_errors(client: Client) -> None:
    client.get_task_stream()  # the task stream records from its first use on
    with get_task_stream(client=client) as ts:
        good = client.submit(inc, 10, key=f"ts-good-{uuid.uuid4().hex}")
        bad = client.submit(div, 1, 0, key=f"ts-bad-{uuid.uuid4().hex}")
        assert good.result(timeout=WAIT_S) == 11
        wait([bad], timeout=WAIT_S)
    by_key = {record["key"]: record for record in ts.data}
    assert set(by_key) == {good.key, bad.key}
    ok = by_key[good.key]
    assert set(ok) == {
        "key", "worker", "nbytes", "type", "typename", "metadata", "thread", "startstops",
        "status", "stimulus_id",
    }  # fmt: skip
    assert set(by_key[bad.key]) == {
        "key", "cause", "worker", "exception", "traceback", "exception_text",
        "traceback_text", "thread", "startstops", "status", "stimulus_id",
    }  # fmt: skip
    assert ok["status"] == "OK"
    assert ok["worker"] in client.nthreads()
    assert ok["typename"] == "int"
    assert ok["nbytes"] > 0
    assert isinstance(ok["metadata"], dict)
    assert any(s["action"] == "compute" for s in ok["startstops"])
    assert "thread" in ok
    erred = by_key[bad.key]
    assert erred["status"] == "error"
    assert "ZeroDivisionError" in erred["exception_text"] or "division" in erred["exception_text"]
    assert any(s["action"] == "compute" for s in erred["startstops"])
    recent = client.get_task_stream(count=2)
    assert {record["key"] for record in recent} == {good.key, bad.key}


def test_recreate_error_and_task_locally(client: Client) -> None:
    # Tasks without future inputs: for those, the client holds the inputs with an empty
    # update-graph, which Dask's scheduler fails too (a plain dict is not an expression).
    y = client.submit(div, 1, 0)
    wait([y], timeout=WAIT_S)
    assert y.status == "error"
    with pytest.raises(ZeroDivisionError):
        client.recreate_error_locally(y)
    z = client.submit(div, 4, 2)
    assert z.result(timeout=WAIT_S) == 2.0
    assert client.recreate_task_locally(z) == 2.0


def test_story_has_the_scheduler_transitions(client: Client) -> None:
    future = client.submit(inc, 1, key=f"story-{uuid.uuid4().hex}")
    assert future.result(timeout=WAIT_S) == 2
    story = client.story(future.key)
    scheduler = [entry for entry in story if entry[0] == "scheduler"]
    assert scheduler, story
    assert all(len(entry) == 7 and entry[1] == future.key for entry in scheduler)
    assert any(entry[3] == "memory" for entry in scheduler)
    assert all(isinstance(entry[4], dict) and isinstance(entry[6], float) for entry in scheduler)
    assert any(entry[0] in client.nthreads() for entry in story)  # the workers' stories


@pytest.mark.usefixtures("amm_stopped")
def test_replicate_then_amm_reduces_replicas(client: Client, wait_until: WaitUntil) -> None:
    assert client.amm.running() is False
    futures = client.map(inc, range(5), key=[f"repl-{uuid.uuid4().hex}" for _ in range(5)])
    wait(futures, timeout=WAIT_S)
    client.replicate(futures, n=2)
    who_has = client.who_has(futures)
    assert all(len(holders) == 2 for holders in who_has.values()), who_has
    client.amm.run_once()
    wait_until(
        lambda: all(len(h) == 1 for h in client.who_has(futures).values()),
        WAIT_S,
        lambda: f"{client.who_has(futures)}",
    )
    assert client.gather(futures) == [1, 2, 3, 4, 5]
    client.amm.start()
    assert client.amm.running() is True


def test_amm_is_running_by_default(client: Client) -> None:
    assert client.amm.running() is True


def test_results_are_right_while_the_amm_drops_replicas(client: Client) -> None:
    """Several AMM cycles (every 2 s by default) during a computation whose tasks fetch
    their inputs from both workers, creating replicas for the AMM to drop."""
    assert client.amm.running() is True
    keys = [f"amm-r{i}-{uuid.uuid4().hex}" for i in range(40)]
    roots = client.map(slow_inc, range(40), delay=0.1, key=keys)
    layer = [
        client.submit(total, *roots[i : i + 4], key=f"amm-s{i}-{uuid.uuid4().hex}")
        for i in range(0, 40, 2)
    ]
    final = client.submit(total, *layer, key=f"amm-t-{uuid.uuid4().hex}")
    expected = sum(sum(range(i + 1, min(i + 4, 40) + 1)) for i in range(0, 40, 2))
    assert final.result(timeout=WAIT_S) == expected
    assert client.gather(layer[:3]) == [1 + 2 + 3 + 4, 3 + 4 + 5 + 6, 5 + 6 + 7 + 8]


def _set_rebalance_measure(dask_scheduler: Any, measure: str) -> str:
    previous = str(dask_scheduler.MEMORY_REBALANCE_MEASURE)
    dask_scheduler.MEMORY_REBALANCE_MEASURE = measure
    return previous


@pytest.fixture
def managed_rebalance(client: Client, scheduler_kind: str) -> Iterator[None]:
    """dsched's rebalance measures managed memory (the sizes of the keys held); the
    reference is set to the same measure (Dask's default, "optimistic", counts process
    memory from heartbeats, and ignores fresh data for 30 s)."""
    if scheduler_kind == "dsched":
        yield
        return
    previous = client.run_on_scheduler(_set_rebalance_measure, measure="managed")
    try:
        yield
    finally:
        client.run_on_scheduler(_set_rebalance_measure, measure=previous)


@pytest.mark.usefixtures("amm_stopped", "managed_rebalance")
def test_rebalance_spreads_data(client: Client) -> None:
    workers = sorted(client.nthreads())
    size = 10 * 2**20
    futures = [
        client.submit(blob, i, size, workers=[workers[0]], key=f"rebal-{i}-{uuid.uuid4().hex}")
        for i in range(12)
    ]
    wait(futures, timeout=WAIT_S)
    assert all(list(holders) == [workers[0]] for holders in client.who_has(futures).values())
    client.rebalance(futures)
    who_has = client.who_has(futures)
    assert all(len(holders) == 1 for holders in who_has.values()), who_has
    per_worker = {w: sum(1 for h in who_has.values() if list(h) == [w]) for w in workers}
    assert all(count > 0 for count in per_worker.values()), per_worker
    assert [len(b) for b in client.gather(futures)] == [size] * 12


def test_set_resources_lets_a_task_run(client: Client) -> None:
    worker = sorted(client.nthreads())[1]
    client.run(offer_foo, workers=[worker])
    info = client.scheduler_info()["workers"][worker]
    assert info["resources"].get("FOO") == 1
    future = client.submit(inc, 41, resources={"FOO": 1}, key=f"foo-{uuid.uuid4().hex}")
    assert future.result(timeout=WAIT_S) == 42
    assert list(client.who_has(future)[future.key]) == [worker]


@pytest.mark.skipif(
    SCHEDULER_KIND != "dsched",
    reason="Dask's scheduler errs the inputs on the client's empty dict graph (a race with the "
    "client's gather); dsched takes it as the empty graph the client means",
)
def test_recreate_a_task_with_future_inputs(client: Client) -> None:
    x = client.submit(div, 6, 3)
    y = client.submit(div, x, 0)
    wait([y], timeout=WAIT_S)
    with pytest.raises(ZeroDivisionError):
        client.recreate_error_locally(y)
    z = client.submit(div, x, 1)
    assert client.recreate_task_locally(z) == 2.0
    assert x.result(timeout=WAIT_S) == 2.0  # the inputs were not erred by it
