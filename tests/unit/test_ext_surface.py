"""Client-surface extensions without an event loop: metadata, the task stream, replaying
tasks, stories, set_resources, replicate, rebalance and the active memory manager."""

from __future__ import annotations

from typing import Any

import pytest
from harness import Harness

from dsched.ext.memory import AMM_TIMER, MemoryManager
from dsched.ext.metadata import Metadata
from dsched.ext.protocol import CancelTimer, Fail, Reply, Rpc, SetTimer
from dsched.ext.queries import ClusterQueries
from dsched.ext.replay import Replay
from dsched.ext.resources import Resources
from dsched.ext.task_stream import TaskStream
from dsched.policy import protocol as p
from dsched.state import events as ev

pytestmark = pytest.mark.timeout(60)

W0, W1, W2 = "tcp://w0:1", "tcp://w1:1", "tcp://w2:1"
NO_DEFAULT = {"__Enum__": True, "name": "no_default", "__module__": "dask.typing",
              "__name__": "_NoDefault"}  # fmt: skip


def ask(h: Harness, op: str, **args: Any) -> Any:
    """One RPC and its answer, in one tick (a Reply's value, or the Fail itself)."""
    rid = h.core.request(op, "tcp://client", args, h.now)
    h.tick()
    assert h.last_flush is not None
    answers = [a for a in h.last_flush.answers if a.request == rid]
    assert len(answers) == 1, h.last_flush.answers
    answer = answers[0]
    return answer.value if isinstance(answer, Reply) else answer


def in_memory(h: Harness, *keys: str) -> None:
    h.add_client("c")
    h.submit(dict.fromkeys(keys, ()), keys=list(keys))
    h.run_until_idle()


# ----------------------------------------------------------------------------- metadata
def test_metadata_nested_with_defaults_and_errors() -> None:
    h = Harness(extensions=[Metadata()])
    assert ask(h, "set_metadata", keys=("a",), value=1) is None
    assert ask(h, "set_metadata", keys=("a", "b", "c"), value=2) is None  # 1 replaced by {}
    assert ask(h, "get_metadata", keys=("a",), default=NO_DEFAULT) == {"b": {"c": 2}}
    assert ask(h, "get_metadata", keys=("a", "x"), default=None) is None
    failed = ask(h, "get_metadata", keys=("a", "x"), default=NO_DEFAULT)
    assert isinstance(failed, Fail) and isinstance(failed.exception, KeyError)
    assert isinstance(ask(h, "get_metadata", keys=("a", "b", "c", "d")), Fail)  # 2["d"]


def test_metadata_of_a_task_goes_when_it_is_forgotten() -> None:
    h = Harness(extensions=[Metadata()])
    h.add_worker(W0)
    ask(h, "set_metadata", keys=("later",), value="v")  # no task yet: bound when created
    in_memory(h, "x", "later")
    ask(h, "set_metadata", keys=("x", "y"), value=1)
    ask(h, "set_metadata", keys=("plain",), value=3)
    assert ask(h, "get_metadata", keys=("x",)) == {"y": 1}
    h.step(ev.ClientReleasesKeys("c", ["x", "later"]))
    assert "x" not in h.state.tasks
    assert ask(h, "get_metadata", keys=("x",), default="gone") == "gone"
    assert ask(h, "get_metadata", keys=("later",), default="gone") == "gone"
    assert ask(h, "get_metadata", keys=("plain",)) == 3
    in_memory(h, "x")  # a new task with the same key starts without metadata
    assert ask(h, "get_metadata", keys=("x",), default="none") == "none"


# ----------------------------------------------------------------------------- task stream
def _finished(h: Harness, key: str, **extra: Any) -> ev.TaskFinished:
    ts = h.state.tasks[key]
    assert ts.processing_on is not None
    msg = {
        "op": "task-finished", "key": key, "run_id": ts.run_id, "nbytes": 8, "type": b"int",
        "typename": "int", "metadata": {}, "thread": 7, "status": "OK",
        "startstops": ({"action": "compute", "start": 1.0, "stop": 2.0},),
        "stimulus_id": f"task-finished-{key}", **extra,
    }  # fmt: skip
    return ev.TaskFinished(
        ts.processing_on.address, key, ts.run_id, 8, b"int", 1.0, f"task-finished-{key}", msg
    )


def _erred(h: Harness, key: str) -> ev.TaskErred:
    ts = h.state.tasks[key]
    assert ts.processing_on is not None
    msg = {
        "op": "task-erred", "key": key, "run_id": ts.run_id, "exception": "exc",
        "traceback": "tb", "exception_text": "ZeroDivisionError()", "traceback_text": "",
        "thread": 7, "status": "error",
        "startstops": ({"action": "compute", "start": 3.0, "stop": 4.0},),
        "stimulus_id": f"task-erred-{key}",
    }  # fmt: skip
    return ev.TaskErred(
        ts.processing_on.address, key, ts.run_id, "exc", "tb", stimulus_id=msg["stimulus_id"],
        msg=msg,
    )  # fmt: skip


def test_task_stream_records_only_once_used_and_only_real_results() -> None:
    stream = TaskStream()
    h = Harness(extensions=[stream])
    h.add_worker(W0)
    h.add_client("c")
    h.submit({"a": (), "b": (), "c": (), "d": ()}, keys=["a", "b", "c", "d"])
    h.step(_finished(h, "a"))
    assert stream.index == 0 and not stream.buffer  # not used yet: nothing recorded
    assert ask(h, "get_task_stream_index") == 0
    finished_b = _finished(h, "b")
    h.step(finished_b)
    h.step(finished_b)  # b is in memory now: a duplicate result makes no record
    h.step(_erred(h, "c"))
    no_startstops = _finished(h, "d", startstops=())
    h.step(no_startstops)
    assert stream.index == 2
    ok, erred = stream.buffer
    assert ok == {
        "stimulus_id": "task-finished-b", "worker": W0, "metadata": {}, "nbytes": 8,
        "type": b"int", "typename": "int", "thread": 7, "status": "OK",
        "startstops": ({"action": "compute", "start": 1.0, "stop": 2.0},), "key": "b",
    }  # fmt: skip
    assert erred["cause"] == "c" and erred["status"] == "error" and erred["key"] == "c"
    assert erred["exception_text"] == "ZeroDivisionError()" and erred["worker"] == W0
    assert [r["key"] for r in ask(h, "get_task_stream", start_index=1)] == ["c"]
    assert [r["key"] for r in ask(h, "get_task_stream", count=1)] == ["c"]
    assert [r["key"] for r in ask(h, "get_task_stream", start=2.5)] == ["c"]
    assert [r["key"] for r in ask(h, "get_task_stream", stop=2.5)] == ["b"]
    assert ask(h, "get_task_stream", start=0, stop=0) == []
    assert [r["key"] for r in ask(h, "get_task_stream", start="0.5s")] == []  # now - 0.5


def test_task_stream_skips_retried_failures_and_is_bounded() -> None:
    stream = TaskStream(maxlen=2)
    h = Harness(extensions=[stream])
    h.add_worker(W0)
    ask(h, "get_task_stream_index")
    h.add_client("c")
    h.submit({"r": ()}, keys=["r"], annotations={"r": {"retries": 1}})
    h.step(_erred(h, "r"))  # retried: processing -> released -> waiting, no record
    assert stream.index == 0
    for key in ("k1", "k2", "k3"):
        h.submit({key: ()}, keys=[key])
        h.step(_finished(h, key))
    assert stream.index == 3 and [r["key"] for r in stream.buffer] == ["k2", "k3"]
    assert [r["key"] for r in ask(h, "get_task_stream", start_index=0)] == ["k2", "k3"]


# ----------------------------------------------------------------------------- replay, story
def test_error_cause_runspec_and_story() -> None:
    h = Harness(extensions=[Replay(), ClusterQueries()])
    h.add_worker(W0)
    h.add_client("c")
    h.submit({"x": (), "y": ("x",)}, keys=["y"])
    h.run_until_idle(fail=["x"])
    assert ask(h, "get_error_cause", keys=("nope", "y")) == "x"
    assert ask(h, "get_error_cause", keys=("nope",)) is None
    assert ask(h, "get_runspec", key="y") == "run-y"  # the stored (pickled) run_spec
    assert isinstance(ask(h, "get_runspec", key=["y"]), Fail)  # the tuple key ("y",)
    failed = ask(h, "get_runspec", key="nope")
    assert isinstance(failed, Fail) and isinstance(failed.exception, KeyError)
    story = ask(h, "get_story", keys_or_stimuli=("x",))
    assert story and all(len(t) == 6 and t[0] == "x" and t[3] == {} for t in story)
    assert [t[1:3] for t in story][:2] == [("released", "waiting"), ("waiting", "ready")]
    assert ("processing", "erred") in [t[1:3] for t in story]
    assert all(isinstance(t[5], float) for t in story)


# ----------------------------------------------------------------------------- resources
def test_set_resources_lets_a_parked_task_run() -> None:
    h = Harness(extensions=[Resources()])
    h.add_worker(W0)
    h.add_client("c")
    h.submit({"g": ()}, keys=["g"], annotations={"g": {"resources": {"GPU": 1}}})
    assert h.state.tasks["g"].state == "no-worker"
    rid = h.core.request("set_resources", W0, {"worker": W0, "resources": {"GPU": 2}}, h.now)
    out = h.tick()
    assert h.last_flush is not None and h.last_flush.answers == [Reply(rid, "OK")]
    assert p.WorkerResources(h.state.workers[W0].id, (("GPU", 2.0),)) in out.policy
    assert h.state.workers[W0].resources == {"GPU": 2.0}
    assert h.processing() == {"g": W0}
    failed = ask(h, "set_resources", worker="tcp://nobody:1", resources={"GPU": 1})
    assert isinstance(failed, Fail) and isinstance(failed.exception, KeyError)


def test_worker_resources_event_reaches_the_policy() -> None:
    h = Harness()
    h.add_worker(W0)
    out = h.step(ev.WorkerResourcesSet(W0, {"FOO": 1.0}))
    assert p.WorkerResources(h.state.workers[W0].id, (("FOO", 1.0),)) in out.policy


# ----------------------------------------------------------------------------- replicas
def test_drop_replicas_never_drops_the_last_one() -> None:
    h = Harness()
    h.add_worker(W0)
    h.add_worker(W1)
    in_memory(h, "x", "y")
    x, y = h.state.tasks["x"], h.state.tasks["y"]
    holder = next(iter(x.who_has)).address
    other = W1 if holder == W0 else W0
    h.step(ev.AddKeys(other, ["x"]))
    assert {ws.address for ws in x.who_has} == {W0, W1}
    out = h.step(ev.DropReplicas(holder, ["x", "y", "nope"], "drop-1"))
    assert {ws.address for ws in x.who_has} == {other}
    assert len(y.who_has) == 1  # its only replica stays
    assert out.messages("remove-replicas") == [
        (holder, {"op": "remove-replicas", "keys": ["x"], "stimulus_id": "drop-1"})
    ]
    out = h.step(ev.DropReplicas(other, ["x"], "drop-2"))
    assert {ws.address for ws in x.who_has} == {other} and not out.messages("remove-replicas")


def next_round(h: Harness, rid: int) -> None:
    """Fire replicate's next-round timer (due at once), as the reactor would."""
    assert h.last_flush is not None
    token = ("replicate-round", rid)
    assert ("memory", SetTimer(token, h.now)) in h.last_flush.timers
    h.core.timer("memory", token, h.now)
    h.tick()


def _gathers(h: Harness) -> list[Rpc]:
    assert h.last_flush is not None
    return [rpc for name, rpc in h.last_flush.rpcs if name == "memory"]


def test_replicate_copies_in_rounds_then_answers() -> None:
    h = Harness(extensions=[MemoryManager(amm_start=False)])
    for w in (W0, W1, W2):
        h.add_worker(w)
    in_memory(h, "x")
    x = h.state.tasks["x"]
    rid = h.core.request("replicate", "tcp://client", {"keys": ("x",), "n": 3}, h.now)
    h.tick()
    gathers = _gathers(h)
    assert len(gathers) == 2 and not h.last_flush.answers  # type: ignore[union-attr]
    holder = next(iter(x.who_has)).address
    assert {g.address for g in gathers} == {W0, W1, W2} - {holder}
    first, second = gathers
    assert first.msg == {"op": "gather", "who_has": {"x": [holder]}}
    h.core.rpc_reply("memory", first.token, {"status": "OK"}, None, h.now)
    h.tick()
    assert len(x.who_has) == 2 and not h.last_flush.answers  # type: ignore[union-attr]
    h.core.rpc_reply("memory", second.token, {"status": "OK"}, None, h.now)
    h.tick()
    assert len(x.who_has) == 3
    next_round(h, rid)
    assert h.last_flush.answers == [Reply(rid, None)]  # type: ignore[union-attr]
    # delete: down to n=1 among all workers, by remove-replicas
    rid = h.core.request("replicate", "tcp://client", {"keys": ("x",), "n": 1}, h.now)
    h.tick()
    assert len(x.who_has) == 1 and not _gathers(h)
    assert h.last_flush.answers == [Reply(rid, None)]  # type: ignore[union-attr]


def test_replicate_errors_and_failed_copies() -> None:
    h = Harness(extensions=[MemoryManager(amm_start=False)])
    h.add_worker(W0)
    h.add_worker(W1)
    in_memory(h, "x")
    failed = ask(h, "replicate", keys=("nope",))
    assert isinstance(failed, Fail) and isinstance(failed.exception, KeyError)
    failed = ask(h, "replicate", keys=("x",), n=0)
    assert isinstance(failed, Fail) and isinstance(failed.exception, ValueError)
    h.submit({"z": ()}, keys=["z"])  # processing: held nowhere yet
    assert ask(h, "replicate", keys=("x", "z")) == {"status": "partial-fail", "keys": ["z"]}
    rid = h.core.request("replicate", "tcp://client", {"keys": ("x",)}, h.now)
    h.tick()
    (gather,) = _gathers(h)
    h.core.rpc_reply("memory", gather.token, None, OSError("gone"), h.now)
    h.tick()
    next_round(h, rid)  # nothing copied this round: answered rather than retried forever
    assert h.last_flush.answers == [Reply(rid, None)]  # type: ignore[union-attr]
    assert len(h.state.tasks["x"].who_has) == 1


def test_rebalance_moves_the_oldest_keys_to_the_emptiest_worker() -> None:
    h = Harness(extensions=[MemoryManager(amm_start=False)])
    h.add_worker(W0)
    keys = ["k0", "k1", "k2", "k3"]
    in_memory(h, *keys)
    h.add_worker(W1)
    rid = h.core.request("rebalance", "tcp://client", {}, h.now)
    h.tick()
    (gather,) = _gathers(h)
    assert gather.address == W1
    assert gather.msg == {"op": "gather", "who_has": {"k0": [W0], "k1": [W0]}}
    h.core.rpc_reply("memory", gather.token, {"status": "OK"}, None, h.now)
    h.tick()
    assert h.last_flush.answers == [Reply(rid, {"status": "OK"})]  # type: ignore[union-attr]
    holders = {k: sorted(ws.address for ws in h.state.tasks[k].who_has) for k in keys}
    assert holders == {"k0": [W1], "k1": [W1], "k2": [W0], "k3": [W0]}
    assert ask(h, "rebalance") == {"status": "OK"}  # balanced: nothing to do
    assert ask(h, "rebalance", keys=("nope",)) == {"status": "partial-fail", "keys": ["nope"]}


def test_rebalance_reports_failed_keys_only_when_named() -> None:
    h = Harness(extensions=[MemoryManager(amm_start=False)])
    h.add_worker(W0)
    in_memory(h, "k0", "k1")
    h.add_worker(W1)
    rid = h.core.request("rebalance", "tcp://client", {"keys": ("k0", "k1")}, h.now)
    h.tick()
    (gather,) = _gathers(h)
    reply = {"status": "partial-fail", "keys": ("k0",)}
    h.core.rpc_reply("memory", gather.token, reply, None, h.now)
    h.tick()
    answer = h.last_flush.answers  # type: ignore[union-attr]
    assert answer == [Reply(rid, {"status": "partial-fail", "keys": ["k0"]})]
    assert [ws.address for ws in h.state.tasks["k0"].who_has] == [W0]


# ----------------------------------------------------------------------------- the AMM
def test_amm_handler_and_reduce_replicas() -> None:
    amm = MemoryManager(amm_start=True, amm_interval=2.0)
    h = Harness(extensions=[amm])
    h.add_worker(W0)
    assert h.last_flush is not None
    assert ("memory", SetTimer(AMM_TIMER, h.now + 2.0)) in h.last_flush.timers
    h.add_worker(W1)
    assert ask(h, "amm_handler", method="running") is True
    in_memory(h, "x", "y")
    x = h.state.tasks["x"]
    for key in ("x", "y"):
        ts = h.state.tasks[key]
        other = W1 if next(iter(ts.who_has)).address == W0 else W0
        h.step(ev.AddKeys(other, [key]))
    assert len(x.who_has) == 2
    assert ask(h, "amm_handler", method="run_once") is None
    assert all(len(h.state.tasks[k].who_has) == 1 for k in ("x", "y"))
    assert ask(h, "amm_handler", method="stop") is None
    assert ("memory", CancelTimer(AMM_TIMER)) in h.last_flush.timers
    assert ask(h, "amm_handler", method="running") is False
    assert h.core.extensions["memory"].on_timer(AMM_TIMER, h.now) == []  # stopped
    assert ask(h, "amm_handler", method="start") is None
    assert ("memory", SetTimer(AMM_TIMER, h.now + 2.0)) in h.last_flush.timers
    assert isinstance(ask(h, "amm_handler", method="nope"), Fail)


def test_amm_keeps_a_replica_per_waiting_dependent_worker() -> None:
    h = Harness(extensions=[MemoryManager(amm_start=False)])
    h.add_worker(W0)
    h.add_worker(W1)
    in_memory(h, "x")
    x = h.state.tasks["x"]
    other = W1 if next(iter(x.who_has)).address == W0 else W0
    h.step(ev.AddKeys(other, ["x"]))
    h.submit({"x": (), "d1": ("x",), "d2": ("x",)}, keys=["d1", "d2"])
    running = {ws.address for ws in (h.state.tasks["d1"].processing_on,
                                     h.state.tasks["d2"].processing_on) if ws}  # fmt: skip
    ask(h, "amm_handler", method="run_once")
    if running == {W0, W1}:
        assert len(x.who_has) == 2  # each worker runs a dependent: both replicas stay
    else:
        assert len(x.who_has) >= 1


# ----------------------------------------------------------------------------- worker status
def test_worker_status_feed_tells_subscribers_of_workers_coming_and_going() -> None:
    from dsched.ext.worker_status import WorkerStatusFeed

    h = Harness(extensions=[WorkerStatusFeed()])
    h.add_worker(W0)
    sub = "worker-status-1"
    h.core.stream(sub, "subscribe-worker-status", {}, h.now)
    h.tick()
    h.add_worker(W1, name="one", resources={"FOO": 1.0})
    h.add_worker(W1)  # registered twice: nothing new
    h.step(ev.WorkerDisconnected(W0))
    h.step(ev.WorkerDisconnected(W0))  # already gone
    h.step(ev.WorkerDisconnected("tcp://never:1"))
    sent: list[Any] = list(h.to_clients[sub])
    assert [m[0] for m in sent] == ["add", "remove"]
    identity = sent[0][1]["workers"][W1]
    assert identity["name"] == "one" and identity["resources"] == {"FOO": 1.0}
    assert "metrics" not in identity and "last_seen" not in identity
    assert sent[1] == ["remove", W0]
    h.step(ev.ClientDisconnected(sub))  # the shell: the subscriber's comm closed
    h.step(ev.WorkerDisconnected(W1))
    assert len(h.to_clients[sub]) == 2


def test_decoded_results_keep_their_message_for_the_task_stream() -> None:
    from dsched.core import inbound

    finished = {"op": "task-finished", "key": "x", "run_id": 1, "nbytes": 8, "thread": 3,
                "startstops": ({"action": "compute", "start": 1.0, "stop": 2.0},)}  # fmt: skip
    event = inbound.WORKER_DECODERS["task-finished"](W0, finished)
    assert isinstance(event, ev.TaskFinished) and event.msg is finished
    erred = {"op": "task-erred", "key": "x", "run_id": 1, "exception": b"e", "traceback": b"t"}
    event = inbound.WORKER_DECODERS["task-erred"](W0, erred)
    assert isinstance(event, ev.TaskErred) and event.msg is erred


def test_metadata_with_an_unhashable_key_fails_the_request() -> None:
    h = Harness(extensions=[Metadata()])
    failed = ask(h, "set_metadata", keys=({"not": "hashable"},), value=1)
    assert isinstance(failed, Fail) and isinstance(failed.exception, TypeError)
    assert not any(level == "error" for level, _ in h.logs)


def test_amm_and_replicate_leave_actors_alone() -> None:
    h = Harness(extensions=[MemoryManager(amm_start=False)])
    h.add_worker(W0)
    h.add_worker(W1)
    in_memory(h, "a")
    a = h.state.tasks["a"]
    other = W1 if next(iter(a.who_has)).address == W0 else W0
    h.step(ev.AddKeys(other, ["a"]))
    a.actor = True  # (as an actor's task would be marked at intake)
    ask(h, "amm_handler", method="run_once")
    assert len(a.who_has) == 2
    assert ask(h, "replicate", keys=("a",), n=1) is None
    assert len(a.who_has) == 2


def test_a_result_counts_by_the_transition_log_else_by_its_tasks_state() -> None:
    # The test both task streams (this extension and the dashboard's) use.
    h = Harness()
    h.add_worker(W0)
    h.add_client("c")
    h.submit({"a": ()}, keys=["a"])
    h.finish("a")
    state, made_up = h.state, f"TaskFinished-{h.now}"  # the harness's results carry no id
    assert state.finished_just_now("a", "memory", made_up, h.now)
    assert not state.finished_just_now("a", "memory", "task-finished-other", h.now)  # stale
    assert not state.finished_just_now("a", "memory", made_up, h.now + 1)  # a later event
    # The event moved more tasks than the log holds: its own move is gone, its task's
    # state tells.
    log = state.transition_log
    log.extend([("other", "waiting", "processing", made_up, h.now)] * (log.maxlen or 0))
    assert state.finished_just_now("a", "memory", made_up, h.now)
    assert not state.finished_just_now("a", "erred", made_up, h.now)
