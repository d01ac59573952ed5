"""The scheduler facade and the scheduler-plugin hook dispatch, on the real Core driven by
the unit-test harness (no sockets; a tiny stand-in for the shell's Scheduler).

Views read through the state records (never stale, never copies) and use Dask's state
names; a hook no plugin overrides is not even observed (the state machine does not record
transitions unless some plugin overrides ``transition``); hooks get Dask's arguments; a
hook that raises is logged and dispatch goes on; a plugin may remove itself from within a
hook (Progress does); worker/nanny plugin registration is idempotent and unknown names
raise ValueError.
"""

from __future__ import annotations

import asyncio
import logging
from types import SimpleNamespace
from typing import Any

import pytest
from distributed.diagnostics.plugin import SchedulerPlugin
from harness import Harness

from dsched.ext.pubsub import PubSub
from dsched.server.facade import ForgottenTask, TaskView, WorkerView
from dsched.server.plugins import Plugins, overrides
from dsched.state import events as ev

pytestmark = pytest.mark.timeout(60)

W0, W1 = "tcp://127.0.0.1:1", "tcp://127.0.0.1:2"


class Shell:
    """What Plugins and the facade read of the shell's Scheduler."""

    def __init__(self, h: Harness) -> None:
        self.core = h.core
        self.state = h.state
        self.id = "Scheduler-test"
        self.address = "tcp://127.0.0.1:8786"
        self.rpc_ops: dict[str, Any] = {"identity": object()}
        self.spawned: list[Any] = []
        self.broadcasts: list[tuple[dict[str, Any], bool]] = []
        self.reactor = SimpleNamespace(spawn=self.spawned.append, request=self._request)
        self.data = SimpleNamespace(broadcast=self._broadcast)

    async def _request(self, op: str, peer: str, args: dict[str, Any]) -> None:
        return None

    async def _broadcast(self, msg: dict[str, Any], nanny: bool = False) -> dict[str, Any]:
        self.broadcasts.append((msg, nanny))
        return {address: {"status": "OK"} for address in self.state.workers}


def setup(*extensions: Any) -> tuple[Harness, Shell, Plugins]:
    h = Harness(extensions=list(extensions))
    shell = Shell(h)
    plugins = Plugins(shell)
    return h, shell, plugins


class Recorder(SchedulerPlugin):
    name = "recorder"

    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []

    def transition(self, key: Any, start: str, finish: str, *args: Any, **kwargs: Any) -> None:
        self.calls.append(("transition", key, start, finish, sorted(kwargs)))

    def add_worker(self, scheduler: Any, worker: str) -> None:
        self.calls.append(("add_worker", worker))

    def remove_worker(self, scheduler: Any, worker: str, *, stimulus_id: str, **kw: Any) -> None:
        self.calls.append(("remove_worker", worker))

    def add_client(self, scheduler: Any, client: str) -> None:
        self.calls.append(("add_client", client))

    def remove_client(self, scheduler: Any, client: str) -> None:
        self.calls.append(("remove_client", client))

    def update_graph(self, scheduler: Any, **kwargs: Any) -> None:
        self.calls.append(("update_graph", kwargs["client"], sorted(kwargs["tasks"])))
        self.calls.append(("graph-args", sorted(kwargs)))

    def log_event(self, topic: str, msg: Any) -> None:
        self.calls.append(("log_event", topic, msg))


class OnlyWorkers(SchedulerPlugin):
    name = "only-workers"

    def __init__(self) -> None:
        self.workers: list[str] = []

    def add_worker(self, scheduler: Any, worker: str) -> None:
        self.workers.append(worker)


def test_views_read_through_the_records_with_dask_names() -> None:
    h, _, plugins = setup()
    facade = plugins.facade
    h.add_worker(W0)
    h.add_client("c")
    h.submit({"x": (), "y": ("x",)}, keys=["y"])
    x = facade.tasks["x"]
    assert isinstance(x, TaskView) and x.key == "x" and x.state == "processing"
    assert x.who_has == set()
    h.finish("x", nbytes=100)
    # The same view object sees the new state: nothing was copied.
    assert x.state == "memory" and x.nbytes == 100
    assert x.who_has == {facade.workers[W0]}
    y = facade.tasks["y"]
    assert y.dependencies == {x} and x.dependents == {y}
    assert facade.workers[W0] == WorkerView(h.state.workers[W0])
    ws = facade.workers[W0]
    assert (ws.address, ws.nthreads, ws.host, ws.status) == (W0, 1, "127.0.0.1", "running")
    assert x in ws.has_what and y in ws.processing
    assert set(facade.workers) == {W0} and len(facade.tasks) == 2 and "y" in facade.tasks
    assert facade.clients["c"].wants_what == {y}
    with pytest.raises(KeyError):
        facade.tasks["nope"]


def test_ready_reads_as_queued() -> None:
    h, _, plugins = setup()
    h.add_client("c")
    h.submit({"x": ()}, keys=["x"])  # no worker: the policy cannot place it
    state = h.state.tasks["x"].state
    expected = {"ready": "queued"}.get(state, state)
    assert plugins.facade.tasks["x"].state == expected


def test_a_hook_nobody_overrides_is_not_observed() -> None:
    h, _, plugins = setup()
    assert not overrides(OnlyWorkers(), "transition")
    assert overrides(OnlyWorkers(), "add_worker")
    plugins.add_plugin(OnlyWorkers())
    assert h.state.observe_transitions is False
    assert h.core._observers.get(ev.WorkerConnected) == [plugins.hooks]
    assert ev.ClientConnected not in h.core._observers
    h.add_worker(W0)
    assert plugins.scheduler_plugins["only-workers"].workers == [W0]
    plugins.add_plugin(Recorder())
    assert h.state.observe_transitions is True
    plugins.remove_plugin("recorder")
    assert h.state.observe_transitions is False
    plugins.remove_plugin("only-workers")
    assert ev.WorkerConnected not in h.core._observers
    with pytest.raises(ValueError, match="Could not find plugin"):
        plugins.remove_plugin("only-workers")


def test_hooks_get_dasks_arguments() -> None:
    h, _, plugins = setup()
    recorder = Recorder()
    plugins.add_plugin(recorder)
    h.add_worker(W0)
    h.add_client("c")
    h.submit({"x": ()}, keys=["x"])
    h.finish("x")
    h.step(ev.ClientReleasesKeys("c", ["x"]))
    h.step(ev.ClientDisconnected("c"))
    h.step(ev.WorkerDisconnected(W0))
    calls = recorder.calls
    assert calls[:2] == [("add_worker", W0), ("add_client", "c")]
    assert ("update_graph", "c", ["x"]) in calls
    graph_args = ["annotations", "client", "keys", "priority", "stimulus_id", "tasks"]
    assert ("graph-args", graph_args) in calls
    moves = [c[2:4] for c in calls if c[0] == "transition"]
    assert moves[:3] == [("released", "waiting"), ("waiting", "queued"), ("queued", "processing")]
    assert ("processing", "memory") in moves and moves[-1][1] == "forgotten"
    memory = next(c for c in calls if c[0] == "transition" and c[3] == "memory")
    assert memory[4] == ["nbytes", "stimulus_id", "worker"]
    assert ("remove_client", "c") in calls and calls[-1] == ("remove_worker", W0)


def test_remove_client_runs_once_for_close_client_then_the_stream_ending() -> None:
    h, _, plugins = setup()
    recorder = Recorder()
    plugins.add_plugin(recorder)
    h.add_client("c")
    h.step(ev.ClientDisconnected("c"))  # close-client
    h.step(ev.ClientDisconnected("c"))  # then the stream ends
    h.add_client("c")  # the same id again: a new client
    h.step(ev.ClientDisconnected("c"))
    removals = [c for c in recorder.calls if c[0] == "remove_client"]
    assert removals == [("remove_client", "c"), ("remove_client", "c")]


def test_a_remove_client_hook_alone_still_sees_a_reconnected_client_leave() -> None:
    h, _, plugins = setup()
    removed: list[str] = []

    class OnlyRemovals(SchedulerPlugin):
        def remove_client(self, scheduler: Any, client: str) -> None:
            removed.append(client)

    plugins.add_plugin(OnlyRemovals(), name="removals")
    for _ in range(2):
        h.add_client("c")
        h.step(ev.ClientDisconnected("c"))
        h.step(ev.ClientDisconnected("c"))
    assert removed == ["c", "c"]


def test_erred_transitions_carry_the_exception_and_forgotten_keys_resolve() -> None:
    h, _, plugins = setup()
    seen: list[Any] = []

    class Watch(SchedulerPlugin):
        def transition(self, key: Any, start: str, finish: str, **kwargs: Any) -> None:
            if finish == "erred":
                seen.append(("erred", kwargs["exception"]))
            if finish == "forgotten":
                ts = plugins.facade.tasks[key]
                seen.append(("forgotten", isinstance(ts, ForgottenTask), ts.state))

    plugins.add_plugin(Watch(), name="watch")
    h.add_worker(W0)
    h.add_client("c")
    h.submit({"x": ()}, keys=["x"])
    h.fail("x", exception="boom")
    h.step(ev.ClientReleasesKeys("c", ["x"]))
    assert seen == [("erred", "boom"), ("forgotten", True, "forgotten")]
    assert "x" not in plugins.facade.tasks


def test_a_raising_hook_is_logged_and_others_still_run(caplog: Any) -> None:
    h, _, plugins = setup()

    class Raising(SchedulerPlugin):
        def transition(self, *args: Any, **kwargs: Any) -> None:
            raise RuntimeError("transition broke")

        def add_worker(self, scheduler: Any, worker: str) -> None:
            raise RuntimeError("add_worker broke")

    plugins.add_plugin(Raising(), name="raising")
    recorder = Recorder()
    plugins.add_plugin(recorder)
    with caplog.at_level(logging.INFO, logger="dsched.scheduler"):
        h.add_worker(W0)
        h.add_client("c")
        h.submit({"x": ()}, keys=["x"])
        h.finish("x")
    assert h.state.tasks["x"].state == "memory"
    assert ("add_worker", W0) in recorder.calls
    assert any(c[0] == "transition" for c in recorder.calls)
    text = caplog.text
    assert "add_worker broke" in text and "Plugin failed with exception" in text


def test_a_plugin_may_remove_itself_from_its_transition_hook() -> None:
    h, _, plugins = setup()

    class Once(SchedulerPlugin):
        name = "once"

        def __init__(self) -> None:
            self.count = 0

        def transition(self, *args: Any, **kwargs: Any) -> None:
            self.count += 1
            plugins.facade.remove_plugin(self.name)

    once = Once()
    plugins.facade.add_plugin(once)
    h.add_worker(W0)
    h.add_client("c")
    h.submit({"x": (), "y": ()}, keys=["x", "y"])
    assert once.count == 1 and "once" not in plugins.facade.plugins
    assert h.state.observe_transitions is False


def test_log_event_hooks_see_published_events() -> None:
    pubsub = PubSub()
    h, _, plugins = setup(pubsub)
    recorder = Recorder()
    plugins.add_plugin(recorder)
    assert pubsub.listeners
    h.core.request("log_event", "tcp://c", {"topic": ["a", "b"], "msg": {"m": 1}}, h.now)
    h.tick()
    assert [c for c in recorder.calls if c[0] == "log_event"] == [
        ("log_event", "a", {"m": 1}),
        ("log_event", "b", {"m": 1}),
    ]
    plugins.remove_plugin("recorder")
    assert not pubsub.listeners


def test_valid_workers_downscaling_filters_through_plugins() -> None:
    h, _, plugins = setup()

    class KeepFirst(SchedulerPlugin):
        def valid_workers_downscaling(self, scheduler: Any, workers: list[Any]) -> list[Any]:
            return workers[1:]

    h.add_worker(W0)
    h.add_worker(W1)
    candidates = [plugins.facade.workers[W0], plugins.facade.workers[W1]]
    assert plugins.valid_workers_downscaling(candidates) == candidates
    plugins.add_plugin(KeepFirst(), name="keep")
    assert plugins.facade.valid_workers_downscaling(candidates) == candidates[1:]


def test_worker_and_nanny_plugins_are_stored_idempotent_and_unknown_names_raise() -> None:
    h, shell, plugins = setup()
    h.add_worker(W0)

    async def scenario() -> None:
        assert await plugins.register_worker_plugin(b"p1", "p") == {W0: {"status": "OK"}}
        assert await plugins.register_worker_plugin(b"p2", "p", idempotent=True) == {}
        assert plugins.worker_plugins.keys() == {"shuffle", "p"}  # shuffle: P2P's, built in
        assert plugins.worker_plugins["p"] == b"p1"
        assert await plugins.register_worker_plugin(b"p3", "p") == {W0: {"status": "OK"}}
        assert plugins.worker_plugins["p"] == b"p3"
        await plugins.unregister_worker_plugin("p")
        with pytest.raises(ValueError, match="The worker plugin p does not exist"):
            await plugins.unregister_worker_plugin("p")
        async with plugins.nanny_starting() as shipped:
            assert shipped == {}
        await plugins.register_nanny_plugin(b"n", "n")
        async with plugins.nanny_starting() as shipped:
            assert shipped == {"n": b"n"}
        await plugins.unregister_nanny_plugin("n")
        with pytest.raises(ValueError, match="The nanny plugin n does not exist"):
            await plugins.unregister_nanny_plugin("n")

    asyncio.run(scenario())
    assert [(m["op"], nanny) for m, nanny in shell.broadcasts] == [
        ("plugin-add", False),
        ("plugin-add", False),
        ("plugin-remove", False),
        ("plugin_add", True),
        ("plugin_remove", True),
    ]


def test_handlers_register_rpc_ops_and_builtins_stay() -> None:
    _, shell, plugins = setup()
    handlers = plugins.facade.handlers

    def echo(x: int) -> int:
        return x

    handlers["echo"] = echo
    assert "echo" in shell.rpc_ops and handlers["echo"] is echo
    with pytest.raises(ValueError, match="built-in"):
        handlers["identity"] = echo
    assert asyncio.run(shell.rpc_ops["echo"](None, {"x": 3})) == 3
    del handlers["echo"]
    assert "echo" not in shell.rpc_ops
