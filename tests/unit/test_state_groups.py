"""A task's dependents and waiters as groups (``dsched.state.records``): a tuple up to
``SMALL_GROUP`` members, a set past it, and the state machine's invariants either way."""

from __future__ import annotations

import pytest
from harness import Harness

from dsched.state.records import SMALL_GROUP, Group, TaskState, group_add, group_discard


def tasks(n: int) -> list[TaskState]:
    return [TaskState(f"t-{i}", i, None, {}) for i in range(n)]


def test_a_group_is_a_tuple_up_to_the_small_size_then_a_set() -> None:
    members = tasks(SMALL_GROUP + 2)
    group: Group = ()
    for i, ts in enumerate(members):
        group = group_add(group, ts)
        group = group_add(group, ts)  # adding twice changes nothing
        if i < SMALL_GROUP:
            assert group == tuple(members[: i + 1])
        else:
            assert group == set(members[: i + 1])


@pytest.mark.parametrize("size", [1, SMALL_GROUP, SMALL_GROUP + 3])
def test_discarding_every_member_leaves_the_empty_tuple(size: int) -> None:
    members = tasks(size)
    group: Group = ()
    for ts in members:
        group = group_add(group, ts)
    group = group_discard(group, TaskState("stranger", 99, None, {}))
    assert len(group) == size
    for i, ts in enumerate(members):
        group = group_discard(group, ts)
        assert set(group) == set(members[i + 1 :])
    assert group == ()


@pytest.mark.parametrize("fan_out", [3, SMALL_GROUP, 3 * SMALL_GROUP])
def test_a_shared_input_feeding_many_tasks_runs_and_is_released(fan_out: int) -> None:
    h = Harness()  # validate() after every step checks dependents and waiters
    h.add_worker("tcp://127.0.0.1:40001")
    h.add_client()
    graph = {"x": ()} | {f"y-{i}": ("x",) for i in range(fan_out)}
    h.submit(graph, [f"y-{i}" for i in range(fan_out)])
    x = h.state.tasks["x"]
    assert len(x.dependents) == len(x.waiters) == fan_out
    assert isinstance(x.waiters, tuple) == (fan_out <= SMALL_GROUP)
    h.run_until_idle()
    # Released once its last dependent finished, kept while they are known (as in Dask).
    assert x.state == "released" and x.waiters == () and len(x.dependents) == fan_out
    assert all(h.state.tasks[f"y-{i}"].state == "memory" for i in range(fan_out))
