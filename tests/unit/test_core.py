"""The core without an event loop: extensions' RPCs, parked requests, timers, the capped
state <-> policy loop, observations fanned out only to those who declared them."""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from typing import Any, ClassVar

import pytest
from harness import Harness

from dsched.core import FlushLoopError
from dsched.ext.protocol import (
    Effects,
    Extension,
    Fail,
    Reply,
    Request,
    SetTimer,
    Stimulus,
    Transition,
)
from dsched.ext.pubsub import PubSub
from dsched.ext.queries import ClusterQueries
from dsched.policy import protocol as p
from dsched.state import events as ev

pytestmark = pytest.mark.timeout(60)

W0 = "tcp://w0:1"


def test_an_extension_rpc_is_answered_in_the_same_tick() -> None:
    h = Harness(extensions=[ClusterQueries()])
    h.add_worker(W0)
    h.add_client("c")
    h.submit({"x": ()}, keys=["x"])
    rid = h.core.request("get_task_status", "tcp://client", {"keys": ["x", "nope"]}, h.now)
    h.tick()
    assert h.last_flush is not None
    assert h.last_flush.answers == [Reply(rid, {"x": "processing", "nope": None})]


class Gate(Extension):
    """Parks 'wait' until 'open' (or its timeout); holds a key through a pseudo-client."""

    name = "gate"
    rpc_ops: ClassVar = {"wait": "wait", "open": "open"}
    observes = frozenset({ev.ClientDisconnected})
    observes_transitions = True

    def __init__(self) -> None:
        self.waiting: list[int] = []
        self.seen: list[Transition] = []
        self.disconnected: list[str] = []

    def wait(self, request: Request, now: float) -> Effects:
        self.waiting.append(request.id)
        return [SetTimer(request.id, now + float(request.args["timeout"]))]

    def open(self, request: Request, now: float) -> Effects:
        answers = [Reply(rid, True) for rid in self.waiting]
        self.waiting.clear()
        hold = Stimulus(ev.ClientDesiresKeys("gate-holder", [request.args["key"]]))
        return [*answers, hold, Reply(request.id, None)]

    def on_timer(self, token: Hashable, now: float) -> Effects:
        assert isinstance(token, int)
        if token in self.waiting:
            self.waiting.remove(token)
            return [Fail(token, TimeoutError("gate stayed shut"))]
        return []

    def on_transitions(self, transitions: Sequence[Transition], now: float) -> Effects:
        self.seen.extend(transitions)
        return []

    def on_event(self, event: ev.Event, now: float) -> Effects:
        assert isinstance(event, ev.ClientDisconnected)
        self.disconnected.append(event.client)
        return []


def test_a_parked_request_is_answered_by_a_later_call_and_a_timer_fails_another() -> None:
    gate = Gate()
    h = Harness(extensions=[gate])
    h.add_worker(W0)
    h.add_client("c")
    first = h.core.request("wait", "peer", {"timeout": 5}, h.now)
    second = h.core.request("wait", "peer", {"timeout": 1}, h.now)
    h.tick()
    assert h.last_flush is not None
    assert h.last_flush.answers == []
    assert [t.token for _, t in h.last_flush.timers] == [first, second]
    h.core.timer("gate", second, h.now + 1)
    h.tick()
    (answer,) = h.last_flush.answers
    assert isinstance(answer, Fail) and answer.request == second
    h.submit({"x": ()}, keys=["x"])
    opened = h.core.request("open", "peer", {"key": "x"}, h.now)
    h.tick()
    assert h.last_flush.answers == [Reply(first, True), Reply(opened, None)]
    assert h.core.parked_requests == 0
    # The stimulus made a pseudo-client hold x: the client letting go leaves it in place.
    h.finish("x")
    h.step(ev.ClientReleasesKeys("c", ["x"]))
    assert h.state.tasks["x"].state == "memory"
    assert ("x", "processing", "memory") in {t[:3] for t in gate.seen}


def test_observations_reach_only_the_extensions_that_declared_them() -> None:
    gate = Gate()
    h = Harness(extensions=[gate, PubSub()])
    h.add_client("c")
    h.step(ev.ClientDisconnected("c"))
    assert gate.disconnected == ["c"]
    # Nobody observes WorkerConnected: the core keeps no observer list for it.
    assert ev.WorkerConnected not in h.core._observers


def test_transitions_are_not_even_recorded_when_nobody_observes_them() -> None:
    h = Harness(extensions=[PubSub(), ClusterQueries()])
    assert not h.state.observe_transitions
    h.add_worker(W0)
    h.add_client("c")
    out = h.submit({"x": ()}, keys=["x"])
    assert out.transitions == []


def test_pubsub_events_go_to_subscribers_in_the_tick_batch() -> None:
    h = Harness(extensions=[PubSub(maxlen=2)])
    h.add_client("c")
    h.core.stream("c", "subscribe-topic", {"op": "subscribe-topic", "topic": "t"}, h.now)
    for i in range(3):
        h.core.request("log_event", "peer", {"topic": "t", "msg": i}, h.now)
    out = h.tick()
    assert [m["event"][1] for m in out.to_clients["c"]] == [0, 1, 2]
    rid = h.core.request("events", "peer", {"topic": "t"}, h.now)
    h.tick()
    assert h.last_flush is not None
    (answer,) = h.last_flush.answers
    assert answer.request == rid
    assert isinstance(answer, Reply) and [e[1] for e in answer.value] == [1, 2]  # bounded
    assert PubSub().publish("t", "m", 1.0) == []  # nobody subscribed: nothing sent


class PingPong:
    """A broken policy: answers every TaskDone with a stale assignment, forever."""

    def handle(self, events: Sequence[p.PolicyEvent], now: float) -> list[Any]:
        return [p.Assignment(123456, 0)]


def test_a_state_and_policy_that_never_settle_raise_a_clear_internal_error() -> None:
    h = Harness(policy=PingPong())  # type: ignore[arg-type]
    h.core.handle(ev.WorkerConnected(W0, 1), h.now)
    with pytest.raises(FlushLoopError, match="did not settle"):
        h.core.flush(h.now)


def test_an_extension_idle_until_used_observes_nothing_until_then() -> None:
    """The task stream subscribes to task results with an Observe effect on first use."""
    from dsched.ext.task_stream import TaskStream

    h = Harness(extensions=[TaskStream()])
    assert ev.TaskFinished not in h.core._observers
    h.core.request("get_task_stream_index", "peer", {}, h.now)
    h.tick()
    assert [type(e).__name__ for e in h.core._observers[ev.TaskFinished]] == ["TaskStream"]
