"""Hostile input against a live scheduler: bytes, frames, messages, and ops out of place.

Every test uses the ``scheduler`` fixture, which afterwards checks that the scheduler is
alive, that ``validate()`` passes, and that the canary Client keeps getting right answers.
"""

from __future__ import annotations

import contextlib
import socket
import time
import uuid
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from rawpeer import (
    HANDSHAKE_TIMEOUT_S,
    MAX_MESSAGE_BYTES,
    Closed,
    RawPeer,
    frame_bytes,
    header,
)

from dsched.testing.faults import dsched_info

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

# msgpack-able values of every shape, small.
atoms = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**63), 2**64 - 1),
    st.floats(allow_nan=False),
    st.text(max_size=20),
    st.binary(max_size=20),
)
values = st.recursive(
    atoms,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)

# RPCs that only read state or fail on bad input. Excluded on purpose: ops whose *valid*
# use changes the cluster (scatter, update_data, broadcast, unregister, terminate, retry...).
READ_ONLY_RPCS = [
    "identity", "gather", "who_has", "has_what", "ncores", "nthreads", "ncores_running",
    "nbytes", "processing", "heartbeat_worker", "events", "dsched_info", "versions",
    "no-such-op", "", "close-stream", "task-finished",
]  # fmt: skip
CLIENT_STREAM_OPS = [
    "client-desires-keys", "client-releases-keys", "cancel-keys", "report-key",
    "heartbeat-client", "subscribe-topic", "unsubscribe-topic", "update-data",
    "task-finished", "task-erred", "add-keys", "no-such-stream-op", "update-graph",
]  # fmt: skip
WORKER_STREAM_OPS = [
    "task-finished", "task-erred", "release-worker-data", "add-keys",
    "request-refresh-who-has", "long-running", "reschedule", "worker-status-change",
    "log-event", "keep-alive", "steal-response", "client-desires-keys", "no-such-op",
]  # fmt: skip


def fields() -> st.SearchStrategy[dict[str, Any]]:
    names = st.sampled_from(
        ["key", "keys", "run_id", "nbytes", "client", "who_has", "status", "worker", "type",
         "exception", "topic", "msg", "force", "startstops", "state", "stimulus_id", "n_workers",
         "address", "workers", "summary", "tasks", "x"]
    )  # fmt: skip
    return st.dictionaries(names, values, max_size=5)


def assert_alive(address: str) -> None:
    with RawPeer(address) as peer:
        reply = peer.rpc({"op": "dsched_info"})
        assert reply["valid"], reply


# ----------------------------------------------------------------------------- bytes
def test_random_bytes_get_the_connection_closed(scheduler: str, fuzz_settings: Any) -> None:
    @fuzz_settings
    @given(data=st.binary(min_size=1, max_size=3000), handshake=st.booleans())
    def check(data: bytes, handshake: bool) -> None:
        with RawPeer(scheduler, handshake=handshake) as peer:
            try:
                peer.send_raw(data)
                peer.sock.shutdown(socket.SHUT_WR)  # then EOF: the server must let go
            except OSError:
                return  # already cut off
            assert peer.is_closed_by_peer(HANDSHAKE_TIMEOUT_S + 10)

    check()
    assert_alive(scheduler)


@pytest.mark.parametrize(
    ("name", "raw"),
    [
        ("L beyond the size cap", header(MAX_MESSAGE_BYTES + 1, 1, [MAX_MESSAGE_BYTES - 24])),
        ("L of 2**63", header(2**63, 1, [2**63 - 24])),
        ("2**40 frames", header(8 + 8 * 3, 2**40, [1, 2, 3])),
        ("frame longer than the cap", header(24, 2, [1, 2**62])),
        ("L smaller than its own header", header(4, 1, [0])),
        ("no frames", header(8, 0, [])),
        ("lengths that do not add up", header(40, 2, [100, 100]) + b"x" * 24),
        ("undecodable msgpack", frame_bytes([b"\xc1"])),
        ("truncated msgpack", frame_bytes([b"\x93\x01"])),
        ("msgpack of the wrong ext type", frame_bytes([b"\xd4\x7f\x00"])),
    ],
)
def test_invalid_frames_close_the_connection_at_once(
    scheduler: str, scheduler_log: Any, name: str, raw: bytes
) -> None:
    with RawPeer(scheduler) as peer:
        peer.send_raw(raw)
        # No EOF from our side: the scheduler must decide from what it got, not wait.
        assert peer.is_closed_by_peer(5), f"{name}: the connection stayed open"
    assert "invalid data" in scheduler_log() or "protocol error" in scheduler_log()
    assert_alive(scheduler)


def test_message_size_cap_is_enforced_and_configurable(scheduler: str) -> None:
    with RawPeer(scheduler) as peer:
        # Just under the cap: accepted (and answered: the op does not exist).
        reply = peer.rpc({"op": "no-such-op", "pad": b"x" * (MAX_MESSAGE_BYTES // 2)})
        assert reply["status"] == "uncaught-error"
        assert "no-such-op" in reply["exception_text"]
    with RawPeer(scheduler) as peer:
        # The scheduler may cut us off while we are still sending.
        with contextlib.suppress(OSError):
            peer.send({"op": "no-such-op", "pad": b"x" * (MAX_MESSAGE_BYTES + 1)})
        assert peer.is_closed_by_peer(5)


# ----------------------------------------------------------------------------- RPCs
def test_rpc_with_wrong_fields_gets_an_error_and_the_comm_stays_usable(
    scheduler: str, scheduler_log: Any
) -> None:
    with RawPeer(scheduler) as peer:
        reply = peer.rpc({"op": "gather", "keys": 5})
        assert reply["status"] == "uncaught-error", reply
        reply = peer.rpc({"op": "who_has", "keys": [{"not": "a key"}]})
        assert reply["status"] == "uncaught-error", reply
        reply = peer.rpc({"op": "no-such-op", "x": 1})
        assert reply["status"] == "uncaught-error" and "no-such-op" in reply["exception_text"]
        assert peer.rpc({"op": "dsched_info"})["valid"]
    assert "unknown operation 'no-such-op'" in scheduler_log()


def test_requests_that_are_not_ops_are_refused(scheduler: str) -> None:
    for request in [5, "hello", [1, 2], {"no": "op"}, {"op": 17}, None]:
        with RawPeer(scheduler) as peer:
            peer.send(request)
            received = peer.read_until_closed(5)
            assert received and received[0]["status"] == "uncaught-error", (request, received)
    assert_alive(scheduler)


def test_random_rpcs(scheduler: str, fuzz_settings: Any) -> None:
    @fuzz_settings
    @given(op=st.sampled_from(READ_ONLY_RPCS), body=fields())
    def check(op: str, body: dict[str, Any]) -> None:
        with RawPeer(scheduler) as peer:
            try:
                reply = peer.rpc({"op": op, **body, "reply": True})
            except Closed:
                return  # refused outright: fine, as long as the scheduler is fine
            if isinstance(reply, dict) and reply.get("status") == "uncaught-error":
                assert reply["exception_text"]
            # Whatever the answer, the comm still works for the next request.
            assert peer.rpc({"op": "dsched_info"})["valid"]

    check()


@pytest.mark.parametrize(
    "registration",
    [
        {},
        {"address": 5},
        {"address": "not-an-address"},
        {"address": "tcp://127.0.0.1:1", "nthreads": "many"},
        {"address": "tcp://127.0.0.1:1", "nthreads": 1, "resources": {"GPU": "one"}},
        {"address": "tcp://127.0.0.1:1", "nthreads": 1, "name": {"a": 1}},
        {"address": "tcp://127.0.0.1:1", "nthreads": 1, "memory_limit": "lots"},
    ],
)
def test_bad_worker_registration_is_refused(
    scheduler: str, scheduler_log: Any, registration: dict[str, Any]
) -> None:
    with RawPeer(scheduler) as peer:
        peer.send({"op": "register-worker", "reply": False, **registration})
        received = peer.read_until_closed(5)
    assert received and received[0]["status"] == "error", received
    assert "rejecting register-worker" in scheduler_log()
    assert dsched_info_workers(scheduler) == 1


def dsched_info_workers(address: str) -> int:
    with RawPeer(address) as peer:
        return int(peer.rpc({"op": "dsched_info"})["workers"])


# ----------------------------------------------------------------------------- streams
def open_client_stream(address: str) -> tuple[RawPeer, str]:
    client_id = f"fuzz-client-{uuid.uuid4()}"
    peer = RawPeer(address)
    peer.send({"op": "register-client", "client": client_id, "reply": False})
    assert peer.read() == ({"op": "stream-start"},)
    return peer, client_id


def wait_for_stream_reply(peer: RawPeer, predicate: Any, timeout: float = 10) -> bool:
    """Read stream batches until one message satisfies predicate (True) or the stream
    closes (False)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            batch = peer.read(timeout=max(deadline - time.monotonic(), 0.001))
        except Closed:
            return False
        for msg in batch if isinstance(batch, list | tuple) else [batch]:
            if predicate(msg):
                return True


def test_client_stream_survives_garbage_and_wrong_ops(scheduler: str, scheduler_log: Any):
    peer, _ = open_client_stream(scheduler)
    with peer:
        sentinel = f"sentinel-{uuid.uuid4()}"
        peer.send(
            [
                {"op": "no-such-stream-op", "x": 1},
                {"op": "task-finished", "key": "x", "run_id": 1, "nbytes": 1},  # a worker op
                {"op": "client-desires-keys", "keys": 5},
                {"op": "client-releases-keys"},
                {"op": "report-key", "key": {"a": "dict"}},
                {"op": "client-desires-keys", "keys": ["k"], "client": 7},
                {"op": "update-data", "who_has": {"k": ["tcp://nowhere:1"]}, "nbytes": "x"},
                # No topic, and an unhashable "key" (found by hypothesis: the stream hung).
                {"op": "unsubscribe-topic", "key": {"": None}},
                {"op": "subscribe-topic"},
                {"op": "report-key", "key": sentinel},
            ]
        )
        # The stream is kept and processed in order: the sentinel gets its answer.
        assert wait_for_stream_reply(
            peer, lambda m: m.get("op") == "cancelled-keys" and sentinel in m.get("keys", ())
        )
    log = scheduler_log()
    assert "ignoring unknown stream op 'no-such-stream-op'" in log
    assert "ignoring unknown stream op 'task-finished'" in log


def test_random_client_stream_messages(scheduler: str, fuzz_settings: Any) -> None:
    @fuzz_settings
    @given(
        batch=st.lists(
            st.builds(lambda op, body: {**body, "op": op}, st.sampled_from(CLIENT_STREAM_OPS),
                      fields()),
            min_size=1,
            max_size=6,
        )
    )  # fmt: skip
    def check(batch: list[dict[str, Any]]) -> None:
        peer, _ = open_client_stream(scheduler)
        with peer:
            sentinel = f"sentinel-{uuid.uuid4()}"
            try:
                peer.send([*batch, {"op": "report-key", "key": sentinel}])
            except OSError:
                return
            # Either the sentinel is answered (stream kept) or the stream was dropped.
            wait_for_stream_reply(
                peer,
                lambda m: m.get("op") == "cancelled-keys" and sentinel in m.get("keys", ()),
            )
        assert_alive(scheduler)

    check()


def register_fake_worker(address: str, **extra: Any) -> tuple[RawPeer, str]:
    worker = f"tcp://127.0.0.1:{40000 + uuid.uuid4().int % 20000}"
    peer = RawPeer(address)
    reply = peer.rpc(
        {
            "op": "register-worker",
            "reply": False,
            "address": worker,
            "name": f"fuzz-{uuid.uuid4()}",
            "nthreads": 1,
            "status": "paused",  # no real work lands on it unless a test wants that
            "memory_limit": 0,
            "resources": {},
            **extra,
        }
    )
    assert reply["status"] == "OK", reply
    return peer, worker


def test_random_worker_stream_messages(scheduler: str, fuzz_settings: Any) -> None:
    @fuzz_settings
    @given(
        batch=st.lists(
            st.builds(lambda op, body: {**body, "op": op}, st.sampled_from(WORKER_STREAM_OPS),
                      fields()),
            min_size=1,
            max_size=6,
        )
    )  # fmt: skip
    def check(batch: list[dict[str, Any]]) -> None:
        peer, _ = register_fake_worker(scheduler)
        with peer:
            sentinel = f"sentinel-{uuid.uuid4()}"
            # A paused worker must not be made running by the fuzz batch.
            batch = [m for m in batch if m["op"] != "worker-status-change"]
            try:
                peer.send([*batch, {"op": "request-refresh-who-has", "keys": [sentinel]}])
            except OSError:
                return
            wait_for_stream_reply(peer, lambda m: m.get("op") == "refresh-who-has")
        assert_alive(scheduler)

    check()


def test_stale_and_unknown_results_from_a_worker(
    scheduler: str, canary: Any, scheduler_log: Any
) -> None:
    """A (fake) worker reports results for unknown keys, with stale run_ids, and with
    wrong field types; only a correct report counts. A bad message is logged, not sent back:
    a real worker has no handler for an ``error`` message and would close its stream."""
    peer, worker = register_fake_worker(scheduler, status="running", resources={"FUZZ": 1})
    client = canary.client
    with peer:
        peer.send([{"op": "task-finished", "key": "never-submitted", "run_id": 1, "nbytes": 8}])
        assert wait_for_stream_reply(
            peer, lambda m: m.get("op") == "free-keys" and "never-submitted" in m["keys"]
        )
        future = client.submit(time.sleep, 0, resources={"FUZZ": 1}, pure=False)
        compute: dict[str, Any] = {}

        def got_compute(msg: dict[str, Any]) -> bool:
            if msg.get("op") == "compute-task" and msg.get("key") == future.key:
                compute.update(msg)
                return True
            return False

        assert wait_for_stream_reply(peer, got_compute)
        key, run_id = compute["key"], compute["run_id"]
        # Stale run_id from the assigned worker: the task starts over with a new run_id.
        peer.send([{"op": "task-finished", "key": key, "run_id": run_id + 1000, "nbytes": 8}])
        compute.clear()
        assert wait_for_stream_reply(peer, got_compute)
        assert compute["run_id"] != run_id
        run_id = compute["run_id"]
        # An error for an old run from the assigned worker: start over, as Dask does.
        peer.send([{"op": "task-erred", "key": key, "run_id": run_id - 1, "exception": b"x"}])
        compute.clear()
        assert wait_for_stream_reply(peer, got_compute)
        run_id = compute["run_id"]
        # A result with a nonsense size or an unhashable key: refused at the edge.
        peer.send(
            [
                {"op": "task-finished", "key": key, "run_id": run_id, "nbytes": "lots"},
                {"op": "task-finished", "key": [1, {"x": 2}], "run_id": run_id, "nbytes": 1},
            ]
        )
        deadline = time.monotonic() + 10
        while scheduler_log().count(f"bad stream message from {worker}") < 2:
            assert time.monotonic() < deadline, "the bad results were not logged"
            time.sleep(0.05)
        assert dsched_info(client)["valid"]
        assert future.status == "pending"
        # The correct report counts.
        peer.send([{"op": "task-finished", "key": key, "run_id": run_id, "nbytes": 8}])
        deadline = time.monotonic() + 10
        while future.status != "finished" and time.monotonic() < deadline:
            time.sleep(0.05)
        assert future.status == "finished"
        future.release()
        assert wait_for_stream_reply(
            peer, lambda m: m.get("op") == "free-keys" and key in m["keys"]
        )


# ----------------------------------------------------------------------------- stalls
def test_stalled_peers_never_block_others(scheduler: str, canary: Any) -> None:
    silent = [RawPeer(scheduler, handshake=False) for _ in range(20)]
    half = []
    for _ in range(20):
        peer = RawPeer(scheduler)
        peer.send_raw(header(1000, 1, [984]) + b"x" * 100)  # half a frame, then silence
        half.append(peer)
    try:
        started = time.monotonic()
        canary.wait_for_rounds(3)
        assert_alive(scheduler)
        assert time.monotonic() - started < HANDSHAKE_TIMEOUT_S + 30
        # Peers that never finish their handshake are dropped after the handshake timeout.
        for peer in silent:
            assert peer.is_closed_by_peer(HANDSHAKE_TIMEOUT_S + 5)
    finally:
        for peer in silent + half:
            peer.close()
