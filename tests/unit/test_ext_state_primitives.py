"""Variables, queues and published datasets as pure extensions (no sockets, no loop).

A real ``SchedulerState`` + ``Core`` + policy runs the extensions (``harness.Harness``);
``Prims`` adds what the shell would do for them: RPCs in, answers and timers out, timers
fired when the test moves the clock. Where an error must match Dask's word for word, the
test asks Dask's own extension for it (``dask_error``).
"""

from __future__ import annotations

import asyncio
import types
from collections.abc import Hashable
from typing import Any

import pytest
from distributed.publish import PublishExtension
from distributed.queues import QueueExtension
from distributed.variable import VariableExtension
from harness import Harness

from dsched.core import Core
from dsched.ext.protocol import CancelTimer, Fail, Reply, SetTimer
from dsched.ext.publish import Publish
from dsched.ext.queues import BATCH_WITH_TIMEOUT, Queues
from dsched.ext.registry import default_extensions
from dsched.ext.variables import Variables
from dsched.state import events as ev

pytestmark = pytest.mark.timeout(60)

W1, W2 = "tcp://w1:1", "tcp://w2:2"
PEER = "tcp://client-comm:1"
PENDING = object()


class Prims(Harness):
    def __init__(self) -> None:
        self.variables = Variables()
        self.queues = Queues()
        self.publish = Publish()
        super().__init__(extensions=[self.variables, self.queues, self.publish])
        self.answers: dict[int, Reply | Fail] = {}
        self.timers: dict[tuple[str, Hashable], float] = {}
        for address in (W1, W2):
            self.add_worker(address)
        for client in ("c", "d"):
            self.add_client(client)

    # -------------------------------------------------------------- the shell's part
    def tick(self) -> Any:
        out = super().tick()
        flush = self.last_flush
        assert flush is not None
        for answer in flush.answers:
            assert answer.request not in self.answers, "answered twice"
            self.answers[answer.request] = answer
        for extension, timer in flush.timers:
            self.timers.pop((extension, timer.token), None)
            if isinstance(timer, SetTimer):
                self.timers[extension, timer.token] = timer.at
            else:
                assert isinstance(timer, CancelTimer)
        return out

    def request(self, op: str, **args: Any) -> int:
        self.now += 0.001
        request = self.core.request(op, PEER, args, self.now)
        self.tick()
        return request

    def stream(self, client: str, op: str, **msg: Any) -> None:
        self.now += 0.001
        self.core.stream(client, op, {"op": op, **msg}, self.now)
        self.tick()

    def advance(self, seconds: float) -> None:
        """Move the clock, firing the timers that fall due, in order."""
        until = self.now + seconds
        while True:
            due = [(at, key) for key, at in self.timers.items() if at <= until]
            if not due:
                break
            at, (extension, token) = min(due, key=lambda item: item[0])
            del self.timers[extension, token]
            self.now = max(self.now, at)
            self.core.timer(extension, token, self.now)
            self.tick()
        self.now = until

    def drop(self, request: int) -> None:
        self.core.drop_request(request, self.now)
        self.tick()

    # -------------------------------------------------------------- reading answers
    def result(self, request: int) -> Any:
        """The reply's value (PENDING while parked); a Fail is raised."""
        answer = self.answers.get(request)
        if answer is None:
            return PENDING
        if isinstance(answer, Fail):
            raise answer.exception
        return answer.value

    def call(self, op: str, **args: Any) -> Any:
        """An RPC that must be answered at once."""
        value = self.result(self.request(op, **args))
        assert value is not PENDING, f"{op} was parked"
        return value

    def error(self, request: int) -> BaseException:
        answer = self.answers[request]
        assert isinstance(answer, Fail), answer
        return answer.exception

    def wants(self, client: str) -> set[Any]:
        cs = self.state.clients.get(client)
        return set() if cs is None else {ts.key for ts in cs.wants}

    def compute(self, key: Any, client: str = "c") -> None:
        self.submit({key: ()}, keys=[key], client=client)
        self.run_until_idle()
        assert self.state.tasks[key].state == "memory"

    def assert_idle(self) -> None:
        """Nothing parked, no timer left behind."""
        assert self.core.parked_requests == 0
        assert not self.timers


def same_error(ours: BaseException, theirs: BaseException) -> None:
    assert type(ours) is type(theirs)
    assert str(ours) == str(theirs)


def dask_error(extension: type, method: str, **kwargs: Any) -> BaseException:
    """The exception Dask's own extension raises for this call (its scheduler faked)."""
    scheduler = types.SimpleNamespace(
        handlers={}, stream_handlers={}, tasks={}, clients={}, client_desires_keys=print
    )

    async def run() -> BaseException:
        handler = getattr(extension(scheduler), method)
        try:
            result = handler(**kwargs)
            if asyncio.iscoroutine(result):
                await result
        except Exception as exc:
            return exc
        raise AssertionError(f"Dask's {method} did not raise")

    return asyncio.run(run())


# ============================================================================= the wiring
def test_registered_and_no_per_task_cost():
    names = [ext.name for ext in default_extensions()]
    assert {"variables", "queues", "publish"} <= set(names)
    h = Prims()
    # None of them asks for transitions: the state machine reports none.
    assert not h.state.observe_transitions
    for ext in default_extensions():
        assert not (isinstance(ext, Variables | Queues | Publish) and ext.observes_transitions)
    core = Core(h.state, h.policy, default_extensions())
    for op in ("variable_set", "variable_get", "queue_put", "publish_put", "publish_list"):
        assert core.serves_rpc(op)
    for op in ("variable_delete", "queue_release", "publish_flush_batched_send"):
        assert core.serves_stream(op)


# ============================================================================= variables
def test_variable_msgpack_set_and_get():
    h = Prims()
    assert h.call("variable_set", name="x", data=[1, 2], timeout="30 s") is None
    assert h.call("variable_get", name="x", client="c") == {"type": "msgpack", "value": [1, 2]}
    h.call("variable_set", name="x", data="new")
    assert h.call("variable_get", name="x", client="d")["value"] == "new"
    h.stream("c", "variable_delete", name="x")
    assert "x" not in h.variables.variables
    h.assert_idle()


def test_variable_get_waits_for_the_set_or_times_out():
    h = Prims()
    waiting = h.request("variable_get", name="x", client="c", timeout=None)
    bounded = h.request("variable_get", name="x", client="d", timeout=5)
    assert h.result(waiting) is PENDING and h.result(bounded) is PENDING
    h.advance(4.9)
    assert h.result(bounded) is PENDING
    h.advance(0.2)
    err = h.error(bounded)
    same_error(err, TimeoutError())
    assert h.result(waiting) is PENDING
    h.call("variable_set", name="x", data=7)
    assert h.result(waiting) == {"type": "msgpack", "value": 7}
    h.assert_idle()


@pytest.mark.parametrize("timeout", [0, -1, 0.0])
def test_variable_get_with_no_time_left_fails_at_once(timeout):
    h = Prims()
    same_error(h.error(h.request("variable_get", name="x", timeout=timeout)), TimeoutError())
    h.assert_idle()
    # ...but a variable that is there is returned whatever the timeout.
    h.call("variable_set", name="x", data=1)
    assert h.call("variable_get", name="x", timeout=0)["value"] == 1


def test_variable_future_is_held_by_its_pseudo_client_and_outlives_its_setter():
    h = Prims()
    h.compute("k", client="c")
    h.call("variable_set", name="x", key="k")
    assert h.wants("variable-x") == {"k"}
    h.step(ev.ClientDisconnected("c"))  # the setter leaves
    assert h.state.tasks["k"].state == "memory"
    record = h.call("variable_get", name="x", client="d")
    assert record["type"] == "Future" and record["value"] == "k"
    assert record["state"] == "memory"
    assert isinstance(record["token"], str) and len(record["token"]) == 32
    # The getter confirms: it holds the key itself, the token is done.
    h.stream("d", "variable-future-received-confirm", name="x", key="k", token=record["token"])
    assert "k" in h.wants("d")
    assert not h.variables.waiting
    # Deleting the variable drops its pseudo-client; d still holds k.
    h.stream("d", "variable_delete", name="x")
    assert "variable-x" not in h.state.clients
    assert h.state.tasks["k"].state == "memory"
    h.step(ev.ClientReleasesKeys("d", ["k"]))
    assert "k" not in h.state.tasks


def test_variable_delete_releases_the_future():
    h = Prims()
    h.compute("k")
    h.call("variable_set", name="x", key="k")
    h.step(ev.ClientReleasesKeys("c", ["k"]))
    assert "k" in h.state.tasks
    h.stream("c", "variable_delete", name="x")
    assert "k" not in h.state.tasks
    assert "variable-x" not in h.state.clients
    assert h.variables.variables == {}


def test_variable_set_waits_for_the_key_to_be_known():
    h = Prims()
    setting = h.request("variable_set", name="x", key="later", timeout="30 s")
    getting = h.request("variable_get", name="x", client="d")
    assert h.result(setting) is PENDING and h.result(getting) is PENDING
    h.advance(10)
    h.submit({"later": ()}, keys=["later"], client="c")  # its update-graph comes second
    assert h.result(setting) is None
    record = h.result(getting)
    assert record["value"] == "later" and record["state"] in {"waiting", "processing", "ready"}
    assert h.wants("variable-x") == {"later"}
    h.assert_idle()


def test_variable_set_of_a_scattered_key_waits_for_the_scatter():
    h = Prims()
    setting = h.request("variable_set", name="x", key="s", timeout=None)
    h.step(ev.DataPlaced("c", {"s": [W1]}, {"s": 8}))
    assert h.result(setting) is None
    assert h.wants("variable-x") == {"s"}


def test_variable_set_of_an_unknown_key_times_out_with_dasks_message():
    h = Prims()
    setting = h.request("variable_set", name="x", key=("k", 1), timeout="2 s")
    h.advance(1.9)
    assert h.result(setting) is PENDING
    h.advance(0.2)
    same_error(h.error(setting), TimeoutError("Task ('k', 1) unknown to scheduler."))
    h.submit({("k", 1): ()}, keys=[("k", 1)])  # too late: nothing happens
    assert "x" not in h.variables.variables
    h.assert_idle()


def test_variable_replacing_a_future_waits_for_its_tokens():
    h = Prims()
    h.compute("a")
    h.compute("b")
    h.call("variable_set", name="x", key="a")
    h.step(ev.ClientReleasesKeys("c", ["a"]))
    record = h.call("variable_get", name="x", client="d")
    h.call("variable_set", name="x", key="b")
    # d has not confirmed yet: a must not go.
    assert h.state.tasks["a"].state == "memory"
    assert h.wants("variable-x") == {"a", "b"}
    h.stream("d", "variable-future-received-confirm", name="x", key="a", token=record["token"])
    assert h.wants("variable-x") == {"b"}
    assert h.wants("d") == {"a"}
    assert h.state.tasks["a"].state == "memory"


def test_variable_set_back_to_an_old_future_keeps_holding_it():
    h = Prims()
    for key in ("a", "b"):
        h.compute(key)
    h.call("variable_set", name="x", key="a")
    token = h.call("variable_get", name="x", client="d")["token"]
    h.call("variable_set", name="x", key="b")
    h.step(ev.ClientReleasesKeys("c", ["a", "b"]))
    h.call("variable_set", name="x", key="a")  # a again, while its let-go still waits
    h.stream("d", "variable-future-received-confirm", name="x", key="a", token=token)
    h.step(ev.ClientReleasesKeys("d", ["a"]))
    assert h.wants("variable-x") == {"a"}
    assert h.state.tasks["a"].state == "memory"
    assert "b" not in h.state.tasks


def test_variable_delete_waits_for_tokens_and_a_leaving_getter_ends_them():
    h = Prims()
    h.compute("a")
    h.call("variable_set", name="x", key="a")
    h.step(ev.ClientReleasesKeys("c", ["a"]))
    h.call("variable_get", name="x", client="d")  # d never confirms
    h.stream("c", "variable_delete", name="x")
    assert h.variables.variables["x"]["value"] == "a"  # Dask deletes after the tokens
    assert h.state.tasks["a"].state == "memory"
    h.step(ev.ClientDisconnected("d"))
    assert "x" not in h.variables.variables
    assert "a" not in h.state.tasks
    assert "variable-x" not in h.state.clients
    assert not h.variables.waiting


def test_variable_future_record_of_erred_and_lost_keys():
    h = Prims()
    h.submit({"bad": ()}, keys=["bad"])
    h.run_until_idle(fail=["bad"])
    h.call("variable_set", name="x", key="bad")
    record = h.call("variable_get", name="x", client="d")
    assert record["state"] == "erred"
    assert record["exception"] == "boom" and record["traceback"] == "tb"
    h.stream("d", "variable-future-received-confirm", name="x", key="bad", token=record["token"])
    h.step(ev.Restart())  # every client, pseudo-clients too, lets go of every key
    record = h.call("variable_get", name="x", client="d")
    assert record["state"] == "lost" and "exception" not in record


def test_variable_parked_requests_whose_peer_left_are_forgotten():
    h = Prims()
    getting = h.request("variable_get", name="x", timeout=100)
    setting = h.request("variable_set", name="y", key="nope", timeout=100)
    h.drop(getting)
    h.drop(setting)
    h.assert_idle()
    h.call("variable_set", name="x", data=1)
    h.submit({"nope": ()}, keys=["nope"])
    assert "y" not in h.variables.variables
    assert getting not in h.answers and setting not in h.answers


def test_variable_confirming_an_unknown_token_still_wants_the_key():
    h = Prims()
    h.compute("k")
    h.stream("d", "variable-future-received-confirm", name="x", key="k", token="bogus")
    assert "k" in h.wants("d")
    assert any("unknown variable token" in text for _, text in h.logs)


def test_variable_errors_are_dasks():
    h = Prims()
    same_error(
        h.error(h.request("variable_get", name="x", bogus=1)),
        dask_error(VariableExtension, "get", name="x", bogus=1),
    )
    same_error(
        h.error(h.request("variable_set", name="x", data=1, timeout="3 parsecs")),
        dask_error(VariableExtension, "set", name="x", data=1, timeout="3 parsecs"),
    )
    same_error(
        h.error(h.request("variable_get", name="x", timeout="soon")),
        dask_error(VariableExtension, "get", name="x", timeout="soon"),
    )
    h.assert_idle()


# ============================================================================= queues
def test_queue_fifo_qsize_and_release():
    h = Prims()
    h.call("queue_create", name="q", maxsize=0)
    for i in range(3):
        h.call("queue_put", name="q", data=i)
    assert h.call("queue_qsize", name="q") == 3
    assert [h.call("queue_get", name="q")["value"] for _ in range(2)] == [0, 1]
    assert h.call("queue_get", name="q", batch=True) == [{"type": "msgpack", "value": 2}]
    assert h.call("queue_get", name="q", batch=True) == []
    h.stream("c", "queue_release", name="q")
    assert h.queues.queues == {}


def test_queue_is_shared_and_lives_until_its_last_user_releases_it():
    h = Prims()
    h.call("queue_create", name="q")
    h.call("queue_create", name="q", maxsize=5)  # a second user; its maxsize is ignored
    h.call("queue_put", name="q", data="x")
    h.stream("c", "queue_release", name="q")
    assert h.call("queue_qsize", name="q") == 1
    h.stream("d", "queue_release", name="q")
    same_error(h.error(h.request("queue_qsize", name="q")), KeyError("q"))
    h.stream("d", "queue_release", name="q")  # unknown: ignored


def test_queue_get_waits_and_times_out():
    h = Prims()
    h.call("queue_create", name="q")
    first = h.request("queue_get", name="q", timeout=None)
    second = h.request("queue_get", name="q", timeout=2)
    h.advance(2.1)
    same_error(h.error(second), TimeoutError())
    h.call("queue_put", name="q", data="a")
    assert h.result(first) == {"type": "msgpack", "value": "a"}
    # With no time left, a get succeeds if something is there, else fails at once.
    h.call("queue_put", name="q", data="b")
    assert h.call("queue_get", name="q", timeout=0)["value"] == "b"
    same_error(h.error(h.request("queue_get", name="q", timeout=0)), TimeoutError())
    h.assert_idle()


def test_queue_maxsize_parks_putters_until_room():
    h = Prims()
    h.call("queue_create", name="q", maxsize=1)
    h.call("queue_put", name="q", data=1)
    blocked = h.request("queue_put", name="q", data=2, timeout=None)
    bounded = h.request("queue_put", name="q", data=3, timeout=1)
    same_error(h.error(h.request("queue_put", name="q", data=4, timeout=0)), TimeoutError())
    assert h.result(blocked) is PENDING
    h.advance(1.5)
    same_error(h.error(bounded), TimeoutError())
    assert h.call("queue_get", name="q")["value"] == 1
    assert h.result(blocked) is None  # let in by the get
    assert h.call("queue_qsize", name="q") == 1
    assert h.call("queue_get", name="q")["value"] == 2
    assert h.call("queue_qsize", name="q") == 0
    h.assert_idle()


def test_queue_batches():
    h = Prims()
    h.call("queue_create", name="q")
    h.call("queue_put", name="q", data="a")
    batch = h.request("queue_get", name="q", batch=3)
    assert h.result(batch) is PENDING
    # The batch getter took "a" at once and waits for more; the single getter is next.
    single = h.request("queue_get", name="q")
    h.call("queue_put", name="q", data="b")
    assert h.result(single) is PENDING
    # After "b" the batch getter queued up again behind the single getter.
    h.call("queue_put", name="q", data="c")
    assert h.result(single)["value"] == "c"
    h.call("queue_put", name="q", data="d")
    assert [r["value"] for r in h.result(batch)] == ["a", "b", "d"]
    assert h.call("queue_get", name="q", batch=-1) == []
    h.call("queue_put", name="q", data="e")
    assert h.call("queue_get", name="q", batch=1) == [{"type": "msgpack", "value": "e"}]
    h.assert_idle()


def test_queue_batch_and_single_getters_interleave_as_in_dask():
    """The same calls through Dask's own QueueExtension (on a loop) and ours."""

    async def dask_side() -> tuple[Any, Any]:
        scheduler = types.SimpleNamespace(handlers={}, stream_handlers={}, tasks={})
        queues = QueueExtension(scheduler)
        queues.create(name="q")
        await queues.put(name="q", data="a")
        batch = asyncio.ensure_future(queues.get(name="q", batch=3))
        await asyncio.sleep(0)
        single = asyncio.ensure_future(queues.get(name="q"))
        await asyncio.sleep(0)
        for data in "bcd":
            await queues.put(name="q", data=data)
            for _ in range(3):
                await asyncio.sleep(0)
        return await single, await batch

    h = Prims()
    h.call("queue_create", name="q")
    h.call("queue_put", name="q", data="a")
    batch = h.request("queue_get", name="q", batch=3)
    single = h.request("queue_get", name="q")
    for data in "bcd":
        h.call("queue_put", name="q", data=data)
    assert (h.result(single), h.result(batch)) == asyncio.run(dask_side())


def test_queue_errors_are_dasks():
    h = Prims()
    for op, args in [
        ("queue_put", {"name": "nope", "data": 1}),
        ("queue_get", {"name": "nope"}),
        ("queue_get", {"name": "nope", "batch": True}),
        ("queue_qsize", {"name": "nope"}),
    ]:
        method = {"queue_put": "put", "queue_get": "get", "queue_qsize": "qsize"}[op]
        same_error(h.error(h.request(op, **args)), dask_error(QueueExtension, method, **args))
    h.call("queue_create", name="q")
    same_error(
        h.error(h.request("queue_get", name="q", batch=2, timeout=1)),
        NotImplementedError(BATCH_WITH_TIMEOUT),
    )
    same_error(
        h.error(h.request("queue_get", name="q", batch="x")),
        TypeError("'str' object cannot be interpreted as an integer"),
    )
    same_error(
        h.error(h.request("queue_put", name="q", data=1, timeout="1s")),
        TypeError("unsupported operand type(s) for +: 'float' and 'str'"),
    )
    same_error(
        h.error(h.request("queue_qsize", name="q", maxsize=1)),
        dask_error(QueueExtension, "qsize", name="q", maxsize=1),
    )
    # A maxsize that is no number is accepted by create and fails every put (asyncio's rule).
    h.call("queue_create", name="bad", maxsize="3")
    with pytest.raises(TypeError, match="'<=' not supported between instances of 'str' and"):
        h.call("queue_put", name="bad", data=1)
    assert h.call("queue_qsize", name="bad") == 0
    h.assert_idle()


def test_queue_of_futures_holds_keys_until_the_getter_does():
    h = Prims()
    h.compute("k")
    h.call("queue_create", name="q")
    h.call("queue_put", name="q", key="k")
    h.call("queue_put", name="q", key="k")
    h.step(ev.ClientReleasesKeys("c", ["k"]))
    assert h.wants("queue-q") == {"k"}
    record = h.call("queue_get", name="q")
    assert record == {"type": "Future", "value": "k", "state": "memory"}
    h.stream("d", "queue-future-release", name="q", key="k")
    assert "k" in h.wants("d")
    assert h.wants("queue-q") == {"k"}  # the second record still holds it
    h.call("queue_get", name="q")
    h.stream("d", "queue-future-release", name="q", key="k")
    assert h.wants("queue-q") == set()
    assert h.queues.future_refcount == {}
    h.step(ev.ClientReleasesKeys("d", ["k"]))
    assert "k" not in h.state.tasks


def test_queue_release_lets_go_of_the_futures_in_it():
    h = Prims()
    h.compute("k")
    h.call("queue_create", name="q")
    h.call("queue_put", name="q", key="k")
    h.step(ev.ClientReleasesKeys("c", ["k"]))
    h.stream("c", "queue_release", name="q")
    assert "k" not in h.state.tasks
    assert h.queues.future_refcount == {}


def test_queue_put_of_an_unknown_key_waits_for_it():
    h = Prims()
    h.call("queue_create", name="q")
    putting = h.request("queue_put", name="q", key="later", timeout=5)
    timing_out = h.request("queue_put", name="q", key="never", timeout=5)
    h.advance(1)
    h.submit({"later": ()}, keys=["later"])
    assert h.result(putting) is None
    h.advance(5)
    same_error(h.error(timing_out), TimeoutError("Task never unknown to scheduler."))
    assert h.call("queue_qsize", name="q") == 1
    assert h.wants("queue-q") == {"later"}
    h.assert_idle()


def test_queue_failed_or_dropped_future_puts_hold_nothing():
    h = Prims()
    h.compute("k")
    h.call("queue_create", name="q", maxsize=1)
    h.call("queue_put", name="q", data="filler")
    timed_out = h.request("queue_put", name="q", key="k", timeout=1)
    dropped = h.request("queue_put", name="q", key="k", timeout=None)
    assert h.wants("queue-q") == {"k"}
    h.advance(2)
    same_error(h.error(timed_out), TimeoutError())
    h.drop(dropped)
    assert h.wants("queue-q") == set()
    same_error(h.error(h.request("queue_put", name="nope", key="k")), KeyError("nope"))
    assert h.wants("queue-nope") == set()
    h.assert_idle()


def test_queue_dropped_getters_are_forgotten_and_give_back_what_they_took():
    h = Prims()
    h.call("queue_create", name="q")
    h.call("queue_put", name="q", data="a")
    batch = h.request("queue_get", name="q", batch=2)
    single = h.request("queue_get", name="q", timeout=10)
    h.drop(batch)
    # "a" went back to the queue, and to the next getter in line.
    assert h.result(single)["value"] == "a"
    lonely = h.request("queue_get", name="q", timeout=10)
    h.drop(lonely)
    h.call("queue_put", name="q", data="b")
    assert h.call("queue_qsize", name="q") == 1
    h.assert_idle()


def test_queue_getters_on_a_deleted_queue_still_time_out():
    h = Prims()
    h.call("queue_create", name="q")
    orphan = h.request("queue_get", name="q", timeout=3)
    h.stream("c", "queue_release", name="q")
    h.call("queue_create", name="q")
    h.call("queue_put", name="q", data=1)  # a new queue: the orphan does not see it
    assert h.result(orphan) is PENDING
    h.advance(3.5)
    same_error(h.error(orphan), TimeoutError())


# ============================================================================= datasets
def publish(h: Prims, names: list[Any], keys: list[list[Any]], client: str = "c", **kw: Any):
    """What Client.publish_dataset sends: the flush on the stream, then the RPC."""
    uid = f"uid-{h.now}"
    h.stream(client, "publish_flush_batched_send", uid=uid)
    data = [f"serialized-{name}" for name in names]
    return h.request(
        "publish_put",
        names=names,
        keys=keys,
        data=data,
        override=kw.get("override", False),
        client=client,
        uid=uid,
    )


def test_publish_waits_for_the_flush_from_the_stream():
    h = Prims()
    putting = h.request(
        "publish_put", names=["ds"], keys=[["k"]], data=["D"], override=False, client="c", uid="u"
    )
    assert h.result(putting) is PENDING
    h.submit({"k": ()}, keys=["k"])  # the persist that travelled on the stream ...
    h.stream("c", "publish_flush_batched_send", uid="u")  # ... just before the flush
    assert h.result(putting) is None
    assert h.wants("published-ds") == {"k"}
    assert h.call("publish_get", names=["ds", "other"]) == [{"data": "D", "keys": ["k"]}, None]
    h.assert_idle()


def test_published_data_survives_its_publisher_and_goes_on_delete():
    h = Prims()
    h.compute("k", client="c")
    assert h.result(publish(h, ["ds"], [["k"]])) is None
    h.step(ev.ClientDisconnected("c"))
    assert h.state.tasks["k"].state == "memory"
    assert h.call("publish_list") == ["ds"]
    h.stream("d", "publish_flush_batched_send", uid="del")
    assert h.call("publish_delete", names=["ds", "absent"], client="d", uid="del") is None
    assert h.call("publish_list") == []
    assert "k" not in h.state.tasks


def test_publish_override_and_duplicates():
    h = Prims()
    for key in ("a", "b", "c"):
        h.compute(key)
    h.result(publish(h, ["one"], [["a", "b"]]))
    same_error(
        h.error(publish(h, ["two", "one"], [["c"], ["c"]])),
        KeyError("Dataset one already exists"),
    )
    h.step(ev.ClientReleasesKeys("c", ["a", "b", "c"]))
    assert h.call("publish_list") == ["one", "two"]  # "two" stays published, as in Dask
    assert h.result(publish(h, ["one"], [["b", "c"]], override=True)) is None
    assert h.wants("published-one") == {"b", "c"}
    assert "a" not in h.state.tasks
    assert h.state.tasks["b"].state == "memory"  # shared by old and new: never released


def test_publish_names_are_keys_sorted_by_str():
    h = Prims()
    h.compute("k")
    for name in ["b", ("a", 1), 3]:
        h.result(publish(h, [name], [["k"]]))
    assert h.call("publish_list") == [("a", 1), 3, "b"]
    # The pseudo-client is named with dask.utils.stringify, as Dask's.
    assert h.wants("published-('a', 1)") == {"k"}
    assert h.wants("published-3") == {"k"}


def test_publish_flush_that_never_comes():
    h = Prims()
    putting = h.request(
        "publish_put", names=["ds"], keys=[[]], data=["D"], override=False, client="c", uid="u"
    )
    h.advance(65)  # Dask re-checks every 30 s while the client is there
    assert h.result(putting) is PENDING
    h.step(ev.ClientDisconnected("c"))
    same_error(h.error(putting), TimeoutError())
    dropped = h.request("publish_delete", names=["ds"], client="d", uid="v")
    h.drop(dropped)
    h.assert_idle()
    assert h.call("publish_list") == []


def test_publish_delete_waits_for_its_flush_too_and_unused_flushes_go_with_the_client():
    h = Prims()
    h.compute("k")
    h.result(publish(h, ["ds"], [["k"]]))
    deleting = h.request("publish_delete", names=["ds"], client="d", uid="later")
    assert h.result(deleting) is PENDING
    assert h.call("publish_list") == ["ds"]
    h.stream("d", "publish_flush_batched_send", uid="later")
    assert h.result(deleting) is None
    assert h.call("publish_list") == []
    h.stream("d", "publish_flush_batched_send", uid="never-used")
    assert h.publish._flushed
    h.step(ev.ClientDisconnected("d"))
    assert not h.publish._flushed
    h.assert_idle()


def test_publish_errors_are_dasks():
    h = Prims()
    same_error(
        h.error(h.request("publish_list", bogus=1)),
        dask_error(PublishExtension, "list", bogus=1),
    )
    same_error(
        h.error(h.request("publish_get")),
        dask_error(PublishExtension, "get"),
    )
    same_error(
        h.error(h.request("publish_put", names=["x"], keys=[], data=[], client="c")),
        dask_error(PublishExtension, "put", names=["x"], keys=[], data=[], client="c"),
    )
    h.stream("c", "publish_flush_batched_send", uid="u")
    mismatch = h.request(
        "publish_put", names=["x"], keys=[], data=[], override=False, client="c", uid="u"
    )
    with pytest.raises(ValueError, match=r"zip\(\) argument 2 is shorter than argument 1"):
        h.result(mismatch)
    h.assert_idle()


def test_extension_state_is_empty_after_everything_is_deleted():
    h = Prims()
    h.compute("k")
    h.call("variable_set", name="x", key="k")
    token = h.call("variable_get", name="x", client="d")["token"]
    h.stream("d", "variable-future-received-confirm", name="x", key="k", token=token)
    h.stream("c", "variable_delete", name="x")
    h.call("queue_create", name="q")
    h.call("queue_put", name="q", key="k")
    h.call("queue_get", name="q")
    h.stream("d", "queue-future-release", name="q", key="k")
    h.stream("c", "queue_release", name="q")
    h.result(publish(h, ["ds"], [["k"]]))
    h.stream("c", "publish_flush_batched_send", uid="z")
    h.call("publish_delete", names=["ds"], client="c", uid="z")
    for ext in (h.variables, h.queues, h.publish):
        leftovers = {
            attr: value
            for attr, value in vars(ext).items()
            if attr != "state" and isinstance(value, dict) and value
        }
        assert not leftovers, (ext.name, leftovers)
    assert not h.variables._key_waits and not h.queues._key_waits
    assert h.wants("queue-q") == set() and h.wants("published-ds") == set()
