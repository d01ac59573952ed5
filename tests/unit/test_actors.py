"""Actors in the state machine and the ``proxy`` extension (no sockets, no loop).

Dask's semantics (distributed/scheduler.py): update-graph's ``actors`` flags tasks; an actor
runs on the running worker with the fewest actors whatever its inputs' locality, is never
no-worker, is sent ``"actor": True``, is never stolen or moved by a retirement, and errs
(not recomputed) when its worker is lost.
"""

from __future__ import annotations

import pickle
from typing import Any

import pytest
from harness import Harness

from dsched.ext.actors import ActorProxy
from dsched.ext.lifecycle import Lifecycle
from dsched.ext.protocol import Fail, Reply, Request, Rpc
from dsched.ext.pubsub import PubSub
from dsched.policy import protocol as policy
from dsched.state import events as ev
from dsched.state.engine import ACTOR_LOST
from dsched.state.errors import InvariantError
from dsched.wire.errors import RemoteProtocolError

pytestmark = pytest.mark.timeout(60)

W1, W2, W3 = "tcp://w1:1", "tcp://w2:2", "tcp://w3:3"


def cluster(*workers: str, **kwargs: Any) -> Harness:
    h = Harness(**kwargs)
    for address in workers:
        h.add_worker(address)
    h.add_client("c")
    return h


def submit(
    h: Harness, graph: dict[Any, tuple[Any, ...]], keys: list[Any], actors: Any, client: str = "c"
) -> None:
    tasks = [ev.NewTask(key, deps, f"run-{key}", {}) for key, deps in graph.items()]
    order = {key: i for i, key in enumerate(graph)}
    h.step(ev.GraphReceived(client, tasks, keys, order, actors=actors))


def compute_tasks(h: Harness) -> dict[Any, dict[str, Any]]:
    return {
        m["key"]: m for msgs in h.to_workers.values() for m in msgs if m["op"] == "compute-task"
    }


def test_actors_true_flags_every_requested_key_and_compute_task_says_so():
    h = cluster(W1)
    submit(h, {"a": (), "counter": ("a",)}, keys=["counter"], actors=True)
    assert h.state.tasks["counter"].actor and not h.state.tasks["a"].actor
    h.finish("a")
    sent = compute_tasks(h)
    assert sent["a"]["actor"] is False
    assert sent["counter"]["actor"] is True


def test_actors_list_flags_only_those_keys_and_garbage_is_ignored():
    h = cluster(W1)
    submit(h, {"x": (), "y": ()}, keys=["x", "y"], actors=["y", "unknown"])
    assert not h.state.tasks["x"].actor and h.state.tasks["y"].actor
    submit(h, {"z": ()}, keys=["z"], actors=17)  # malformed: no actors
    assert not h.state.tasks["z"].actor


def test_actors_go_to_the_worker_with_fewest_actors_whatever_the_load_or_locality():
    h = cluster(W1, W2)
    submit(h, {"a1": ()}, keys=["a1"], actors=True)
    first = h.processing()["a1"]
    other = W2 if first == W1 else W1
    # A big input on the actor's worker does not pull the next actor there.
    submit(h, {"data": ()}, keys=["data"], actors=False)
    h.finish("data", nbytes=10**9, worker=h.processing()["data"])
    h.step(ev.AddKeys(first, ["data"]))
    submit(h, {"a2": ("data",)}, keys=["a2"], actors=True)
    assert h.processing()["a2"] == other
    # Both have one actor now, and a1 finished: a third goes to either, a fourth to the other.
    h.finish("a1")
    submit(h, {"a3": ()}, keys=["a3"], actors=True)
    third = h.processing()["a3"]
    submit(h, {"a4": ()}, keys=["a4"], actors=True)
    assert h.processing()["a4"] != third
    assert {len(ws.actors) for ws in h.state.workers.values()} == {2}


def test_the_policy_never_hears_of_actors():
    h = cluster(W1)
    out = h.step(
        ev.GraphReceived("c", [ev.NewTask("act", (), "run", {})], ["act"], {}, actors=True)
    )
    ts = h.state.tasks["act"]
    ready = [e for e in out.policy if isinstance(e, policy.TaskReady | policy.TaskCancelled)]
    assert not [e for e in ready if e.task == ts.id]
    out = h.finish("act")
    assert not [e for e in out.policy if isinstance(e, policy.TaskDone) and e.task == ts.id]


def test_an_actor_without_a_running_worker_waits_ready_never_no_worker():
    h = cluster()
    submit(h, {"act": (), "plain": ()}, keys=["act", "plain"], actors=["act"])
    assert h.state.tasks["act"].state == "ready"
    assert h.state.tasks["act"] in h.state.actors_pending
    assert h.state.tasks["plain"].state == "no-worker"
    h.add_worker(W1, status="paused")
    assert h.state.tasks["act"].state == "ready"
    h.step(ev.WorkerStatusChanged(W1, "running"))
    assert h.processing() == {"act": W1, "plain": W1}
    assert not h.state.actors_pending
    assert h.state.tasks["act"] in h.state.workers[W1].actors


def test_a_pending_actor_released_or_erred_leaves_actors_pending():
    h = cluster()
    submit(h, {"act": ()}, keys=["act"], actors=True)
    h.step(ev.ClientReleasesKeys("c", ["act"]))
    assert not h.state.actors_pending and h.state.tasks == {}


def test_losing_an_actors_worker_errs_it_and_its_dependents_without_recomputing():
    h = cluster(W1, W2)
    submit(h, {"act": ()}, keys=["act"], actors=True)
    home = h.processing()["act"]
    h.finish("act")
    submit(h, {"use": ("act",)}, keys=["use"], actors=False)
    h.to_workers.clear()
    out = h.step(ev.WorkerDisconnected(home, False, "lost"))
    ts = h.state.tasks["act"]
    assert ts.state == "erred"
    assert h.state.tasks["use"].state == "erred"
    assert not compute_tasks(h)  # nothing recomputed
    erred = [m for _, m in out.messages("task-erred") if m["key"] == "act"]
    assert erred and erred[0]["exception"] == ACTOR_LOST
    exc = pickle.loads(ACTOR_LOST)
    assert isinstance(exc, RuntimeError) and str(exc) == "Worker holding Actor was lost"
    assert not out.messages("lost-data")
    assert ("task-erred", "use") in h.client_ops()
    # Nothing of it is left on the surviving worker.
    assert all(not ws.actors for ws in h.state.workers.values())


def test_losing_the_actors_worker_errs_it_even_if_others_hold_proxies():
    h = cluster(W1, W2)
    submit(h, {"act": ()}, keys=["act"], actors=True)
    home = h.processing()["act"]
    other = W2 if home == W1 else W1
    h.finish("act")
    h.step(ev.AddKeys(other, ["act"]))  # a dependent's worker fetched the Actor handle
    out = h.step(ev.WorkerDisconnected(home, False, "lost"))
    assert h.state.tasks["act"].state == "erred"
    assert "act" in h.freed_on(other)
    assert out.messages("task-erred")


def test_the_actors_worker_dropping_it_loses_it_even_if_others_hold_proxies():
    h = cluster(W1, W2)
    submit(h, {"act": ()}, keys=["act"], actors=True)
    home = h.processing()["act"]
    other = W2 if home == W1 else W1
    h.finish("act")
    h.step(ev.AddKeys(other, ["act"]))
    h.step(ev.ReleaseWorkerData(home, "act"))
    assert h.state.tasks["act"].state == "erred"
    assert not h.state.workers[home].actors
    assert ("task-erred", "act") in h.client_ops()


def test_an_actor_still_processing_on_a_lost_worker_is_started_again():
    h = cluster(W1, W2)
    submit(h, {"act": ()}, keys=["act"], actors=True)
    home = h.processing()["act"]
    h.step(ev.WorkerDisconnected(home, False, "lost"))
    assert h.state.tasks["act"].state == "processing"
    assert h.processing()["act"] != home
    assert compute_tasks(h)["act"]["actor"] is True


def test_an_actor_released_from_memory_leaves_its_worker():
    h = cluster(W1)
    submit(h, {"act": ()}, keys=["act"], actors=True)
    h.finish("act")
    assert h.state.workers[W1].actors
    h.step(ev.ClientReleasesKeys("c", ["act"]))
    assert not h.state.workers[W1].actors
    assert "act" in h.freed_on(W1)


def test_an_erred_actor_leaves_its_worker_and_can_be_retried():
    h = cluster(W1)
    submit(h, {"act": ()}, keys=["act"], actors=True)
    h.fail("act")
    assert not h.state.workers[W1].actors
    h.step(ev.RetryKeys("c", ["act"]))
    assert h.processing() == {"act": W1}
    assert h.state.tasks["act"] in h.state.workers[W1].actors


def test_actors_are_never_stolen():
    h = cluster(W1, W2)
    submit(h, {"act": ()}, keys=["act"], actors=True)
    ts = h.state.tasks["act"]
    victim = h.state.workers[h.processing()["act"]]
    thief = W2 if victim.address == W1 else W1
    out = h.step(ev.PolicyDecisions((policy.Steal(ts.id, h.state.workers[thief].id),)))
    assert not out.messages("steal-request")
    assert h.processing()["act"] == victim.address


def test_retiring_never_copies_an_actor():
    h = cluster(W1, W2)
    submit(h, {"act": ()}, keys=["act"], actors=True)
    home = h.processing()["act"]
    h.finish("act")
    out = h.step(ev.RetireWorkers([home]))
    asked = {key for _, msg in out.messages("acquire-replicas") for key in msg["who_has"]}
    assert "act" not in asked


def test_retire_workers_leaves_a_worker_holding_actors_and_retires_the_others():
    pubsub = PubSub(maxlen=100)
    h = cluster(W1, W2, W3, extensions=[pubsub, Lifecycle(pubsub)])
    submit(h, {"act": ()}, keys=["act"], actors=True)
    home = h.processing()["act"]
    h.finish("act")
    others = [w for w in (W1, W2, W3) if w != home]
    rid = h.core.request("retire_workers", "client", {"workers": [home, others[0]]}, h.now)
    h.tick()
    assert h.last_flush is not None
    answers = h.last_flush.answers
    replies = [a.value for a in answers if isinstance(a, Reply) and a.request == rid]
    assert [set(r) for r in replies] == [{others[0]}]  # retired: only the other one
    assert others[0] not in h.state.workers
    assert home in h.state.workers and h.state.workers[home].status == "running"
    assert any("holds actor(s)" in text for _, text in h.logs)
    assert h.state.tasks["act"].state == "memory"


def test_validate_rejects_an_actor_in_no_worker():
    h = cluster()
    submit(h, {"act": ()}, keys=["act"], actors=True)
    ts = h.state.tasks["act"]
    h.state.actors_pending.discard(ts)
    ts.state = "no-worker"
    h.state.no_worker.add(ts)
    with pytest.raises(InvariantError, match="never no-worker"):
        h.state.validate()


def test_validate_rejects_a_processing_actor_missing_from_its_workers_actors():
    h = cluster(W1)
    submit(h, {"act": ()}, keys=["act"], actors=True)
    h.state.workers[W1].actors.clear()
    with pytest.raises(InvariantError, match="among its worker's actors"):
        h.state.validate()


def test_a_placed_task_is_not_turned_into_an_actor_by_a_later_graph():
    h = cluster(W1)
    submit(h, {"x": ()}, keys=["x"], actors=False)
    submit(h, {"x": ()}, keys=["x"], actors=True)
    assert not h.state.tasks["x"].actor
    h.run_until_idle()


# ---------------------------------------------------------------- proxy
def test_proxy_forwards_the_message_to_the_worker_and_answers_with_its_reply():
    h = cluster(W1, extensions=[ActorProxy()])
    msg = {"op": "actor_attribute", "attribute": "n", "actor": "act"}
    rid = h.core.request("proxy", "client", {"msg": msg, "worker": W1}, h.now)
    flush = h.core.flush(h.now)
    assert flush.rpcs == [("actors", Rpc(W1, msg, ("proxy", rid)))]
    assert not flush.answers  # parked until the worker answers
    h.core.rpc_reply("actors", ("proxy", rid), {"status": "OK", "result": 3}, None, h.now)
    flush = h.core.flush(h.now)
    assert flush.answers == [Reply(rid, {"status": "OK", "result": 3})]


def test_proxy_errors_late_replies_and_malformed_requests():
    ext = ActorProxy()
    msg = {"op": "actor_execute", "function": "increment", "actor": "act", "args": ()}
    effects = ext.proxy(Request(7, "proxy", "client", {"msg": msg, "worker": W1}), 0.0)
    assert effects == [Rpc(W1, msg, ("proxy", 7))]
    error = OSError("gone")
    assert ext.on_rpc_reply(("proxy", 7), None, error, 0.0) == [Fail(7, error)]
    assert ext.on_rpc_reply(("proxy", 7), {"status": "OK"}, None, 0.0) == []  # answered
    ext.proxy(Request(8, "proxy", "client", {"msg": msg, "worker": W1}), 0.0)
    ext.on_request_dropped(8, 0.0)
    assert ext.on_rpc_reply(("proxy", 8), {"status": "OK"}, None, 0.0) == []  # caller left
    with pytest.raises(RemoteProtocolError):
        ext.proxy(Request(9, "proxy", "client", {"msg": "nope", "worker": W1}), 0.0)
    with pytest.raises(RemoteProtocolError):
        ext.proxy(Request(10, "proxy", "client", {"msg": msg, "worker": None}), 0.0)
