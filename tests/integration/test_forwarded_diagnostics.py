"""Diagnostics the scheduler answers by asking its workers, end to end.

``Client.profile``, ``call_stack``, ``get_scheduler_logs`` / ``get_worker_logs``,
``benchmark_hardware``, ``restart_workers`` and ``dump_cluster_state`` against real
``dask worker`` processes (with nannies; a cluster of its own without nannies for
``restart_workers``' "removed" and time-out paths). The replies must have Dask's shapes:
the same tests run against ``dask scheduler`` (``DSCHED_TEST_SCHEDULER=dask``), which is
how the expected behaviour was checked. Every wait waits for a condition, with a bound.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from distributed import Client, Event
from distributed.cluster_dump import DumpArtefact

from dsched.testing.cluster import ProcessCluster

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

WAIT_S = 30
WaitUntil = Callable[[Callable[[], bool], float, Callable[[], str]], None]


def busy(seconds: float) -> int:
    """Burn CPU (the profiler samples running Python code, not a sleep)."""
    end = time.monotonic() + seconds
    n = 0
    while time.monotonic() < end:
        n += 1
    return n


def wait_for_event(name: str) -> str:
    Event(name).wait(WAIT_S)
    return name


def after(x: Any) -> Any:
    return x


def _is_profile(p: Any) -> bool:
    return isinstance(p, dict) and p.get("identifier") == "root" and "children" in p


def test_profile_merges_the_workers(client: Client, wait_until: WaitUntil) -> None:
    workers = sorted(client.nthreads())
    future = client.submit(busy, 1.5, pure=False)
    future.result(timeout=WAIT_S)
    wait_until(lambda: client.profile()["count"] > 0, WAIT_S, lambda: f"{client.profile()!r:.300}")
    assert _is_profile(client.profile())
    per_worker = client.profile(merge_workers=False)
    assert set(per_worker) == set(workers)
    assert all(_is_profile(p) for p in per_worker.values())
    assert _is_profile(client.profile(workers=[workers[0]], server=True))
    # Dask samples its own event loop only on Pythons other than 3.11.
    own = client.profile(scheduler=True)
    assert _is_profile(own)
    assert own["count"] == 0


def test_call_stack_follows_waiting_tasks(client: Client, wait_until: WaitUntil) -> None:
    name = f"stack-{uuid.uuid4().hex}"
    running = client.submit(wait_for_event, name, pure=False)
    waiting = client.submit(after, running, pure=False)
    try:
        # Processing on the scheduler is not yet executing on the worker (which reports
        # only the tasks its threads run): wait until the worker has started it.
        def started() -> bool:
            try:
                return bool(client.call_stack([waiting]))
            except KeyError:  # the scheduler has not taken the graph in yet
                return False

        wait_until(
            started,
            WAIT_S,
            lambda: f"processing: {client.processing()}",
        )
        stacks = client.call_stack([waiting])
        assert len(stacks) == 1
        ((address, by_key),) = stacks.items()
        assert address in client.nthreads()
        assert set(by_key) == {running.key}
        assert any("wait_for_event" in line for line in by_key[running.key])
        everything = client.call_stack()
        assert running.key in everything[address]
    finally:
        Event(name, client=client).set()
    assert waiting.result(timeout=WAIT_S) == name
    with pytest.raises(KeyError):
        client.call_stack(keys=[f"unknown-{uuid.uuid4().hex}"])
    assert client.call_stack() == {}


def test_scheduler_and_worker_logs(client: Client) -> None:
    logs = client.get_scheduler_logs()
    assert isinstance(logs, tuple | list)
    assert logs
    assert all(len(entry) == 2 and isinstance(entry[0], str) for entry in logs)
    assert len(client.get_scheduler_logs(n=1)) == 1
    stamped = client.sync(client.scheduler.get_logs, timestamps=True)
    assert all(len(entry) == 3 and isinstance(entry[0], float) for entry in stamped)
    workers = sorted(client.nthreads())
    by_worker = client.get_worker_logs()
    assert sorted(by_worker) == workers
    assert all(isinstance(entries, tuple | list) for entries in by_worker.values())
    one = client.get_worker_logs(n=1, workers=[workers[0]])
    assert list(one) == [workers[0]]
    assert len(one[workers[0]]) <= 1
    by_nanny = client.get_worker_logs(nanny=True)
    assert sorted(by_nanny) == workers


def test_benchmark_hardware(client: Client) -> None:
    result = client.benchmark_hardware()
    assert set(result) == {"disk", "memory", "network"}
    for mode, sizes in result.items():
        assert sizes, mode
        assert all(isinstance(v, float) and v > 0 for v in sizes.values()), (mode, sizes)


# The fields of Dask 2026.8.0's Scheduler._to_dict and TaskState dump (read off a dump of
# the stock scheduler), and the WorkerState fields Dask dumps (dsched dumps a subset).
SCHEDULER_FIELDS = {
    *("address", "clients", "events", "extensions", "id", "memory", "n_workers", "services"),
    *("started", "status", "task_groups", "tasks", "thread_id", "total_memory"),
    *("total_threads", "transition_counter", "transition_log", "type", "workers"),
}
TASK_FIELDS = {
    *("actor", "annotations", "dependencies", "dependents", "erred_on", "exception"),
    *("exception_blame", "exception_text", "group", "group_key", "has_lost_dependencies"),
    *("host_restrictions", "key", "loose_restrictions", "metadata", "nbytes", "prefix"),
    *("priority", "processing_on", "resource_restrictions", "retries", "run_id", "state"),
    *("suspicious", "traceback", "traceback_text", "type", "waiters", "waiting_on"),
    *("who_has", "who_wants", "worker_restrictions"),
}
WORKER_FIELDS = {
    *("actors", "address", "bandwidth", "executing", "extra", "has_what", "host"),
    *("last_seen", "local_directory", "long_running", "memory", "memory_limit", "metrics"),
    *("name", "nanny", "nbytes", "needs_what", "nthreads", "occupancy", "pid", "processing"),
    *("resources", "scheduler", "server_id", "services", "status", "task_prefix_count"),
    *("time_delay", "used_resources"),
}


def _check_dump(artefact: DumpArtefact, key: str, workers: list[str]) -> None:
    dump = artefact.dump
    assert set(dump) == {"scheduler", "workers", "versions"}
    assert sorted(dump["workers"]) == workers
    assert artefact.missing_workers() == []
    assert set(dump["versions"]) == {"scheduler", "workers"}
    assert sorted(dump["versions"]["workers"]) == workers
    scheduler = dump["scheduler"]
    assert set(scheduler) == SCHEDULER_FIELDS
    assert sorted(scheduler["workers"]) == workers
    for worker in scheduler["workers"].values():
        assert {"address", "name", "nthreads", "has_what", "status"} <= set(worker)
        assert set(worker) <= WORKER_FIELDS
    assert key in scheduler["tasks"]
    assert scheduler["tasks"][key]["state"] == "memory"
    task = scheduler["tasks"][key]
    assert set(task) == TASK_FIELDS
    assert "run_spec" not in task  # Dask's TaskState dump has no run_spec either
    assert task["who_has"] and task["who_has"][0].startswith("<WorkerState ")
    assert task["type"] == "int"
    assert [t["key"] for t in artefact.scheduler_tasks_in_state("memory")] == [key]
    assert any(t["key"] == key for t in artefact.worker_tasks_in_state("memory"))
    # DumpArtefact.scheduler_story cannot read a log that holds tuple keys (msgpack makes
    # them lists, unhashable: the same with Dask's own dumps), and earlier tests leave some:
    # read this key's entries directly.
    story = [t for t in scheduler["transition_log"] if t[0] == key]
    assert story and story[-1][2] == "memory"
    assert all(len(t) == 6 for t in story)  # Dask's (key, start, finish, recs, stimulus, time)


def test_dump_cluster_state(client: Client, tmp_path: Path) -> None:
    workers = sorted(client.nthreads())
    future = client.submit(after, 42, key=f"dumped-{uuid.uuid4().hex}")
    assert future.result(timeout=WAIT_S) == 42
    # A plain path: the client asks get_cluster_state and writes the file itself.
    client.dump_cluster_state(str(tmp_path / "local"))
    local = DumpArtefact.from_url(str(tmp_path / "local.msgpack.gz"))
    _check_dump(local, future.key, workers)
    # A URL: the scheduler writes it (dump_cluster_state_to_url).
    client.dump_cluster_state(f"file://{tmp_path}/remote", format="yaml", exclude=["run_spec"])
    remote = DumpArtefact.from_url(str(tmp_path / "remote.yaml"))
    _check_dump(remote, future.key, workers)
    state = client.sync(client.scheduler.get_cluster_state, exclude=["tasks"])
    assert "tasks" not in state["scheduler"]
    expected = {"type", "id", "address", "services", "started", "status", "n_workers"}
    assert expected <= set(state["scheduler"])
    assert {"transition_log", "workers", "clients", "task_groups", "events"} <= set(
        state["scheduler"]
    )


def test_restart_workers_through_nannies(client: Client, wait_until: WaitUntil) -> None:
    before = sorted(client.nthreads())
    target = before[0]
    result = client.restart_workers([target], timeout=WAIT_S * 2)
    assert result == {target: "OK"}
    now = sorted(client.nthreads())
    assert len(now) == len(before)
    assert target not in now
    assert before[1] in now
    wait_until(
        lambda: any(
            msg.get("action") == "restart-workers" and list(msg.get("workers", ())) == [target]
            for _, msg in client.get_events("all")
        ),
        WAIT_S,
        lambda: f"events: {client.get_events('all')!r:.500}",
    )
    # Again, on a worker that is itself new.
    second = now[0]
    assert client.restart_workers([second], timeout=WAIT_S * 2) == {second: "OK"}
    client.wait_for_workers(len(before), timeout=WAIT_S)


def test_restart_workers_without_nannies(scheduler_kind: str, wait_until: WaitUntil) -> None:
    """Workers without a nanny are removed ("removed"); waiting for them times out."""
    with (
        ProcessCluster(
            scheduler_kind=scheduler_kind,
            n_workers=2,
            nanny=False,
            extra_pythonpath=[Path(__file__).parent],
        ) as cluster,
        Client(cluster.address, timeout=WAIT_S, set_as_default=False) as client,
    ):
        first, second = sorted(client.nthreads())
        with pytest.raises(ValueError, match="requires a nanny"):
            client.restart_workers([second])
        # Client.restart_workers refuses workers without a nanny; the RPC does not.
        reply = client.sync(
            client.scheduler.restart_workers,
            workers=[first],
            timeout=WAIT_S,
            wait_for_workers=False,
            stimulus_id=f"test-{time.time()}",
        )
        assert reply == {first: "removed"}
        wait_until(
            lambda: first not in client.nthreads(),
            WAIT_S,
            lambda: f"workers: {client.nthreads()}",
        )
        with pytest.raises(TimeoutError, match=r"Waited for 1 worker\(s\) to reconnect"):
            client.sync(
                client.scheduler.restart_workers,
                workers=[second],
                timeout=1,
                stimulus_id=f"test-{time.time()}",
            )
