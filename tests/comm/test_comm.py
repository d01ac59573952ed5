"""Tests of dsched.comm against itself and against real distributed comms and servers.

Every test runs its own event loop with ``asyncio.run`` and binds only 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import struct
from collections.abc import Awaitable, Callable
from typing import Any

import numpy as np
import pytest
from distributed.comm import connect as distributed_connect
from distributed.core import Server, rpc
from distributed.protocol import Serialize, serialize, to_serialize

from dsched.comm import (
    Comm,
    CommClosedError,
    ConnectionPool,
    Listener,
    connect,
    listen,
    parse_address,
)
from dsched.wire import HANDSHAKE, Pickled, RemoteProtocolError, Serialized, dumps, encode_frames

pytestmark = pytest.mark.timeout(30)


def run(coroutine_function: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(asyncio.wait_for(coroutine_function(), 20))  # type: ignore[arg-type]


def wire(message: object) -> bytes:
    return b"".join(bytes(buffer) for buffer in encode_frames(dumps(message)))


class EchoService:
    """A tiny RPC server on our listener: replies to ``echo`` and logs every request."""

    def __init__(self) -> None:
        self.requests: list[Any] = []
        self.connections: list[Comm] = []
        self.errors: list[BaseException] = []

    async def handle(self, comm: Comm) -> None:
        self.connections.append(comm)
        try:
            while True:
                message = await comm.read()
                self.requests.append(message)
                assert isinstance(message, dict)
                op = message["op"]
                if op == "close":
                    break
                if op == "die":
                    comm.abort()
                    return
                if op == "get_data":
                    # Worker get_data: reply, then wait for the caller's "OK".
                    comm.write({"status": "OK", "data": message["keys"]})
                    assert await comm.read() == "OK"
                    self.requests.append("OK")
                    continue
                if message.get("reply", True):
                    comm.write(message.get("x"))
        except (CommClosedError, RemoteProtocolError) as error:
            self.errors.append(error)
        finally:
            await comm.close()


async def start_echo(**kwargs: Any) -> tuple[Listener, EchoService]:
    service = EchoService()
    listener = await listen("127.0.0.1", 0, service.handle, **kwargs)
    return listener, service


async def wait_until(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(0.01)


# -- addresses ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("address", "expected"),
    [
        ("tcp://127.0.0.1:8786", ("127.0.0.1", 8786)),
        ("127.0.0.1:1", ("127.0.0.1", 1)),
        ("tcp://[::1]:8786", ("::1", 8786)),
        ("[fe80::1%eth0]:5", ("fe80::1%eth0", 5)),
        ("tcp://example.org:0", ("example.org", 0)),
    ],
)
def test_parse_address(address: str, expected: tuple[str, int]) -> None:
    assert parse_address(address) == expected


@pytest.mark.parametrize(
    "address", ["tcp://::1:80", "tls://h:1", "host", "tcp://h:x", "[::1]", "h:70000", ":80"]
)
def test_parse_address_rejects(address: str) -> None:
    with pytest.raises(ValueError):
        parse_address(address)


# -- ours <-> ours ----------------------------------------------------------------------------


def test_round_trip_between_our_connect_and_our_listener() -> None:
    async def main() -> None:
        listener, _ = await start_echo()
        assert listener.address == f"tcp://127.0.0.1:{listener.port}"
        comm = await connect(listener.address)
        assert comm.peer_address == listener.address
        assert comm.local_address.startswith("tcp://127.0.0.1:")
        assert comm.remote_handshake == {
            "compression": None,
            "python": HANDSHAKE["python"],
            "pickle-protocol": 5,
        }
        payload = Serialized({"serializer": "pickle", "num-sub-frames": 1}, [b"opaque-bytes"])
        task = Pickled.from_bytes(b"\x80\x05K\x01.")
        message = {"key": ("x", 1), "data": payload, "task": task, "keys": {1, 2}}
        comm.write({"op": "echo", "x": message})
        reply = await comm.read()
        assert isinstance(reply, dict)
        assert reply["key"] == ("x", 1)
        assert reply["keys"] == {1, 2}
        assert reply["data"] == payload
        assert reply["task"].unpickle() == 1
        for index in range(100):
            comm.write({"op": "echo", "x": index})
        assert [await comm.read() for _ in range(100)] == list(range(100))
        comm.write({"op": "close", "reply": False})
        with pytest.raises(CommClosedError):
            await comm.read()
        assert comm.closed
        with pytest.raises(CommClosedError):
            comm.write({"op": "echo"})
        await listener.stop()

    run(main)


def test_large_message_is_flushed_before_close() -> None:
    async def main() -> None:
        listener, service = await start_echo()
        comm = await connect(listener.address)
        big = Serialized({"serializer": "pickle"}, [b"\x07" * 20_000_000])
        comm.write({"op": "store", "x": big, "reply": False})
        await comm.close()
        await wait_until(lambda: len(service.requests) == 1)
        received = service.requests[0]["x"]
        assert isinstance(received, Serialized)
        assert bytes(received.frames[0]) == b"\x07" * 20_000_000
        await listener.stop()

    run(main)


def test_unread_messages_pause_reading_then_all_arrive_in_order() -> None:
    async def main() -> None:
        async def flood(comm: Comm) -> None:
            for index in range(5000):
                comm.write(index)
                await comm.drain()
            await comm.close()

        listener = await listen("127.0.0.1", 0, flood)
        comm = await connect(listener.address)
        await wait_until(lambda: comm.reading_paused)
        received = []
        with pytest.raises(CommClosedError):
            while True:
                received.append(await comm.read())
        assert received == list(range(5000))
        await listener.stop()

    run(main)


def test_concurrent_reads_are_refused() -> None:
    async def main() -> None:
        listener, _ = await start_echo()
        comm = await connect(listener.address)
        first = asyncio.create_task(comm.read())
        await asyncio.sleep(0.01)
        with pytest.raises(RuntimeError, match="another read"):
            await comm.read()
        comm.abort()
        with pytest.raises(CommClosedError):
            await first
        await listener.stop()

    run(main)


# -- ours -> real distributed server ------------------------------------------------------------


def test_our_connect_to_a_real_distributed_server() -> None:
    async def main() -> None:
        async def echo(x: Any = None) -> Any:
            return x

        server = Server({"echo": echo}, deserialize=False)
        await server.listen("tcp://127.0.0.1:0")
        try:
            comm = await connect(server.address)
            assert comm.remote_handshake["pickle-protocol"] == 5
            header, frames = serialize(np.arange(10_000))
            payload = Serialized(header, list(frames))
            comm.write({"op": "echo", "x": {"payload": payload, "key": ("k", 2)}})
            reply = await comm.read()
            assert isinstance(reply, dict)
            assert reply["key"] == ("k", 2)
            echoed = reply["payload"]
            assert isinstance(echoed, Serialized)
            assert b"".join(bytes(frame) for frame in echoed.frames) == b"".join(
                bytes(frame) for frame in frames
            )
            assert echoed.header["serializer"] == header["serializer"]
            comm.write({"op": "no-such-op"})
            assert await comm.read() is None  # the real server's answer to unknown ops
            await comm.close()

            pool = ConnectionPool()
            assert await pool.rpc(server.address, {"op": "echo", "x": [1, 2]}) == (1, 2)
            await pool.close()
        finally:
            await server.close()

    run(main)


# -- real distributed -> our listener ------------------------------------------------------------


def test_distributed_rpc_and_comm_talk_to_our_listener() -> None:
    async def main() -> None:
        listener, service = await start_echo()
        array = np.arange(100_000, dtype="f4")
        async with rpc(listener.address) as remote:
            echoed = await remote.echo(x={"array": to_serialize(array), "n": 3})
        np.testing.assert_array_equal(echoed["array"], array)
        assert echoed["n"] == 3
        assert isinstance(service.requests[0]["x"]["array"], Serialized)

        comm = await distributed_connect(listener.address)
        assert comm.handshake_options == {"pickle-protocol": 5, "compression": None}
        await comm.write({"op": "echo", "x": {("a", 1): Serialize(b"raw")}})
        assert await comm.read() == {("a", 1): b"raw"}
        await comm.close()
        await listener.stop()

    run(main)


# -- hostile and broken peers --------------------------------------------------------------------


async def raw_connection(listener: Listener) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection("127.0.0.1", listener.port)


async def assert_connection_dropped(reader: asyncio.StreamReader) -> None:
    async with asyncio.timeout(5):
        with pytest.raises(ConnectionResetError):
            while await reader.read(65536):
                pass
            raise ConnectionResetError  # a clean EOF counts as dropped too


def test_garbage_instead_of_a_handshake_kills_only_that_connection() -> None:
    async def main() -> None:
        listener, service = await start_echo()
        good = await connect(listener.address)
        reader, writer = await raw_connection(listener)
        writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        await assert_connection_dropped(reader)
        writer.close()
        good.write({"op": "echo", "x": "still here"})
        assert await good.read() == "still here"
        assert len(service.connections) == 1  # the garbage never reached the handler
        after = await connect(listener.address)
        after.write({"op": "echo", "x": 1})
        assert await after.read() == 1
        await listener.stop()

    run(main)


def test_garbage_after_the_handshake_raises_in_read_and_aborts() -> None:
    async def main() -> None:
        listener, service = await start_echo()
        good = await connect(listener.address)
        reader, writer = await raw_connection(listener)
        writer.write(wire(HANDSHAKE))
        writer.write(wire({"op": "note", "x": "fine", "reply": False}))
        writer.write(struct.pack("<QQ", 16, 2**40))  # absurd frame count
        await assert_connection_dropped(reader)
        writer.close()
        await wait_until(lambda: len(service.errors) == 1)
        assert isinstance(service.errors[0], RemoteProtocolError)
        assert {
            "op": "note",
            "x": "fine",
            "reply": False,
        } in service.requests  # delivered before the error
        good.write({"op": "echo", "x": "ok"})
        assert await good.read() == "ok"
        await listener.stop()

    run(main)


def test_undecodable_message_is_a_remote_protocol_error() -> None:
    async def main() -> None:
        listener, service = await start_echo()
        reader, writer = await raw_connection(listener)
        writer.write(wire(HANDSHAKE))
        frame = b"\xc1"  # never valid msgpack
        writer.write(b"".join(bytes(buffer) for buffer in encode_frames([frame])))
        await assert_connection_dropped(reader)
        writer.close()
        await wait_until(lambda: len(service.errors) == 1)
        assert isinstance(service.errors[0], RemoteProtocolError)
        await listener.stop()

    run(main)


def test_stalled_peers_do_not_block_others() -> None:
    async def main() -> None:
        listener, service = await start_echo(handshake_timeout=0.5)
        silent_reader, silent_writer = await raw_connection(listener)  # never handshakes
        _, half_writer = await raw_connection(listener)
        half_writer.write(wire(HANDSHAKE))
        half_frame = wire({"op": "echo", "x": "x" * 1000})
        half_writer.write(half_frame[: len(half_frame) // 2])
        await half_writer.drain()

        good = await connect(listener.address)
        for index in range(20):
            good.write({"op": "echo", "x": index})
        assert [await good.read() for _ in range(20)] == list(range(20))

        await assert_connection_dropped(silent_reader)  # handshake timeout
        assert len(service.requests) == 20  # the half message is still pending
        half_writer.write(half_frame[len(half_frame) // 2 :])
        await wait_until(lambda: len(service.requests) == 21)
        for writer in (silent_writer, half_writer):
            writer.close()
        await listener.stop()

    run(main)


def test_connect_errors_are_clear() -> None:
    async def main() -> None:
        async def never_answers(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await reader.read()
            writer.close()

        mute = await asyncio.start_server(never_answers, "127.0.0.1", 0)
        port = mute.sockets[0].getsockname()[1]
        with pytest.raises(TimeoutError, match=r"timed out after 0\.3 s"):
            await connect(f"tcp://127.0.0.1:{port}", timeout=0.3)
        mute.close()
        await mute.wait_closed()

        async def answers_garbage(
            reader: asyncio.StreamReader, writer: asyncio.StreamWriter
        ) -> None:
            writer.write(wire(["not", "a", "handshake"]))
            await reader.read()
            writer.close()

        liar = await asyncio.start_server(answers_garbage, "127.0.0.1", 0)
        port = liar.sockets[0].getsockname()[1]
        with pytest.raises(CommClosedError, match="bad handshake"):
            await connect(f"127.0.0.1:{port}")
        liar.close()
        await liar.wait_closed()

        with pytest.raises(OSError) as refused:
            await connect(f"tcp://127.0.0.1:{port}")
        assert f"127.0.0.1:{port}" in "".join(refused.value.__notes__)

    run(main)


# -- pool ------------------------------------------------------------------------------------


def test_pool_reuses_comms_and_discards_failed_ones() -> None:
    async def main() -> None:
        listener, service = await start_echo()
        pool = ConnectionPool(limit_per_address=3)
        address = listener.address
        for index in range(10):
            assert await pool.rpc(address, {"op": "echo", "x": index}) == index
        assert len(service.connections) == 1
        assert pool.idle_count(address) == 1

        error_reply = {"status": "uncaught-error", "exception_text": "boom"}
        assert await pool.rpc(address, {"op": "echo", "x": error_reply}) == error_reply

        results = await asyncio.gather(
            *(pool.rpc(address, {"op": "echo", "x": index}) for index in range(12))
        )
        assert results == list(range(12))
        assert len(service.connections) == 3  # limit_per_address
        assert pool.idle_count(address) == 3

        with pytest.raises(CommClosedError):
            await pool.rpc(address, {"op": "die"})
        assert pool.idle_count(address) == 2  # the failed comm was not put back

        assert await pool.rpc(address, {"op": "note", "reply": False}) is None
        assert await pool.rpc(address, {"op": "echo", "x": "after"}) == "after"
        await pool.close()
        await wait_until(
            lambda: (
                sum(request == {"op": "close", "reply": False} for request in service.requests) == 2
            )
        )
        with pytest.raises(CommClosedError):
            await pool.rpc(address, {"op": "echo"})
        await listener.stop()

    run(main)


def test_pool_two_step_get_data_exchange() -> None:
    async def main() -> None:
        listener, service = await start_echo()
        pool = ConnectionPool()
        async with pool.connection(listener.address) as comm:
            comm.write({"op": "get_data", "keys": ("x", "y"), "who": None})
            reply = await comm.read()
            assert reply == {"status": "OK", "data": ("x", "y")}
            comm.write("OK")
        assert await pool.rpc(listener.address, {"op": "echo", "x": 5}) == 5
        assert len(service.connections) == 1
        assert service.requests[1] == "OK"

        with pytest.raises(asyncio.TimeoutError):
            async with pool.connection(listener.address) as comm:
                comm.write({"op": "get_data", "keys": (), "who": None})
                await asyncio.wait_for(asyncio.Event().wait(), 0.05)
        assert pool.idle_count(listener.address) == 0  # mid-conversation: aborted, not reused
        assert await pool.rpc(listener.address, {"op": "echo", "x": 6}) == 6
        assert len(service.connections) == 2
        await pool.close()
        await listener.stop()

    run(main)
