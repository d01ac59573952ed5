"""Where the ``dask`` policy lets a task leave the holders of its inputs.

Dask's ``decide_worker`` offers the holders alone. The ``dask`` policy also offers the least
loaded worker, but only for inputs small enough that the fetch round trip, not their bytes,
is the cost of moving them (issue 14: the reductions of a persisted array moved 2 MB blocks
to even out 0.5 s guesses of unmeasured tasks), and only when that worker has a free thread
(issue 14 again: set_index with the tasks shuffle moved small inputs between two busy
workers on their occupancies, 3x Dask's transfers, each costing 20-100x the task it fed).
"""

from __future__ import annotations

import pytest

from dsched.policy.common import PolicyConfig
from dsched.policy.dask_like import DaskPolicy
from dsched.policy.protocol import (
    Assignment,
    PolicyEvent,
    TaskAdded,
    TaskDone,
    TaskInput,
    TaskReady,
    WorkerAdded,
)


def _placement(input_bytes: int, busy_measured: bool = True, other_busy: bool = False) -> int:
    """Worker 0 holds the one input and runs a 0.5 s task (measured, or the unmeasured
    estimate); worker 1 is idle or runs a task measured at 1 ms."""
    policy = DaskPolicy(PolicyConfig(work_stealing=False))  # placement alone
    events: list[PolicyEvent] = [WorkerAdded(0, 1), WorkerAdded(1, 1)]
    events += [TaskAdded(i, (0, 0, i), (), "busy") for i in (0, 1)]
    events += [TaskAdded(i, (0, 0, i), (), "short") for i in (2, 3)]
    events += [TaskAdded(4, (0, 0, 4), (), "leaf"), TaskAdded(5, (0, 0, 5), (4,), "reduce")]
    policy.handle(events, 0.0)
    if busy_measured:
        policy.handle([TaskDone(0, 0, 0.5, 8)], 0.0)
    if other_busy:
        policy.handle([TaskDone(2, 1, 0.001, 8)], 0.0)
        held_by_1 = (TaskInput(8, (1,)),)
        [short] = policy.handle([TaskReady(3, (0, 0, 3), held_by_1, prefix="short")], 0.0)
        assert short == Assignment(3, 1)
    held_by_0 = (TaskInput(8, (0,)),)
    [busy] = policy.handle([TaskReady(1, (0, 0, 1), held_by_0, prefix="busy")], 0.0)
    assert busy == Assignment(1, 0)
    inputs = (TaskInput(input_bytes, (0,)),)
    [decision] = policy.handle([TaskReady(5, (0, 0, 5), inputs, prefix="reduce")], 0.0)
    assert isinstance(decision, Assignment)
    return decision.worker


@pytest.mark.parametrize("busy_measured", [True, False])
@pytest.mark.parametrize("other_busy", [True, False])
def test_a_big_input_stays_with_its_holder_behind_a_long_task(
    busy_measured: bool, other_busy: bool
) -> None:
    assert _placement(2_000_000, busy_measured, other_busy) == 0


@pytest.mark.parametrize("nbytes", [16, 100_000])
@pytest.mark.parametrize("busy_measured", [True, False])
def test_a_small_input_may_move_to_an_idle_worker(nbytes: int, busy_measured: bool) -> None:
    # 100 KB moves in 1 ms at the default 100 MB/s: less than the 2 ms round trip.
    assert _placement(nbytes, busy_measured) == 1


@pytest.mark.parametrize("nbytes", [16, 100_000])
@pytest.mark.parametrize("busy_measured", [True, False])
def test_a_small_input_stays_when_the_other_worker_is_busy(
    nbytes: int, busy_measured: bool
) -> None:
    # Worker 1's queue (1 ms) is shorter than the holder's (0.5 s), measured or not: the task
    # still stays, and balance() moves queued work once worker 1 actually runs dry.
    assert _placement(nbytes, busy_measured, other_busy=True) == 0
