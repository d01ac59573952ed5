"""Workloads with known answers, for fault-injection tests and ``dsched soak``.

Every task function here is module-level in an installed module, so Dask pickles it by
reference and the scheduler (which unpickles graphs) and the workers import it by name.

Each ``make_*`` builds a fresh graph (fresh keys, so nothing is shared with an earlier
round) from a seed and returns a ``Workload``: the collection to compute and a ``check``
that raises ``AssertionError`` when a result is wrong. Tasks sleep a little so that a
fault injected at a random moment lands while the graph is running.
"""

from __future__ import annotations

import os
import random
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dask
import dask.array as da
import dask.dataframe as dd
import numpy as np
import pandas as pd  # type: ignore[import-untyped]  # no pandas-stubs installed
from dask.delayed import delayed

TASK_DELAY_S = 0.004


def inc(x: int) -> int:
    return x + 1


def times_ten(x: int) -> int:
    return x * 10


def slow_times_ten(x: int, delay: float = TASK_DELAY_S) -> int:
    time.sleep(delay)
    return x * 10


def slow_add(a: int, b: int, delay: float = TASK_DELAY_S) -> int:
    time.sleep(delay)
    return a + b


def merge_all(*values: int) -> int:
    return sum(values)


def slow_identity(x: Any, delay: float = TASK_DELAY_S) -> Any:
    time.sleep(delay)
    return x


def kill_my_process() -> None:
    """A task that takes its worker process down (what a segfaulting extension does)."""
    os._exit(1)


def flaky(counter_file: str, failures: int, value: int) -> int:
    """Fail the first ``failures`` calls (counted in a file all workers see), then succeed."""
    path = Path(counter_file)
    calls = int(path.read_text()) if path.exists() else 0
    path.write_text(str(calls + 1))
    if calls < failures:
        raise RuntimeError(f"flaky failure {calls + 1} of {failures}")
    return value


def sleep_then(value: Any, seconds: float) -> Any:
    time.sleep(seconds)
    return value


@dataclass
class Workload:
    name: str
    collection: Any
    check: Callable[[Any], None]


def _tag() -> str:
    return uuid.uuid4().hex[:8]


def make_merge(seed: int, n: int = 400) -> Workload:
    """Many independent tasks merged into one: wide fan-in."""
    tag = _tag()
    rng = random.Random(seed)
    values = [rng.randrange(1000) for _ in range(n)]
    leaves = [
        delayed(slow_times_ten)(v, dask_key_name=f"merge-leaf-{tag}-{i}")
        for i, v in enumerate(values)
    ]
    total = delayed(merge_all)(*leaves, dask_key_name=f"merge-total-{tag}")
    expected = 10 * sum(values)

    def check(result: Any) -> None:
        assert result == expected, (result, expected)

    return Workload("merge", total, check)


def make_tree(seed: int, n: int = 256) -> Workload:
    """A binary tree reduction: deep chains whose inputs live on different workers."""
    tag = _tag()
    rng = random.Random(seed)
    values = [rng.randrange(1000) for _ in range(n)]
    level = [
        delayed(slow_times_ten)(v, dask_key_name=f"tree-leaf-{tag}-{i}")
        for i, v in enumerate(values)
    ]
    depth = 0
    while len(level) > 1:
        depth += 1
        paired = [
            delayed(slow_add)(level[i], level[i + 1], dask_key_name=f"tree-{tag}-{depth}-{i}")
            for i in range(0, len(level) - 1, 2)
        ]
        if len(level) % 2:
            paired.append(level[-1])
        level = paired
    expected = 10 * sum(values)

    def check(result: Any) -> None:
        assert result == expected, (result, expected)

    return Workload("tree", level[0], check)


def make_array(seed: int, size: int = 600, chunk: int = 100) -> Workload:
    """Array reductions and a matrix product (transfers between workers at every level)."""
    rng = np.random.default_rng(seed)
    values = rng.random((size, size))
    x = da.from_array(values, chunks=(chunk, chunk), name=f"chaos-array-{_tag()}")  # type: ignore[no-untyped-call]
    x = x.map_blocks(slow_identity, dtype=x.dtype)
    product = (x @ x.T).sum(axis=0)
    expected = (values @ values.T).sum(axis=0)

    def check(result: Any) -> None:
        np.testing.assert_allclose(result, expected, rtol=1e-9)

    return Workload("array", product, check)


def make_dataframe(seed: int, rows: int = 3000) -> Workload:
    """A hash join through a task-based shuffle (all-to-all transfers)."""
    rng = np.random.default_rng(seed)
    left = pd.DataFrame({"key": rng.integers(0, 400, rows), "left_value": np.arange(rows)})
    right = pd.DataFrame({"key": np.arange(0, 400, 2), "right_value": np.arange(200) * 2.5})
    # A distinct column name per round keeps the graph's keys fresh.
    salt = f"salt_{_tag()}"
    left[salt] = 0
    dleft = dd.from_pandas(left, npartitions=6).map_partitions(slow_identity)  # type: ignore[no-untyped-call]
    dright = dd.from_pandas(right, npartitions=4)  # type: ignore[no-untyped-call]
    merged = dd.merge(dleft, dright, on="key", shuffle_method="tasks", broadcast=False)
    expected = left.merge(right, on="key")
    order = ["key", "left_value"]

    def check(result: Any) -> None:
        pd.testing.assert_frame_equal(
            result.sort_values(order).reset_index(drop=True),
            expected.sort_values(order).reset_index(drop=True),
        )

    return Workload("dataframe", merged, check)


WORKLOADS: dict[str, Callable[[int], Workload]] = {
    "merge": make_merge,
    "tree": make_tree,
    "array": make_array,
    "dataframe": make_dataframe,
}

# The randomized kill tests run task-based shuffles and rechunks, whose every task is
# ordinary graph work; P2P under worker loss has its own tests
# (tests/chaos/test_p2p_worker_loss.py), which aim each kill at a phase of the shuffle.
TASK_SHUFFLE_CONFIG = {"dataframe.shuffle.method": "tasks", "array.rechunk.method": "tasks"}


def task_shuffle_config() -> Any:
    return dask.config.set(TASK_SHUFFLE_CONFIG)
