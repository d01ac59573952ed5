"""P2P shuffles and rechunks with Dask's default configuration (no ``shuffle_method``).

Each collection is checked against pandas or numpy, asserted to contain P2P barriers (so the
test cannot silently fall back to a task-based shuffle), and followed by a check that the
scheduler and every worker let go of every shuffle (runs closed, directories deleted).
Validated against ``dask scheduler`` with ``DSCHED_TEST_SCHEDULER=dask``.
"""

from __future__ import annotations

import time
import traceback
from typing import Any

import dask.array as da
import dask.dataframe as dd
import numpy as np
import pandas as pd
import pytest
from distributed import Client

from dsched.testing.p2p import active_shuffles, assert_no_shuffle_state, barrier_keys

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

RESULT_TIMEOUT_S = 60


def frame(rows: int = 4000, partitions: int = 8, seed: int = 0) -> tuple[pd.DataFrame, Any]:
    rng = np.random.default_rng(seed)
    pdf = pd.DataFrame(
        {
            "k": rng.integers(0, 300, rows),
            "v": rng.standard_normal(rows),
            "s": rng.choice(["a", "b", "c", "d"], rows),
            "i": np.arange(rows),
        }
    )
    return pdf, dd.from_pandas(pdf, npartitions=partitions)


def compute_p2p(client: Client, collection: Any, barriers: int = 1) -> Any:
    """Compute with the default method, after checking that it is P2P."""
    assert len(barrier_keys(collection)) >= barriers, "the graph has no P2P barrier"
    result = client.compute(collection).result(timeout=RESULT_TIMEOUT_S)
    assert_no_shuffle_state(client)
    return result


def by_index(df: pd.DataFrame) -> pd.DataFrame:
    return df.sort_values(list(df.columns)).reset_index(drop=True)


def test_set_index(default_client: Client) -> None:
    pdf, ddf = frame()
    result = compute_p2p(default_client, ddf.set_index("k"))
    assert result.index.is_monotonic_increasing
    expected = pdf.set_index("k")
    pd.testing.assert_frame_equal(
        by_index(result.reset_index()), by_index(expected.reset_index()), check_dtype=False
    )


def test_sort_values(default_client: Client) -> None:
    pdf, ddf = frame(seed=1)
    result = compute_p2p(default_client, ddf.sort_values("v"))
    np.testing.assert_array_equal(result["v"].to_numpy(), np.sort(pdf["v"].to_numpy()))


def test_shuffle_on_a_column(default_client: Client) -> None:
    pdf, ddf = frame(seed=2)
    shuffled = ddf.shuffle("s", npartitions=4)
    result = compute_p2p(default_client, shuffled)
    pd.testing.assert_frame_equal(by_index(result), by_index(pdf), check_dtype=False)
    # Every value of the column lands in exactly one output partition.
    parts = default_client.gather(default_client.compute(shuffled.to_delayed()))
    owners = [set(part["s"]) for part in parts]
    assert sum(len(values) for values in owners) == len(set(pdf["s"]))
    assert_no_shuffle_state(default_client)


@pytest.mark.parametrize("how", ["inner", "left", "outer"])
def test_hash_join(default_client: Client, how: str) -> None:
    left_pdf, left = frame(rows=3000, partitions=6, seed=3)
    right_pdf = pd.DataFrame({"k": np.arange(0, 400, 2), "w": np.arange(200) * 10})
    right = dd.from_pandas(right_pdf, npartitions=5)
    joined = left.merge(right, on="k", how=how)
    result = compute_p2p(default_client, joined, barriers=2)  # one shuffle per side
    expected = left_pdf.merge(right_pdf, on="k", how=how)
    pd.testing.assert_frame_equal(by_index(result), by_index(expected), check_dtype=False)


def test_drop_duplicates_with_split_out(default_client: Client) -> None:
    pdf, ddf = frame(seed=4)
    result = compute_p2p(default_client, ddf[["k", "s"]].drop_duplicates(split_out=4))
    expected = pdf[["k", "s"]].drop_duplicates()
    pd.testing.assert_frame_equal(by_index(result), by_index(expected), check_dtype=False)


def _spread(group: pd.DataFrame) -> pd.Series:
    return pd.Series({"spread": group["v"].max() - group["v"].min(), "n": len(group)})


def test_groupby_apply(default_client: Client) -> None:
    pdf, ddf = frame(seed=5)
    applied = ddf.groupby("k").apply(_spread, meta={"spread": "f8", "n": "i8"})
    result = compute_p2p(default_client, applied).sort_index()
    expected = pdf.groupby("k").apply(_spread).sort_index()
    pd.testing.assert_frame_equal(result, expected, check_dtype=False)


def test_rechunk(default_client: Client) -> None:
    array = np.random.default_rng(6).standard_normal((300, 300))
    x = da.from_array(array, chunks=(300, 10))
    rechunked = x.rechunk((10, 300))  # all-to-all: the default picks P2P with a Client
    result = compute_p2p(default_client, rechunked)
    np.testing.assert_array_equal(result, array)


def test_two_shuffles_in_one_graph(default_client: Client) -> None:
    pdf, ddf = frame(seed=7)
    twice = ddf.shuffle("s").set_index("i")
    result = compute_p2p(default_client, twice, barriers=2)
    pd.testing.assert_frame_equal(result.sort_index(), pdf.set_index("i"), check_dtype=False)


def _boom_on_third(part: pd.DataFrame, partition_info: dict[str, Any] | None = None) -> Any:
    if partition_info is not None and partition_info["number"] == 3:
        raise ZeroDivisionError("boom in partition 3")
    return part


def _error_of(client: Client, collection: Any) -> tuple[type[BaseException], str, list[str]]:
    """The type, text and traceback function names of the error computing ``collection``
    raises, the future released."""
    future = client.compute(collection)
    try:
        future.result(timeout=RESULT_TIMEOUT_S)
    except Exception as exc:
        names = [frame.name for frame in traceback.extract_tb(exc.__traceback__)]
        return type(exc), str(exc), names
    finally:
        # The error the future keeps holds, through its traceback, the frames of result()
        # and so the future itself: it is never garbage, so release it explicitly.
        future.release()
    raise AssertionError("the computation did not fail")


def test_user_error_inside_a_shuffle_reaches_the_client(default_client: Client) -> None:
    _, ddf = frame(seed=8)
    broken = ddf.map_partitions(_boom_on_third, meta=ddf._meta).shuffle("k")
    assert barrier_keys(broken)
    error_type, text, frames = _error_of(default_client, broken)
    assert error_type is ZeroDivisionError
    assert text == "boom in partition 3"
    assert "_boom_on_third" in frames, "the user's frame is in the traceback"
    assert_no_shuffle_state(default_client)


def _slow_partition(i: int) -> pd.DataFrame:
    time.sleep(0.2)  # a transfer phase long enough to cancel in the middle
    return pd.DataFrame({"k": np.arange(i, 1000 + i) % 37, "v": np.full(1000, float(i))})


def test_cancel_in_the_middle_leaves_nothing(default_client: Client) -> None:
    slow = dd.from_map(_slow_partition, range(40))
    future = default_client.compute(slow.shuffle("k"))
    deadline = time.monotonic() + RESULT_TIMEOUT_S
    while not active_shuffles(default_client):
        assert time.monotonic() < deadline, "the shuffle never started"
        assert not future.done(), "the shuffle finished before it could be cancelled"
        time.sleep(0.02)
    future.cancel()
    assert future.cancelled()
    del future
    assert_no_shuffle_state(default_client)
