"""The ``dask`` policy keeps a task with big inputs on their holder, as Dask's
``decide_worker`` does, and offers an idle worker only for inputs small enough that the
fetch round trip, not their bytes, is the cost of moving them (issue 14: the reductions of
a persisted array moved 2 MB blocks to even out 0.5 s guesses of unmeasured tasks)."""

from __future__ import annotations

import pytest

from dsched.policy.common import PolicyConfig
from dsched.policy.dask_like import DaskPolicy
from dsched.policy.protocol import Assignment, TaskAdded, TaskInput, TaskReady, WorkerAdded


def _placement(input_bytes: int) -> int:
    """Worker 0 holds the one input and runs an unmeasured (0.5 s) task; worker 1 is idle."""
    policy = DaskPolicy(PolicyConfig(work_stealing=False))  # placement alone
    events: list = [WorkerAdded(0, 1), WorkerAdded(1, 1)]
    events += [TaskAdded(0, (0, 0, 0), (), "busy"), TaskAdded(1, (0, 0, 1), (), "busy")]
    events += [TaskAdded(2, (0, 0, 2), (), "leaf"), TaskAdded(3, (0, 0, 3), (2,), "reduce")]
    policy.handle(events, 0.0)
    held_by_0 = (TaskInput(8, (0,)),)
    [busy] = policy.handle([TaskReady(1, (0, 0, 1), held_by_0, prefix="busy")], 0.0)
    assert busy == Assignment(1, 0)
    inputs = (TaskInput(input_bytes, (0,)),)
    [decision] = policy.handle([TaskReady(3, (0, 0, 3), inputs, prefix="reduce")], 0.0)
    assert isinstance(decision, Assignment)
    return decision.worker


def test_a_big_input_stays_with_its_holder_behind_an_unmeasured_task() -> None:
    assert _placement(2_000_000) == 0


@pytest.mark.parametrize("nbytes", [16, 100_000])
def test_a_small_input_may_move_to_an_idle_worker(nbytes: int) -> None:
    # 100 KB moves in 1 ms at the default 100 MB/s: less than the 2 ms round trip.
    assert _placement(nbytes) == 1
