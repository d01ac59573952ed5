"""``Client.run_on_scheduler`` (op ``run_function``) and ``distributed.progress`` (op
``feed``) end to end: real Clients and `dask worker`s.

Functions read ``dask_scheduler.tasks`` / ``workers`` (the facade on dsched, the real
Scheduler on Dask), sync and async, with and without ``dask_scheduler``; an exception
raised in the scheduler reaches the caller with its type; ``wait=False`` returns None at
once. ``progress()`` draws the text bar to the end for a small graph, and stops on an
erred task. ``DSCHED_TEST_SCHEDULER=dask`` runs the same tests against `dask scheduler`.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import re
import time
from typing import Any

import pytest
from distributed import Client, progress, wait

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

WAIT_S = 30


def inc(x: int) -> int:
    return x + 1


def add(x: int, y: int) -> int:
    return x + y


def slow_inc(x: int) -> int:
    time.sleep(0.05)
    return x + 1


def fail(x: int) -> int:
    raise ZeroDivisionError(f"no {x}")


def task_states(dask_scheduler: Any, keys: list[Any]) -> dict[Any, Any]:
    return {
        key: (
            dask_scheduler.tasks[key].state,
            sorted(ws.address for ws in dask_scheduler.tasks[key].who_has),
            sorted(dts.key for dts in dask_scheduler.tasks[key].dependencies),
        )
        for key in keys
    }


def worker_summary(dask_scheduler: Any) -> dict[str, Any]:
    return {
        address: (ws.address, ws.nthreads, ws.host, str(ws.status).split(".")[-1])
        for address, ws in dask_scheduler.workers.items()
    }


async def async_worker_count(dask_scheduler: Any) -> int:
    await asyncio.sleep(0)
    return len(dask_scheduler.workers)


def plain(a: int, b: int = 0) -> int:
    return a * 10 + b


def raises_in_scheduler(dask_scheduler: Any) -> None:
    raise KeyError("from the scheduler")


def test_run_on_scheduler_reads_tasks_and_workers(client: Client) -> None:
    x = client.submit(inc, 1, key="ros-x")
    y = client.submit(add, x, 2, key="ros-y")
    assert y.result(timeout=WAIT_S) == 4
    states = client.run_on_scheduler(task_states, keys=["ros-x", "ros-y"])
    assert states["ros-y"][0] == "memory"
    assert states["ros-y"][2] == ["ros-x"]
    assert len(states["ros-y"][1]) == 1
    workers = client.run_on_scheduler(worker_summary)
    assert set(workers) == set(client.nthreads())
    for address, (addr, nthreads, host, status) in workers.items():
        assert addr == address and nthreads == 1 and host == "127.0.0.1"
        assert status == "running"
    del x, y


def test_run_on_scheduler_sync_async_and_arguments(client: Client) -> None:
    assert client.run_on_scheduler(async_worker_count) == 2
    assert client.run_on_scheduler(plain, 4, b=2) == 42
    assert client.run_on_scheduler(lambda dask_scheduler: dask_scheduler.address) == (
        client.scheduler.address
    )


def test_run_on_scheduler_errors_reach_the_caller(client: Client) -> None:
    with pytest.raises(KeyError, match="from the scheduler"):
        client.run_on_scheduler(raises_in_scheduler)
    # The scheduler keeps serving.
    assert client.run_on_scheduler(plain, 1) == 10


def test_run_on_scheduler_without_waiting(client: Client, wait_until: Any) -> None:
    async def set_marker(dask_scheduler: Any) -> None:
        dask_scheduler._dsched_test_marker = "set"

    assert client.run_on_scheduler(set_marker, wait=False) is None

    def marker(dask_scheduler: Any) -> Any:
        return getattr(dask_scheduler, "_dsched_test_marker", None)

    wait_until(lambda: client.run_on_scheduler(marker) == "set", WAIT_S, lambda: "no marker")


def test_progress_text_bar_runs_to_completion(client: Client) -> None:
    xs = client.map(inc, range(20), key=[f"prog-x-{i}" for i in range(20)])
    total = client.submit(sum, xs, key="prog-total")
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        progress(total, interval="20ms")
    assert total.result(timeout=WAIT_S) == sum(range(1, 21))
    assert "100% Completed" in out.getvalue()
    del xs, total


def test_progress_follows_a_running_graph(client: Client) -> None:
    """The bar starts while tasks still run, so the Progress plugin's transition hook in
    the scheduler is what moves it to the end."""
    xs = client.map(slow_inc, range(40), key=[f"prog-slow-{i}" for i in range(40)])
    total = client.submit(sum, xs, key="prog-slow-total")
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        progress(total, interval="20ms")
    assert total.status == "finished"
    assert "100% Completed" in out.getvalue()
    # It was drawn part-way too: the scheduler-side Progress saw tasks finish one by one.
    assert len(set(re.findall(r"(\d+)% Completed", out.getvalue()))) >= 2
    del xs, total


def test_progress_stops_on_an_erred_task(client: Client) -> None:
    bad = client.submit(fail, 1, key="prog-bad")
    after = client.submit(inc, bad, key="prog-after")
    wait([after], timeout=WAIT_S)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        progress(after, interval="20ms")
    assert after.status == "error"
    del bad, after
