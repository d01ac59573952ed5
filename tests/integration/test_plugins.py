"""Worker, nanny and scheduler plugins end to end: real Clients, `dask worker`s (with
nannies) and the scheduler under test.

A WorkerPlugin and a NannyPlugin reach the workers and nannies already there and one
that joins later (the register-worker / register_nanny replies), and go away when
unregistered; ``upload_file`` makes a module importable in tasks; ``forward_logging`` and
``register_worker_callbacks`` work; a SchedulerPlugin sees transitions, workers and
clients come and go; bad input (a plugin that fails to unpickle, unknown names, a hook
that raises) gets Dask's errors and the scheduler keeps serving. Every plugin a test
registers is unregistered at its end, so the session cluster stays as it was.
``DSCHED_TEST_SCHEDULER=dask`` runs the same tests against `dask scheduler`.
"""

from __future__ import annotations

import importlib
import logging
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from distributed import Client, NannyPlugin, SchedulerPlugin, WorkerPlugin
from distributed.protocol.pickle import dumps

from dsched.testing.cluster import ProcessCluster

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

WAIT_S = 60


def inc(x: int) -> int:
    return x + 1


class MarkingWorkerPlugin(WorkerPlugin):
    """Sets ``worker._dsched_marks[name]`` while registered."""

    def __init__(self, name: str) -> None:
        self.name = name

    def setup(self, worker: Any) -> None:
        if not hasattr(worker, "_dsched_marks"):
            worker._dsched_marks = set()
        worker._dsched_marks.add(self.name)

    def teardown(self, worker: Any) -> None:
        worker._dsched_marks.discard(self.name)


class MarkingNannyPlugin(NannyPlugin):
    restart = False

    def __init__(self, name: str) -> None:
        self.name = name

    def setup(self, nanny: Any) -> None:
        if not hasattr(nanny, "_dsched_marks"):
            nanny._dsched_marks = set()
        nanny._dsched_marks.add(self.name)

    def teardown(self, nanny: Any) -> None:
        nanny._dsched_marks.discard(self.name)


class CountingSchedulerPlugin(SchedulerPlugin):
    """Counts transitions (Dask state names), and records workers and clients."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.transitions: Counter[tuple[str, str]] = Counter()
        self.added: list[str] = []
        self.removed: list[str] = []
        self.clients: list[tuple[str, str]] = []
        self.graphs: list[list[Any]] = []
        self.events: list[tuple[str, Any]] = []
        self.started = False

    async def start(self, scheduler: Any) -> None:
        self.started = True

    def transition(self, key: Any, start: str, finish: str, *args: Any, **kwargs: Any) -> None:
        assert "stimulus_id" in kwargs
        self.transitions[start, finish] += 1

    def add_worker(self, scheduler: Any, worker: str) -> None:
        self.added.append(worker)

    def remove_worker(self, scheduler: Any, worker: str, **kwargs: Any) -> None:
        self.removed.append(worker)

    def add_client(self, scheduler: Any, client: str) -> None:
        self.clients.append(("add", client))

    def remove_client(self, scheduler: Any, client: str) -> None:
        self.clients.append(("remove", client))

    def update_graph(self, scheduler: Any, *, keys: Any, tasks: Any, **kwargs: Any) -> None:
        self.graphs.append(sorted(map(str, tasks)))

    def log_event(self, topic: str, msg: Any) -> None:
        self.events.append((topic, msg))


def echo_handler(x: Any) -> Any:
    return {"echoed": x}


class HandlerPlugin(SchedulerPlugin):
    """Serves an RPC op the way preload scripts and plugins do: scheduler.handlers[op]."""

    name = "dsched-test-handler"

    async def start(self, scheduler: Any) -> None:
        scheduler.handlers["dsched_test_echo"] = echo_handler


def drop_echo_handler(dask_scheduler: Any) -> None:
    del dask_scheduler.handlers["dsched_test_echo"]


class RaisingSchedulerPlugin(SchedulerPlugin):
    name = "dsched-test-raising"

    def transition(self, *args: Any, **kwargs: Any) -> None:
        raise RuntimeError("transition hook failed")

    def add_client(self, scheduler: Any, client: str) -> None:
        raise RuntimeError("add_client hook failed")

    def update_graph(self, scheduler: Any, **kwargs: Any) -> None:
        raise RuntimeError("update_graph hook failed")


def explode(why: str) -> None:
    raise RuntimeError(why)


class Unloadable:
    def __reduce__(self) -> Any:
        return (explode, ("this plugin cannot be loaded",))


def plugin_state(dask_scheduler: Any, name: str) -> dict[str, Any]:
    plugin = dask_scheduler.plugins[name]
    return {
        "transitions": dict(plugin.transitions),
        "added": list(plugin.added),
        "removed": list(plugin.removed),
        "clients": list(plugin.clients),
        "graphs": list(plugin.graphs),
        "events": list(plugin.events),
        "started": plugin.started,
    }


def worker_marks(dask_worker: Any) -> list[str]:
    return sorted(getattr(dask_worker, "_dsched_marks", ()))


def call_uploaded(module: str) -> Any:
    return importlib.import_module(module).VALUE


@pytest.fixture
def names() -> Iterator[str]:
    yield f"dsched-test-{uuid.uuid4().hex[:8]}"


def test_plugins_reach_workers_and_nannies_present_and_joining(
    client: Client, cluster: ProcessCluster, names: str, wait_until: Any
) -> None:
    worker_name, nanny_name, scheduler_name = f"{names}-w", f"{names}-n", f"{names}-s"
    replies = client.register_plugin(MarkingWorkerPlugin(worker_name))
    assert replies == {address: {"status": "OK"} for address in client.nthreads()}
    client.register_plugin(MarkingNannyPlugin(nanny_name))
    client.register_plugin(CountingSchedulerPlugin(scheduler_name))
    # Registering again with idempotent=True does nothing and replies {}.
    again = MarkingWorkerPlugin(worker_name)
    again.idempotent = True
    assert client.register_plugin(again) == {}
    assert all(worker_name in marks for marks in client.run(worker_marks).values())
    assert all(nanny_name in m for m in client.run(worker_marks, nanny=True).values())
    before = set(client.nthreads())
    extra = cluster.add_worker()
    try:
        wait_until(lambda: len(client.nthreads()) == 3, WAIT_S, extra.describe)
        (joined,) = set(client.nthreads()) - before
        wait_until(
            lambda: worker_name in client.run(worker_marks, workers=[joined])[joined],
            WAIT_S,
            lambda: f"worker marks: {client.run(worker_marks)}",
        )
        nanny_marks = client.run(worker_marks, workers=[joined], nanny=True)
        assert nanny_name in next(iter(nanny_marks.values()))
        state = client.run_on_scheduler(plugin_state, name=scheduler_name)
        assert state["started"] and joined in state["added"]
    finally:
        extra.request_stop()
        extra.wait_stopped(WAIT_S)
    wait_until(lambda: len(client.nthreads()) == 2, WAIT_S, lambda: str(client.nthreads()))
    wait_until(
        lambda: joined in client.run_on_scheduler(plugin_state, name=scheduler_name)["removed"],
        WAIT_S,
        lambda: str(client.run_on_scheduler(plugin_state, name=scheduler_name)),
    )
    client.unregister_worker_plugin(worker_name)
    client.unregister_worker_plugin(nanny_name, nanny=True)
    client.unregister_scheduler_plugin(scheduler_name)
    assert not any(worker_name in m for m in client.run(worker_marks).values())
    assert not any(nanny_name in m for m in client.run(worker_marks, nanny=True).values())
    assert scheduler_name not in client.run_on_scheduler(
        lambda dask_scheduler: list(dask_scheduler.plugins)
    )


def test_scheduler_plugin_counts_transitions_and_clients(
    client: Client, cluster_address: str, names: str, wait_until: Any
) -> None:
    client.register_plugin(CountingSchedulerPlugin(names))
    try:
        futures = client.map(inc, range(5), key=[f"{names}-inc-{i}" for i in range(5)])
        assert client.gather(futures) == [1, 2, 3, 4, 5]
        with Client(cluster_address, set_as_default=False) as other:
            other_id = other.id
        client.log_event(f"{names}-topic", {"hello": 1})  # an RPC: done when it returns

        def removed_other() -> bool:
            state = client.run_on_scheduler(plugin_state, name=names)
            return ("remove", other_id) in state["clients"]

        wait_until(removed_other, WAIT_S, lambda: "the other client's removal not seen")
        state = client.run_on_scheduler(plugin_state, name=names)
        assert state["transitions"].get(("processing", "memory")) == 5
        assert state["transitions"].get(("released", "waiting"), 0) >= 5
        assert sorted(f"{names}-inc-{i}" for i in range(5)) in state["graphs"]
        assert ("add", other_id) in state["clients"]
        assert state["clients"].count(("remove", other_id)) == 1
        assert (f"{names}-topic", {"hello": 1}) in state["events"]
        del futures
    finally:
        client.unregister_scheduler_plugin(names)


def test_update_graph_runs_once_for_a_graph_taken_in_parts(
    client: Client, names: str
) -> None:
    """dsched takes a graph of more than 5,000 tasks in as parts (dsched.state.slicing);
    plugins still see one update_graph call with every task, as Dask makes."""
    client.register_plugin(CountingSchedulerPlugin(names))
    try:
        keys = [f"{names}-big-{i}" for i in range(12_000)]
        futures = client.map(inc, range(12_000), key=keys)
        total = client.submit(sum, futures, key=f"{names}-total")
        assert total.result() == sum(range(1, 12_001))
        state = client.run_on_scheduler(plugin_state, name=names)
        assert state["graphs"][0] == sorted(keys)
        # Dask's tasks are those the graph touches: its own and the futures it needs.
        assert state["graphs"][1] == sorted([*keys, f"{names}-total"])
        assert len(state["graphs"]) == 2
        del futures, total
    finally:
        client.unregister_scheduler_plugin(names)


def test_upload_file_makes_a_module_importable(client: Client, tmp_path: Path, names: str) -> None:
    module = f"dsched_uploaded_{uuid.uuid4().hex[:8]}"
    path = tmp_path / f"{module}.py"
    path.write_text("VALUE = 42\n")
    client.upload_file(str(path))
    try:
        assert client.submit(call_uploaded, module, pure=False).result(timeout=WAIT_S) == 42
    finally:

        def uploaded_plugins(dask_scheduler: Any) -> tuple[list[str], list[str]]:
            return (
                [n for n in dask_scheduler.worker_plugins if n.startswith(path.name)],
                [n for n in dask_scheduler.plugins if n.startswith(path.name)],
            )

        worker_plugins, scheduler_plugins = client.run_on_scheduler(uploaded_plugins)
        for name in worker_plugins:
            client.unregister_worker_plugin(name)
        for name in scheduler_plugins:
            client.unregister_scheduler_plugin(name)


def log_something(logger_name: str) -> int:
    logging.getLogger(logger_name).warning("hello from a task")
    return 1


def setup_mark(dask_worker: Any) -> None:
    dask_worker._dsched_callback_ran = True


def test_forward_logging_and_worker_callbacks(client: Client, names: str, wait_until: Any) -> None:
    logger_name = f"dsched.test.{names}"
    records: list[logging.LogRecord] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    handler = Collect()
    logging.getLogger(logger_name).addHandler(handler)
    try:
        client.forward_logging(logger_name, level=logging.INFO)
        assert client.submit(log_something, logger_name, pure=False).result(WAIT_S) == 1
        wait_until(lambda: bool(records), WAIT_S, lambda: "no forwarded record")
        assert records[0].getMessage() == "hello from a task"
    finally:
        logging.getLogger(logger_name).removeHandler(handler)
        client.unforward_logging(logger_name)
    client.register_worker_callbacks(setup=setup_mark)
    assert all(
        client.run(lambda dask_worker: getattr(dask_worker, "_dsched_callback_ran", False)).values()
    )

    def callback_plugins(dask_scheduler: Any) -> list[str]:
        return [n for n in dask_scheduler.worker_plugins if "setup_mark" in n]

    for name in client.run_on_scheduler(callback_plugins):
        client.unregister_worker_plugin(name)


def test_bad_plugins_get_dasks_errors_and_the_scheduler_keeps_serving(
    client: Client, names: str
) -> None:
    with pytest.raises(RuntimeError, match="this plugin cannot be loaded"):
        client.sync(
            client.scheduler.register_scheduler_plugin,
            plugin=dumps(Unloadable()),
            name=names,
            idempotent=False,
        )
    with pytest.raises(ValueError, match="does not exist"):
        client.unregister_worker_plugin(f"{names}-unknown")
    with pytest.raises(ValueError, match="does not exist"):
        client.unregister_worker_plugin(f"{names}-unknown", nanny=True)
    with pytest.raises(ValueError, match="Could not find plugin"):
        client.unregister_scheduler_plugin(f"{names}-unknown")
    client.register_plugin(RaisingSchedulerPlugin())
    try:
        future = client.submit(inc, 41, key=f"{names}-inc")
        assert future.result(timeout=WAIT_S) == 42
        assert client.run_on_scheduler(lambda dask_scheduler: len(dask_scheduler.workers)) == 2
        del future
    finally:
        client.unregister_scheduler_plugin(RaisingSchedulerPlugin.name)


def test_a_scheduler_plugin_serves_an_rpc_through_handlers(client: Client) -> None:
    client.register_plugin(HandlerPlugin())
    try:
        assert client.sync(client.scheduler.dsched_test_echo, x=5) == {"echoed": 5}
    finally:
        client.run_on_scheduler(drop_echo_handler)
        client.unregister_scheduler_plugin(HandlerPlugin.name)
