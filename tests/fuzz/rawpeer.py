"""A deliberately dumb Dask peer over a blocking socket: sends exactly the bytes it is told.

Tests use it to speak to a live scheduler with valid, truncated or hostile input, and to
observe what comes back (messages, or the connection being closed).
"""

from __future__ import annotations

import socket
import struct
import time
from typing import Any

from dsched.comm.tcp import parse_address
from dsched.wire import HANDSHAKE, FrameDecoder, RemoteProtocolError, dumps, encode_frames, loads

# The fuzz target scheduler's settings (conftest.py starts it with these).
HANDSHAKE_TIMEOUT_S = 3
MAX_MESSAGE_BYTES = 8 * 2**20


class Closed(Exception):
    """The scheduler closed the connection (EOF or reset)."""


def frame_bytes(frames: list[bytes]) -> bytes:
    return b"".join(bytes(b) for b in encode_frames(frames))


def message_bytes(msg: Any) -> bytes:
    return frame_bytes([bytes(f) for f in dumps(msg)])


def header(total: int, n_frames: int, lengths: list[int]) -> bytes:
    """A frame header announcing whatever sizes the test wants (lies included)."""
    return struct.pack(f"<QQ{len(lengths)}Q", total, n_frames, *lengths)


class RawPeer:
    def __init__(self, address: str, handshake: bool = True, timeout: float = 10.0) -> None:
        host, port = parse_address(address)
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.timeout = timeout
        self.decoder = FrameDecoder()
        self.pending: list[Any] = []
        if handshake:
            self.send_raw(message_bytes(HANDSHAKE))
            remote = self.read()
            assert isinstance(remote, dict) and "pickle-protocol" in remote, remote

    def __enter__(self) -> RawPeer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.sock.close()

    def send_raw(self, data: bytes) -> None:
        self.sock.sendall(data)

    def send(self, msg: Any) -> None:
        self.send_raw(message_bytes(msg))

    def rpc(self, msg: Any) -> Any:
        self.send(msg)
        return self.read()

    def read(self, timeout: float | None = None) -> Any:
        """The next message; raises Closed on EOF/reset, TimeoutError if nothing comes."""
        deadline = time.monotonic() + (timeout if timeout is not None else self.timeout)
        while not self.pending:
            frames = self.decoder.next_message()
            if frames is not None:
                self.pending.append(loads(frames))
                break
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError("no message from the scheduler")
            self.sock.settimeout(remaining)
            try:
                data = self.sock.recv(65536)
            except TimeoutError:
                raise
            except OSError as exc:  # reset
                raise Closed(repr(exc)) from exc
            if not data:
                raise Closed("EOF")
            try:
                self.decoder.feed(data)
            except RemoteProtocolError as exc:
                raise AssertionError(f"the scheduler sent invalid bytes: {exc}") from exc
        return self.pending.pop(0)

    def read_until_closed(self, timeout: float) -> list[Any]:
        """Everything the scheduler sends until it closes the connection."""
        received = []
        deadline = time.monotonic() + timeout
        while True:
            try:
                received.append(self.read(timeout=max(deadline - time.monotonic(), 0.001)))
            except Closed:
                return received

    def is_closed_by_peer(self, timeout: float) -> bool:
        try:
            self.read_until_closed(timeout)
        except TimeoutError:
            return False
        return True
