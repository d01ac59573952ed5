"""Work stealing and the graph-describing policy events, through the in-memory harness.

A steal is a policy decision (``Steal``) that the state machine turns into Dask's
``steal-request`` to the victim; the victim's ``steal-response`` either moves the task to the
thief with a fresh run_id or leaves it. Every race ends with exactly one ``StealResult``.
"""

from __future__ import annotations

from typing import Any

import pytest
from harness import Harness

from dsched.policy import protocol as p
from dsched.state import events as ev
from dsched.state.outbox import Outbox

pytestmark = pytest.mark.timeout(60)

W0, W1, W2 = "tcp://w0:1", "tcp://w1:1", "tcp://w2:1"


def setup(n_tasks: int = 3) -> Harness:
    """Every task lands on W0 (the only worker when they became ready); W1 joins later."""
    h = Harness()
    h.add_worker(W0)
    h.add_client("c")
    h.submit({f"t{i}": () for i in range(n_tasks)}, keys=[f"t{i}" for i in range(n_tasks)])
    h.add_worker(W1)
    assert set(h.processing().values()) == {W0}
    return h


def wid(h: Harness, address: str) -> int:
    return h.state.workers[address].id


def tid(h: Harness, key: str) -> int:
    return h.state.tasks[key].id


def steal(h: Harness, key: str, thief: str) -> Outbox:
    return h.step(ev.PolicyDecisions([p.Steal(tid(h, key), wid(h, thief))]))


def results(out: Outbox) -> list[p.StealResult]:
    return [e for e in out.policy if isinstance(e, p.StealResult)]


def request(out: Outbox, victim: str) -> dict[str, Any]:
    (msg,) = [m for m in out.to_workers.get(victim, []) if m["op"] == "steal-request"]
    return msg


def respond(h: Harness, victim: str, key: str, state: str | None, stimulus_id: str) -> Outbox:
    return h.step(ev.StealResponse(victim, key, state, stimulus_id))


def test_confirmed_steal_moves_the_task_with_a_fresh_run_id():
    h = setup()
    old_run_id = h.state.tasks["t2"].run_id
    out = steal(h, "t2", W1)
    msg = request(out, W0)
    assert msg["key"] == "t2" and msg["stimulus_id"].startswith("steal-")
    assert not results(out)
    assert h.state.steals
    out = respond(h, W0, "t2", "ready", msg["stimulus_id"])
    assert h.processing()["t2"] == W1
    (compute,) = [m for m in out.to_workers[W1] if m["op"] == "compute-task"]
    assert compute["key"] == "t2" and compute["run_id"] != old_run_id
    assert results(out) == [p.StealResult(tid(h, "t2"), wid(h, W0), wid(h, W1), True)]
    done = [e for e in out.policy if isinstance(e, p.TaskDone)]
    assert done == [p.TaskDone(tid(h, "t2"), wid(h, W0))]  # the victim's assignment ended
    assert not h.state.steals
    # A late result from the victim under the old run_id does not count.
    h.step(ev.TaskFinished(W0, "t2", old_run_id, 8))
    assert h.state.tasks["t2"].state == "processing"
    assert "t2" in h.freed_on(W0)
    h.run_until_idle()
    assert {h.state.tasks[f"t{i}"].state for i in range(3)} == {"memory"}


@pytest.mark.parametrize("state", ["executing", "memory", "long-running", "cancelled", "resumed"])
def test_a_victim_that_started_the_task_keeps_it(state):
    h = setup()
    msg = request(steal(h, "t1", W1), W0)
    out = respond(h, W0, "t1", state, msg["stimulus_id"])
    assert h.processing()["t1"] == W0
    assert results(out) == [p.StealResult(tid(h, "t1"), wid(h, W0), wid(h, W1), False)]
    assert not out.to_workers
    assert not h.state.steals


@pytest.mark.parametrize("state", ["released", None])
def test_a_victim_that_does_not_know_the_task_makes_it_start_over(state):
    h = setup()
    run_id = h.state.tasks["t1"].run_id
    msg = request(steal(h, "t1", W1), W0)
    out = respond(h, W0, "t1", state, msg["stimulus_id"])
    assert results(out)[0].stolen is False
    assert any(isinstance(e, p.TaskReady) and e.task == tid(h, "t1") for e in out.policy)
    ts = h.state.tasks["t1"]
    assert ts.state == "processing" and ts.run_id != run_id


def test_victim_released_it_but_the_thief_left_so_it_is_offered_again():
    h = setup()
    msg = request(steal(h, "t2", W1), W0)
    h.step(ev.WorkerDisconnected(W1))
    out = respond(h, W0, "t2", "waiting", msg["stimulus_id"])
    assert results(out)[0].stolen is False
    assert h.processing()["t2"] == W0  # the only worker left
    assert not h.state.steals
    h.run_until_idle()


def test_victim_released_it_but_the_thief_paused():
    h = setup()
    msg = request(steal(h, "t2", W1), W0)
    h.step(ev.WorkerStatusChanged(W1, "paused"))
    out = respond(h, W0, "t2", "ready", msg["stimulus_id"])
    assert results(out)[0].stolen is False
    assert h.processing()["t2"] == W0


def test_task_finishing_while_the_steal_is_in_flight_voids_it():
    h = setup()
    msg = request(steal(h, "t0", W1), W0)
    out = h.finish("t0")
    assert results(out) == [p.StealResult(tid(h, "t0"), wid(h, W0), wid(h, W1), False)]
    assert not h.state.steals
    late = respond(h, W0, "t0", "memory", msg["stimulus_id"])
    assert not late and h.state.tasks["t0"].state == "memory"


def test_task_erring_while_the_steal_is_in_flight_voids_it():
    h = setup()
    msg = request(steal(h, "t0", W1), W0)
    out = h.fail("t0")
    assert [r.stolen for r in results(out)] == [False]
    assert not respond(h, W0, "t0", "ready", msg["stimulus_id"]).to_workers
    assert h.state.tasks["t0"].state == "erred"


def test_task_released_while_the_steal_is_in_flight_voids_it():
    h = setup()
    msg = request(steal(h, "t1", W1), W0)
    out = h.step(ev.ClientReleasesKeys("c", ["t1"]))
    assert [r.stolen for r in results(out)] == [False]
    assert "t1" not in h.state.tasks
    assert not respond(h, W0, "t1", "ready", msg["stimulus_id"])


def test_victim_dying_while_the_steal_is_in_flight_voids_it():
    h = setup()
    msg = request(steal(h, "t1", W1), W0)
    out = h.step(ev.WorkerDisconnected(W0))
    assert [r.stolen for r in results(out)] == [False]
    assert set(h.processing().values()) == {W1}
    # The dead victim's answer (it arrived late) must not move anything.
    assert not respond(h, W0, "t1", "ready", msg["stimulus_id"])
    h.run_until_idle()


def test_stale_or_foreign_responses_are_ignored():
    h = setup()
    msg = request(steal(h, "t1", W1), W0)
    assert not respond(h, W0, "t1", "ready", "steal-999")  # wrong stimulus_id
    assert not respond(h, W1, "t1", "ready", msg["stimulus_id"])  # not the victim
    assert not respond(h, W0, "nope", "ready", msg["stimulus_id"])  # unknown key
    assert h.state.steals  # still pending
    out = respond(h, W0, "t1", "ready", msg["stimulus_id"])
    assert results(out)[0].stolen
    assert not respond(h, W0, "t1", "ready", msg["stimulus_id"])  # a duplicate


def test_steals_that_make_no_sense_are_refused_at_once():
    h = setup()
    h.step(ev.LongRunning(W0, "t0"))
    cases = [
        p.Steal(tid(h, "t0"), wid(h, W1)),  # long-running (seceded)
        p.Steal(tid(h, "t1"), wid(h, W0)),  # thief is the victim
        p.Steal(tid(h, "t1"), 99),  # unknown thief
        p.Steal(12345, wid(h, W1)),  # unknown task
    ]
    for decision in cases:
        out = h.step(ev.PolicyDecisions([decision]))
        assert [r.stolen for r in results(out)] == [False], decision
        assert not out.to_workers
    h.step(ev.WorkerStatusChanged(W1, "paused"))
    assert [r.stolen for r in results(steal(h, "t1", W1))] == [False]
    h.step(ev.WorkerStatusChanged(W1, "running"))
    request(steal(h, "t1", W1), W0)
    out = steal(h, "t1", W1)  # one steal in flight per task
    assert [r.stolen for r in results(out)] == [False] and not out.to_workers
    h.finish("t0")  # finished memory task: not processing any more
    assert [r.stolen for r in results(steal(h, "t0", W1))] == [False]


def test_every_steal_request_has_a_unique_stimulus_id():
    h = setup(n_tasks=4)
    ids = set()
    for key in ("t1", "t2", "t3"):
        ids.add(request(steal(h, key, W1), W0)["stimulus_id"])
    assert len(ids) == 3


def test_graph_events_carry_dependencies_prefix_and_priority_then_forgotten():
    h = Harness()
    h.add_client("c")
    out = h.submit(
        {"inc-1": (), "inc-2": (), ("sum-5f3c0ae2b7d04e0fa8a1c3b9e2d4f601", 0): ("inc-1", "inc-2")},
        keys=[("sum-5f3c0ae2b7d04e0fa8a1c3b9e2d4f601", 0)],
    )
    added = {e.task: e for e in out.policy if isinstance(e, p.TaskAdded)}
    tasks = h.state.tasks
    assert set(added) == {ts.id for ts in tasks.values()}
    total = added[tasks[("sum-5f3c0ae2b7d04e0fa8a1c3b9e2d4f601", 0)].id]
    assert set(total.dependencies) == {tasks["inc-1"].id, tasks["inc-2"].id}
    assert total.prefix == "sum" and added[tasks["inc-1"].id].prefix == "inc"
    assert total.priority == tasks[("sum-5f3c0ae2b7d04e0fa8a1c3b9e2d4f601", 0)].priority
    h.add_worker(W0)
    h.run_until_idle()
    out = h.step(ev.ClientReleasesKeys("c", [("sum-5f3c0ae2b7d04e0fa8a1c3b9e2d4f601", 0)]))
    forgotten = {e.task for e in out.policy if isinstance(e, p.TaskForgotten)}
    assert forgotten == set(added)


def test_task_ready_carries_the_prefix_and_task_done_the_size():
    h = Harness()
    h.add_client("c")
    h.add_worker(W0)
    out = h.submit({"inc-1": ()}, keys=["inc-1"])
    (ready,) = [e for e in out.policy if isinstance(e, p.TaskReady)]
    assert ready.prefix == "inc"
    out = h.step(ev.TaskFinished(W0, "inc-1", h.state.tasks["inc-1"].run_id, 123, duration=0.5))
    (done,) = [e for e in out.policy if isinstance(e, p.TaskDone)]
    assert (done.duration, done.nbytes) == (0.5, 123)


def test_scattered_data_is_announced_to_the_policy():
    h = Harness()
    h.add_worker(W0)
    out = h.step(ev.DataPlaced("c", {"data-1": [W0]}, {"data-1": 10}))
    assert [e.prefix for e in out.policy if isinstance(e, p.TaskAdded)] == ["data"]
