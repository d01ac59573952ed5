"""The zero worker: protocol behaviour against a scripted scheduler, and end to end against
both dsched and `dask scheduler`."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from dask import delayed
from distributed import Client
from distributed.protocol.serialize import deserialize

from dsched.bench.workloads import inc, merge_values, times_ten
from dsched.comm import Comm, connect, listen
from dsched.testing.cluster import ProcessCluster
from dsched.tools.zero_worker import ZeroWorker
from dsched.wire import Pickled, Serialized

STEP_TIMEOUT_S = 10


class ScriptedScheduler:
    """Accepts one worker registration and exposes its stream and heartbeats to the test."""

    def __init__(self) -> None:
        self.stream: asyncio.Future[Comm] = asyncio.get_running_loop().create_future()
        self.registration: dict[str, Any] = {}
        self.heartbeats: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self.received: asyncio.Queue[dict[str, Any]] = asyncio.Queue()

    async def on_comm(self, comm: Comm) -> None:
        request = await comm.read()
        assert isinstance(request, dict)
        if request["op"] == "register-worker":
            self.registration = request
            comm.write(
                {"status": "OK", "time": 0.0, "heartbeat-interval": 0.05, "worker-plugins": {}}
            )
            self.stream.set_result(comm)
            while True:
                batch = await comm.read()
                for msg in batch if isinstance(batch, tuple) else (batch,):
                    await self.received.put(msg)
        while request["op"] == "heartbeat_worker":
            await self.heartbeats.put(request)
            comm.write({"status": "OK", "time": 0.0, "heartbeat-interval": 0.05})
            request = await comm.read()
            assert isinstance(request, dict)

    async def next_message(self, op: str) -> dict[str, Any]:
        while True:
            msg = await asyncio.wait_for(self.received.get(), STEP_TIMEOUT_S)
            if msg["op"] == op:
                return msg


def compute_task(key: str, run_id: int, who_has: dict[str, tuple[str, ...]]) -> dict[str, Any]:
    return {
        "op": "compute-task",
        "key": key,
        "run_id": run_id,
        "priority": (0, 1, run_id),
        "stimulus_id": f"s-{run_id}",
        "who_has": who_has,
        "nbytes": dict.fromkeys(who_has, 8),
        "run_spec": Pickled.from_object(("not", "run")),
        "resource_restrictions": None,
        "actor": False,
        "annotations": {},
        "span_id": None,
    }


async def _scripted_session() -> None:
    scheduler = ScriptedScheduler()
    listener = await listen("127.0.0.1", 0, scheduler.on_comm)
    worker = ZeroWorker(listener.address, "zero-test", nbytes=123)
    await asyncio.wait_for(worker.start(), STEP_TIMEOUT_S)
    stream = await asyncio.wait_for(scheduler.stream, STEP_TIMEOUT_S)
    assert scheduler.registration["address"] == worker.address
    assert scheduler.registration["name"] == "zero-test"
    status = await scheduler.next_message("worker-status-change")
    assert status["status"] == "running"

    # compute-task: finished at once, dependencies held elsewhere claimed as local
    stream.write([compute_task("a", 7, {}), compute_task("b", 8, {"a": ("tcp://127.0.0.1:1",)})])
    finished = [await scheduler.next_message("task-finished") for _ in range(2)]
    assert [(m["key"], m["run_id"], m["nbytes"]) for m in finished] == [
        ("a", 7, 123),
        ("b", 8, 123),
    ]
    for msg in finished:
        (entry,) = msg["startstops"]
        assert entry["action"] == "compute" and entry["start"] <= entry["stop"]
        assert msg["status"] == "OK"

    # get_data: a placeholder serialized like a real result; the caller acks with "OK"
    peer = await connect(worker.address)
    peer.write({"op": "get_data", "keys": ("a", "missing"), "who": None, "reply": True})
    reply = await asyncio.wait_for(peer.read(), STEP_TIMEOUT_S)
    assert isinstance(reply, dict) and reply["status"] == "OK"
    assert set(reply["data"]) == {"a"}
    payload = reply["data"]["a"]
    assert isinstance(payload, Serialized)
    assert deserialize(payload.header, payload.frames) is None
    peer.write("OK")
    peer.write({"op": "close", "reply": False})
    await peer.close()

    # steal-request: completed tasks are in memory; forgotten ones are None
    stream.write([{"op": "steal-request", "key": "a", "stimulus_id": "steal-1"}])
    response = await scheduler.next_message("steal-response")
    assert (response["key"], response["state"], response["stimulus_id"]) == (
        "a",
        "memory",
        "steal-1",
    )
    stream.write([{"op": "free-keys", "keys": ["a"], "stimulus_id": "free-1"}])
    released = await scheduler.next_message("release-worker-data")
    assert released["key"] == "a"
    stream.write([{"op": "steal-request", "key": "a", "stimulus_id": "steal-2"}])
    response = await scheduler.next_message("steal-response")
    assert response["state"] is None
    assert worker.data == {"b"}

    # heartbeats arrive at the interval the scheduler asked for
    beat = await asyncio.wait_for(scheduler.heartbeats.get(), STEP_TIMEOUT_S)
    assert beat["address"] == worker.address and "bandwidth" in beat["metrics"]

    # close: the worker leaves
    stream.write([{"op": "close", "reason": "test"}])
    await asyncio.wait_for(worker.finished(), STEP_TIMEOUT_S)
    await listener.stop()


@pytest.mark.timeout(60)
def test_zero_worker_speaks_the_worker_protocol() -> None:
    asyncio.run(_scripted_session())


@pytest.mark.integration
@pytest.mark.timeout(120)
@pytest.mark.parametrize("scheduler", ["dsched", "dask"])
def test_zero_workers_complete_graphs(scheduler: str) -> None:
    cluster = ProcessCluster(
        scheduler_kind=scheduler, n_workers=6, worker_kind="zero", zero_processes=2
    )
    with cluster, Client(cluster.address, timeout=30, set_as_default=False) as client:
        workers = client.scheduler_info(n_workers=-1)["workers"]
        assert len(workers) == 6
        assert all(w["name"].startswith("zero-") for w in workers.values())
        graph = delayed(merge_values)(*[delayed(times_ten)(i) for i in range(500)])
        assert client.compute(graph).result(timeout=60) is None  # the placeholder
        results = client.gather(client.map(inc, range(300)), errors="raise")
        assert results == [None] * 300
        processing = client.processing()
        assert all(not keys for keys in processing.values())
    # SIGTERM makes every simulated worker leave cleanly and the process exit by itself
    assert [w.popen.returncode for w in cluster.workers] == [0, 0]
