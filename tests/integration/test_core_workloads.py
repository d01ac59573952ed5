"""Acceptance workloads: what an unmodified Dask user does, with correct results.

Each test gets a fresh Client on a shared cluster (see conftest.py), and the fixture asserts
afterwards that the scheduler and the workers hold nothing any more.

Task functions are module-level on purpose: Dask pickles them by reference, and the cluster
fixture puts this directory on the workers' and the scheduler's PYTHONPATH.
"""

from __future__ import annotations

import collections
import operator
import time
from collections.abc import Callable
from concurrent.futures import CancelledError
from pathlib import Path

import dask
import dask.array as da
import dask.bag as db
import dask.dataframe as dd
import numpy as np
import pandas as pd
import pytest
from dask import delayed
from distributed import Client, fire_and_forget, wait

from dsched.testing.workloads import inc, merge_all, times_ten

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

# The `wait_until` fixture: poll a condition until true, fail with a description on timeout.
WaitUntil = Callable[[Callable[[], bool], float, Callable[[], str]], None]

# Upper bound for any single result; the pytest timeout is the backstop for the whole test.
RESULT_TIMEOUT_S = 90
# How long a blocking task waits for the test to release it before giving up by itself, so a
# test that dies early cannot occupy a worker thread for the rest of the session.
BLOCKING_TASK_LIMIT_S = 60


def divide(numerator: float, denominator: float) -> float:
    return numerator / denominator


def raise_value_error(message: str) -> None:
    raise ValueError(message)


def block_until_released(started_marker: str, release_marker: str) -> str:
    """Announce that the task runs, then wait (bounded) until the test creates release_marker."""
    Path(started_marker).touch()
    deadline = time.monotonic() + BLOCKING_TASK_LIMIT_S
    while not Path(release_marker).exists():
        if time.monotonic() > deadline:
            return "gave up waiting"
        time.sleep(0.01)
    return "released"


def write_text(path: str, text: str) -> None:
    Path(path).write_text(text)


def test_delayed_merge_of_10k_tasks(client: Client) -> None:
    n = 10_000
    total = delayed(merge_all)(*[delayed(times_ten)(x) for x in range(n)])
    assert client.compute(total).result(timeout=RESULT_TIMEOUT_S) == 10 * sum(range(n))


def test_map_10k_and_gather(client: Client) -> None:
    n = 10_000
    futures = client.map(inc, range(n))
    assert client.gather(futures) == list(range(1, n + 1))


def test_a_big_graph_over_persisted_data(client: Client) -> None:
    """Both graphs exceed dsched's part size (5,000 tasks), so each is taken in as parts;
    the second needs the first's 12,000 results across all of its parts."""
    x = da.arange(12_000, chunks=1).persist()
    total = (x + 1).sum(split_every=4)
    assert total.compute(timeout=RESULT_TIMEOUT_S) == sum(range(1, 12_001))
    del x


def test_chain_of_submits(client: Client) -> None:
    # Every submit is its own update-graph that depends on the previous, still-running future.
    length = 300
    future = client.submit(inc, 0)
    for _ in range(length - 1):
        future = client.submit(inc, future)
    assert future.result(timeout=RESULT_TIMEOUT_S) == length


def test_scatter_list_then_map(client: Client) -> None:
    scattered = client.scatter([10, 20, 30])
    assert client.gather(client.map(inc, scattered)) == [11, 21, 31]
    assert client.submit(merge_all, *scattered).result(timeout=RESULT_TIMEOUT_S) == 60


def test_scatter_dict_keeps_keys(client: Client) -> None:
    scattered = client.scatter({"scatter-a": 1, "scatter-b": 2})
    assert set(scattered) == {"scatter-a", "scatter-b"}
    assert scattered["scatter-a"].key == "scatter-a"
    total = client.submit(operator.add, scattered["scatter-a"], scattered["scatter-b"])
    assert total.result(timeout=RESULT_TIMEOUT_S) == 3


def test_scatter_broadcast_reaches_every_worker(client: Client) -> None:
    [shared] = client.scatter([list(range(100))], broadcast=True)
    holders = client.who_has([shared])[shared.key]
    assert set(holders) == set(client.nthreads())
    # The broadcast value can be used as an input on any worker.
    results = client.gather(client.map(operator.getitem, [shared] * 10, range(10), pure=False))
    assert results == list(range(10))


def test_exception_arrives_with_type_and_message(client: Client) -> None:
    failing = client.submit(divide, 1, 0)
    with pytest.raises(ZeroDivisionError, match="division by zero"):
        failing.result(timeout=RESULT_TIMEOUT_S)
    assert failing.status == "error"

    # A task downstream of the failure fails with the original error, without running.
    dependent = client.submit(inc, failing)
    with pytest.raises(ZeroDivisionError, match="division by zero"):
        dependent.result(timeout=RESULT_TIMEOUT_S)

    custom = client.submit(raise_value_error, "custom message 31337")
    with pytest.raises(ValueError, match="custom message 31337"):
        custom.result(timeout=RESULT_TIMEOUT_S)


def test_cancel_running_task(client: Client, tmp_path: Path, wait_until: WaitUntil) -> None:
    started = tmp_path / "started"
    release = tmp_path / "release"
    blocking = client.submit(block_until_released, str(started), str(release), pure=False)
    try:
        # Cancel it while it is actually running on a worker, not while it is still queued.
        wait_until(started.exists, RESULT_TIMEOUT_S, lambda: "the blocking task never started")
        client.cancel(blocking)
        assert blocking.cancelled()
        with pytest.raises(CancelledError):
            blocking.result(timeout=RESULT_TIMEOUT_S)
    finally:
        # A worker thread cannot be interrupted; let it finish so the worker frees its slot.
        release.touch()
    # The cluster keeps working after the cancellation.
    assert client.submit(inc, 41, pure=False).result(timeout=RESULT_TIMEOUT_S) == 42


def test_array_reductions_and_matmul(client: Client) -> None:
    x = da.random.default_rng(42).random((1000, 800), chunks=(250, 200))
    values, total, mean, gram = client.compute([x, x.sum(), x.mean(), x @ x.T], sync=True)
    # The random draws are fixed when the graph is built, so `values` is the array the
    # reductions ran over.
    assert values.shape == (1000, 800)
    np.testing.assert_allclose(total, values.sum())
    np.testing.assert_allclose(mean, values.mean())
    np.testing.assert_allclose(gram, values @ values.T)


def test_bag_word_count(client: Client) -> None:
    lines = [f"alpha beta {'gamma ' * (i % 3)}delta{i % 5}" for i in range(1000)]
    counts = db.from_sequence(lines, npartitions=8).map(str.split).flatten().frequencies()
    result = dict(client.compute(counts, sync=True))
    assert result == dict(collections.Counter(word for line in lines for word in line.split()))


def test_dataframe_groupby_agg(client: Client) -> None:
    rng = np.random.default_rng(7)
    pdf = pd.DataFrame({"key": rng.integers(0, 50, 20_000), "value": rng.random(20_000)})
    ddf = dd.from_pandas(pdf, npartitions=8)
    expected = pdf.groupby("key")["value"].agg(["sum", "mean", "count"])

    tree_reduced = ddf.groupby("key")["value"].agg(["sum", "mean", "count"])
    pd.testing.assert_frame_equal(client.compute(tree_reduced, sync=True).sort_index(), expected)

    # split_out > 1 makes the aggregation shuffle its output partitions.
    shuffled = ddf.groupby("key")["value"].agg(
        ["sum", "mean", "count"], split_out=3, shuffle_method="tasks"
    )
    pd.testing.assert_frame_equal(client.compute(shuffled, sync=True).sort_index(), expected)


def test_dataframe_merge_with_task_shuffle(client: Client) -> None:
    left = pd.DataFrame({"key": np.arange(3000) % 500, "left_value": np.arange(3000)})
    right = pd.DataFrame({"key": np.arange(0, 1000, 2), "right_value": np.arange(500) * 2.5})
    merged = dd.merge(
        dd.from_pandas(left, npartitions=6),
        dd.from_pandas(right, npartitions=4),
        on="key",
        # A hash join that shuffles both sides through tasks, not a broadcast join.
        shuffle_method="tasks",
        broadcast=False,
    )
    result = client.compute(merged, sync=True)
    expected = left.merge(right, on="key")
    order = ["key", "left_value"]
    pd.testing.assert_frame_equal(
        result.sort_values(order).reset_index(drop=True),
        expected.sort_values(order).reset_index(drop=True),
    )


def test_who_has_has_what_nthreads(client: Client) -> None:
    nthreads = client.nthreads()
    assert len(nthreads) == 2
    assert all(count == 1 for count in nthreads.values())
    workers = set(nthreads)

    futures = client.map(inc, range(20))
    wait(futures, timeout=RESULT_TIMEOUT_S)
    keys = {future.key for future in futures}

    who_has = client.who_has(futures)
    assert set(who_has) == keys
    assert all(holders and set(holders) <= workers for holders in who_has.values())

    has_what = client.has_what()
    assert set(has_what) == workers
    held = {key for worker_keys in has_what.values() for key in worker_keys}
    assert keys <= held
    # The two views agree.
    for key, holders in who_has.items():
        assert all(key in has_what[worker] for worker in holders)


def test_fire_and_forget_runs_to_completion(
    client: Client, tmp_path: Path, wait_until: WaitUntil
) -> None:
    marker = tmp_path / "fired"
    fire_and_forget(client.submit(write_text, str(marker), "done", pure=False))
    # The client keeps no future; the side effect is the only evidence that the task ran.
    wait_until(
        lambda: marker.exists() and marker.read_text() == "done",
        RESULT_TIMEOUT_S,
        lambda: "the fire-and-forget task did not run",
    )


def test_dask_compute_uses_the_client_as_default(client: Client) -> None:
    # Users mostly call .compute() and let the Client they created be the scheduler.
    assert dask.compute(delayed(inc)(1), delayed(times_ten)(2)) == (2, 20)
