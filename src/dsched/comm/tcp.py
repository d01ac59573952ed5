"""TCP comms: one connection carrying Dask framed messages, plus connect and listen.

Theory of operation
-------------------
A ``Comm`` is an ``asyncio.Protocol`` (callbacks, not ``StreamReader``: no per-read
coroutine and no intermediate buffer copies). ``data_received`` feeds the pure
``FrameDecoder`` and decodes every complete message with ``codec.loads`` right away, so a
peer sending garbage is detected and cut off as soon as the bytes arrive. Decoded
messages wait in an inbox until ``read()`` takes them; when more than
``READ_QUEUE_HIGH_WATER`` pile up unread we pause reading from the socket, which pushes
back on the peer through TCP flow control, and resume once the reader catches up.

Writing never awaits: ``write()`` encodes and hands the buffers to the transport (which
queues what the kernel does not take at once). Callers that produce a lot of data await
``drain()``, which blocks only while asyncio has paused us for writing.

The end of a connection is recorded once, as the exception ``read()`` will raise after
the already-received messages are consumed: ``RemoteProtocolError`` when the peer sent
invalid bytes (reported once, then ``CommClosedError``), ``CommClosedError`` on EOF,
reset or a local ``close()``/``abort()``.

Both ends of a Dask connection open with a handshake (protocol.md §1.4): each side writes
its handshake map and then reads the peer's, so neither waits on the other. ``connect``
does this for outgoing connections; ``listen`` does it for every accepted connection
(bounded by ``handshake_timeout``) before handing the comm to ``on_comm``. A connection
that fails its handshake is aborted alone; the listener keeps serving. The listening
socket's backlog is distributed's (``distributed.comm.socket-backlog``, 2048), not
asyncio's 100, so a thousand peers connecting at once are queued by the kernel instead of
waiting on SYN retries.

TLS (``tls://``, protocol.md §1.6) is the same framing inside TLS: ``connect`` and ``listen``
take an ``ssl_context`` (built by ``dsched.comm.tls`` from distributed's ``Security``) and
hand it to asyncio, which runs the TLS handshake before ``connection_made``; a peer that
fails it (no certificate, wrong CA, plain TCP bytes) never becomes a ``Comm``. TLS comms
are ``TLSComm``s, so the plain TCP path is exactly the one above. With
``require_encryption`` (``distributed.comm.require-encryption``), plain ``tcp://`` is
refused both ways with ``SecurityError``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
import sys
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any

from dsched.wire import (
    HANDSHAKE,
    FrameDecoder,
    ProtocolError,
    RemoteProtocolError,
    dumps,
    encode_frames,
    loads,
)
from dsched.wire.framing import DEFAULT_MAX_MESSAGE_BYTES

__all__ = [
    "Comm",
    "CommClosedError",
    "Listener",
    "SecurityError",
    "TLSComm",
    "connect",
    "format_address",
    "listen",
    "parse_address",
    "split_address",
]

logger = logging.getLogger(__name__)

# Unread decoded messages above which we stop reading the socket, and the level at which
# we start again. Stream messages are whole batches, so 1000 is already a lot of work.
READ_QUEUE_HIGH_WATER = 1000
READ_QUEUE_LOW_WATER = 100

# How long close() waits for buffered writes to reach the peer before giving up and
# aborting (a peer that stopped reading must not hang our shutdown).
CLOSE_FLUSH_TIMEOUT = 5.0

# The listen backlog: how many connections the kernel completes and queues for accept()
# before it drops SYNs (a dropped SYN is retried by the peer after 1 s, then 3 s, ...).
# asyncio's default is 100, so a thousand workers starting together stall on retries;
# distributed listens with ``distributed.comm.socket-backlog`` (2048 by default), and so do
# we. The kernel caps it at net.core.somaxconn.
DEFAULT_BACKLOG = 2048

# Kernel-level liveness, as distributed does (distributed.comm.timeouts.tcp = 30 s): a
# peer that vanished without a FIN/RST is noticed within about this long.
TCP_TIMEOUT_SECONDS = 30


class CommClosedError(ConnectionError):
    """The connection is closed (EOF, reset, aborted, or closed locally)."""


class SecurityError(ConnectionError):
    """A connection refused by the TLS settings: a ``tcp://`` peer while encryption is
    required, or a ``tls://`` peer without a TLS context. An ``OSError``, so callers treat
    it like any other failed connection."""


SCHEMES = ("tcp", "tls")


def split_address(address: str) -> tuple[str, str, int]:
    """Split ``tcp://host:port``, ``tls://host:port``, ``host:port`` (tcp) or
    ``tls://[::1]:port`` into (scheme, host, port)."""
    scheme, location = "tcp", address
    if "://" in address:
        scheme, _, location = address.partition("://")
        if scheme not in SCHEMES:
            raise ValueError(f"unsupported scheme {scheme!r} in address {address!r}")
    if location.startswith("["):
        host, bracket, tail = location[1:].partition("]")
        if not bracket or not tail.startswith(":"):
            raise ValueError(f"invalid address {address!r}; expected [ipv6]:port")
        port_text = tail[1:]
    else:
        host, colon, port_text = location.rpartition(":")
        if not colon or ":" in host:
            raise ValueError(f"invalid address {address!r}; ipv6 hosts need brackets: [::1]:port")
    try:
        port = int(port_text)
    except ValueError:
        raise ValueError(f"invalid port in address {address!r}") from None
    if not host or not 0 <= port < 65536:
        raise ValueError(f"invalid address {address!r}")
    return scheme, host, port


def parse_address(address: str) -> tuple[str, int]:
    """Split ``tcp://host:port``, ``host:port`` or ``tcp://[::1]:port`` into (host, port).

    Plain TCP only; ``split_address`` also accepts ``tls://``.
    """
    scheme, host, port = split_address(address)
    if scheme != "tcp":
        raise ValueError(f"unsupported scheme {scheme!r} in address {address!r}")
    return host, port


def format_address(host: str, port: int, scheme: str = "tcp") -> str:
    if ":" in host:
        host = f"[{host}]"
    return f"{scheme}://{host}:{port}"


def _sockaddr_to_address(sockaddr: Any, scheme: str = "tcp") -> str:
    if isinstance(sockaddr, tuple) and len(sockaddr) >= 2:
        return format_address(str(sockaddr[0]), int(sockaddr[1]), scheme)
    return f"{scheme}://{sockaddr}"


def _configure_socket(sock: Any) -> None:
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        if sys.platform.startswith("linux"):
            probes = 10
            interval = max(1, (TCP_TIMEOUT_SECONDS - 2) // probes)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, probes)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, interval)
            sock.setsockopt(
                socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, TCP_TIMEOUT_SECONDS - interval * probes
            )
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, TCP_TIMEOUT_SECONDS * 1000)
    except OSError:
        logger.debug("could not set TCP options", exc_info=True)


class Comm(asyncio.Protocol):
    """One TCP connection carrying framed messages (see the module docstring).

    Created by ``connect`` and ``listen``; not meant to be constructed directly.
    """

    scheme = "tcp"  # of local_address and peer_address

    def __init__(
        self,
        on_connected: Callable[[Comm], None] | None = None,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    ) -> None:
        self.name = ""  # set by the owner, for logs
        self.remote_handshake: dict[Any, Any] = {}
        self._on_connected = on_connected
        self._transport: asyncio.Transport | None = None
        # A peer announcing a message above the cap is cut off before we buffer any of it.
        self._decoder = FrameDecoder(max_message_bytes=max_message_bytes)
        self._inbox: deque[object] = deque()
        self._read_waiter: asyncio.Future[None] | None = None
        self._end: BaseException | None = None  # raised by read() once the inbox is empty
        self._closed = False
        self._reading_paused = False
        self._writing_paused = False
        self._drain_waiters: list[asyncio.Future[None]] = []
        self._lost: asyncio.Future[None] | None = None
        self._local_address = ""
        self._peer_address = ""

    # -- public API --------------------------------------------------------------------

    @property
    def peer_address(self) -> str:
        return self._peer_address

    @property
    def local_address(self) -> str:
        return self._local_address

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def reading_paused(self) -> bool:
        """True while too many unread messages are queued and the socket is not read."""
        return self._reading_paused

    async def read(self) -> object:
        """Return the next message. Raises CommClosedError (or RemoteProtocolError once)."""
        while True:
            if self._inbox:
                message = self._inbox.popleft()
                if self._reading_paused and len(self._inbox) <= READ_QUEUE_LOW_WATER:
                    self._reading_paused = False
                    if self._transport is not None and not self._closed:
                        self._transport.resume_reading()
                return message
            if self._end is not None:
                end = self._end
                if isinstance(end, RemoteProtocolError):
                    # Report the peer's fault once; afterwards it is just a closed comm.
                    self._end = CommClosedError(f"{self!r} aborted after a protocol error")
                    self._end.__cause__ = end
                    raise end
                raise CommClosedError(str(end)) from end.__cause__
            if self._read_waiter is not None:
                raise RuntimeError(f"{self!r}: read() called while another read() is waiting")
            self._read_waiter = asyncio.get_running_loop().create_future()
            try:
                await self._read_waiter
            finally:
                self._read_waiter = None

    def write(self, msg: object) -> None:
        """Encode and send one message without waiting. Raises CommClosedError if closed.

        An unencodable message raises LocalProtocolError and writes nothing.
        """
        transport = self._transport
        if transport is None or self._closed or transport.is_closing():
            raise CommClosedError(f"{self!r} is closed")
        transport.writelines(encode_frames(dumps(msg)))

    async def drain(self) -> None:
        """Wait until the transport accepts more data (only blocks while it is paused)."""
        if self._writing_paused and not self._closed:
            waiter = asyncio.get_running_loop().create_future()
            self._drain_waiters.append(waiter)
            await waiter
        if self._closed:
            raise CommClosedError(f"{self!r} is closed")

    def abort(self) -> None:
        """Close immediately, discarding unsent data and unread messages."""
        self._close_locally()
        if self._transport is not None:
            self._transport.abort()

    async def wait_lost(self) -> None:
        """Return once the connection is gone: closed by either side, or broken. Noticed
        without reading, so a handler can tell that the peer it serves has left."""
        if self._lost is not None:
            await asyncio.shield(self._lost)

    async def close(self) -> None:
        """Flush what was written, then close (abort if the peer does not take it in time)."""
        already_closed = self._closed
        self._close_locally()
        transport = self._transport
        if transport is None or self._lost is None:
            return
        if not already_closed:
            transport.close()
        try:
            await asyncio.wait_for(asyncio.shield(self._lost), CLOSE_FLUSH_TIMEOUT)
        except TimeoutError:
            transport.abort()

    def __repr__(self) -> str:
        state = " closed" if self._closed else ""
        name = f" {self.name}" if self.name else ""
        return f"<Comm{name}{state} local={self._local_address} peer={self._peer_address}>"

    # -- handshake ---------------------------------------------------------------------

    async def _handshake(self) -> None:
        # Write first, then read: the peer does the same, so neither side waits.
        self.write(HANDSHAKE)
        remote = await self.read()
        if not isinstance(remote, dict):
            raise RemoteProtocolError(f"handshake is a {type(remote).__name__}, not a map")
        if "pickle-protocol" not in remote:
            raise RemoteProtocolError(
                "handshake lacks pickle-protocol: the peer's Dask version is not compatible"
            )
        self.remote_handshake = remote

    # -- asyncio.Protocol callbacks ----------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport
        self._lost = asyncio.get_running_loop().create_future()
        sock = transport.get_extra_info("socket")
        if sock is not None:
            _configure_socket(sock)
        self._local_address = _sockaddr_to_address(
            transport.get_extra_info("sockname"), self.scheme
        )
        self._peer_address = _sockaddr_to_address(transport.get_extra_info("peername"), self.scheme)
        if self._on_connected is not None:
            self._on_connected(self)

    def data_received(self, data: bytes) -> None:
        if self._closed:
            return  # closing or aborted: nobody will read it
        decoder = self._decoder
        decoder.feed(data)
        try:
            while (frames := decoder.next_message()) is not None:
                self._inbox.append(loads(frames))
        except RemoteProtocolError as error:
            logger.warning("%r: peer sent invalid data, aborting: %s", self, error)
            if self._end is None:
                self._end = error
            self._closed = True
            assert self._transport is not None
            self._transport.abort()
        if self._inbox:
            self._wake_reader()
            if (
                len(self._inbox) > READ_QUEUE_HIGH_WATER
                and not self._reading_paused
                and not self._closed
                and self._transport is not None
            ):
                self._transport.pause_reading()
                self._reading_paused = True

    def eof_received(self) -> bool | None:
        return None  # let asyncio close the transport; connection_lost follows

    def connection_lost(self, exc: Exception | None) -> None:
        self._closed = True
        if self._end is None:
            reason = f": {exc}" if exc is not None else ""
            self._end = CommClosedError(f"connection to {self._peer_address} closed{reason}")
            self._end.__cause__ = exc
        self._wake_reader()
        self._wake_drainers()
        if self._lost is not None and not self._lost.done():
            self._lost.set_result(None)

    def pause_writing(self) -> None:
        self._writing_paused = True

    def resume_writing(self) -> None:
        self._writing_paused = False
        self._wake_drainers()

    # -- internals ---------------------------------------------------------------------

    def _close_locally(self) -> None:
        self._closed = True
        self._inbox.clear()
        if self._end is None or isinstance(self._end, RemoteProtocolError):
            self._end = CommClosedError(f"{self!r} was closed locally")
        self._wake_reader()
        self._wake_drainers()

    def _wake_reader(self) -> None:
        waiter = self._read_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _wake_drainers(self) -> None:
        waiters, self._drain_waiters = self._drain_waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)


class TLSComm(Comm):
    """A ``Comm`` inside TLS: the same framing; asyncio's TLS transport does the rest."""

    scheme = "tls"

    def write(self, msg: object) -> None:
        transport = self._transport
        if transport is None or self._closed or transport.is_closing():
            raise CommClosedError(f"{self!r} is closed")
        # asyncio's TLS transport measures buffers with len(), which counts items, not
        # bytes, in a memoryview whose format is not "B": hand it bytes-shaped views only.
        transport.writelines(
            [
                buffer.cast("B")
                if isinstance(buffer, memoryview) and buffer.format != "B"
                else buffer
                for buffer in encode_frames(dumps(msg))
            ]
        )

    @property
    def peer_certificate(self) -> dict[str, Any] | None:
        """The peer's verified certificate (as ``ssl.SSLSocket.getpeercert()`` returns it)."""
        if self._transport is None:
            return None
        cert = self._transport.get_extra_info("peercert")
        return cert if isinstance(cert, dict) else None


async def connect(
    address: str,
    timeout: float = 30.0,
    *,
    ssl_context: ssl.SSLContext | None = None,
    require_encryption: bool = False,
) -> Comm:
    """Open a comm to ``address`` and exchange handshakes, all within ``timeout`` seconds.

    ``tls://`` addresses are reached with ``ssl_context`` (the TLS handshake is part of
    the timeout); ``tcp://`` ones are refused when ``require_encryption`` is set.

    Raises ``TimeoutError`` on timeout, the ``OSError`` of the failed connect (with the
    address noted; ``ssl.SSLError`` for a failed TLS handshake), ``SecurityError`` when
    the TLS settings forbid the connection, or ``CommClosedError`` if the peer's handshake
    is missing or invalid (or the peer refused our certificate).
    """
    scheme, host, port = split_address(address)
    if scheme == "tls" and ssl_context is None:
        raise SecurityError(
            f"cannot connect to {address}: no TLS configuration (a CA file and a "
            "certificate: distributed.comm.tls.*)"
        )
    if scheme == "tcp" and require_encryption:
        raise SecurityError(
            "encryption required by Dask configuration (distributed.comm.require-encryption), "
            f"refusing communication to {address!r}"
        )
    loop = asyncio.get_running_loop()
    comm: Comm | None = None
    try:
        async with asyncio.timeout(timeout):
            if scheme == "tls":
                _, comm = await loop.create_connection(
                    TLSComm, host, port, ssl=ssl_context, ssl_handshake_timeout=timeout
                )
            else:
                _, comm = await loop.create_connection(Comm, host, port)
            await comm._handshake()
    except TimeoutError as error:
        if comm is not None:
            comm.abort()
        raise TimeoutError(f"connecting to {address} timed out after {timeout} s") from error
    except ProtocolError as error:
        assert comm is not None
        comm.abort()
        raise CommClosedError(f"bad handshake from {address}: {error}") from error
    except OSError as error:
        if comm is not None:
            comm.abort()
        error.add_note(f"while connecting to {address}")
        raise
    except BaseException:
        if comm is not None:
            comm.abort()
        raise
    return comm


def configured_backlog() -> int:
    """``distributed.comm.socket-backlog`` from dask's configuration, as distributed reads
    it (``DEFAULT_BACKLOG`` when dask's configuration is not available)."""
    try:
        import dask.config

        return int(dask.config.get("distributed.comm.socket-backlog", DEFAULT_BACKLOG))
    except (ImportError, TypeError, ValueError):
        return DEFAULT_BACKLOG


def _concrete_host(bound_host: str) -> str:
    """The address to advertise for a wildcard bind: the interface with the default route."""
    if bound_host not in {"0.0.0.0", "::", ""}:
        return bound_host
    family = socket.AF_INET6 if bound_host == "::" else socket.AF_INET
    probe_target = "2001:4860:4860::8888" if family == socket.AF_INET6 else "8.8.8.8"
    # A UDP connect sends nothing; it only asks the kernel which local address would route.
    with contextlib.suppress(OSError), socket.socket(family, socket.SOCK_DGRAM) as probe:
        probe.connect((probe_target, 80))
        return str(probe.getsockname()[0])
    return "::1" if family == socket.AF_INET6 else "127.0.0.1"


class Listener:
    """Accepts connections, handshakes each, and runs ``on_comm(comm)`` for it as a task."""

    def __init__(
        self,
        on_comm: Callable[[Comm], Awaitable[None]],
        handshake_timeout: float,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self._on_comm = on_comm
        self._ssl_context = ssl_context
        self._comm_class = Comm if ssl_context is None else TLSComm
        self._max_message_bytes = max_message_bytes
        self._handshake_timeout = handshake_timeout
        self._server: asyncio.Server | None = None
        self._handshaking: set[Comm] = set()
        self._tasks: set[asyncio.Task[None]] = set()  # strong refs: the loop keeps only weak ones
        self._address = ""
        self._port = 0

    @property
    def address(self) -> str:
        return self._address

    @property
    def port(self) -> int:
        return self._port

    async def stop(self) -> None:
        """Stop accepting and abort connections still handshaking; served comms stay open."""
        if self._server is not None:
            self._server.close()
        for comm in list(self._handshaking):
            comm.abort()
        if self._server is not None:
            await self._server.wait_closed()

    def _bind(self, server: asyncio.Server) -> None:
        self._server = server
        sockets = sorted(server.sockets, key=lambda sock: sock.family != socket.AF_INET)
        host, port = sockets[0].getsockname()[:2]
        self._port = int(port)
        self._address = format_address(
            _concrete_host(str(host)), self._port, self._comm_class.scheme
        )

    def _make_comm(self) -> Comm:
        return self._comm_class(
            on_connected=self._start_serving, max_message_bytes=self._max_message_bytes
        )

    def _start_serving(self, comm: Comm) -> None:
        task = asyncio.get_running_loop().create_task(self._serve(comm))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _serve(self, comm: Comm) -> None:
        self._handshaking.add(comm)
        try:
            async with asyncio.timeout(self._handshake_timeout):
                await comm._handshake()
        except (OSError, ProtocolError) as error:  # TimeoutError is an OSError
            logger.info("dropping %s: handshake failed: %r", comm.peer_address, error)
            comm.abort()
            return
        except BaseException:
            comm.abort()
            raise
        finally:
            self._handshaking.discard(comm)
        try:
            await self._on_comm(comm)
        except Exception:
            logger.exception("handler for %r failed; aborting the connection", comm)
            comm.abort()


async def listen(
    host: str,
    port: int,
    on_comm: Callable[[Comm], Awaitable[None]],
    handshake_timeout: float = 10.0,
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    *,
    ssl_context: ssl.SSLContext | None = None,
    require_encryption: bool = False,
    backlog: int | None = None,
) -> Listener:
    """Listen on ``host:port`` (port 0 picks a free one); see ``Listener``.

    Every accepted comm rejects messages larger than ``max_message_bytes``. With an
    ``ssl_context`` this is a ``tls://`` listener: each connection must complete the TLS
    handshake (with a client certificate if the context requires one, as distributed's
    do) within ``handshake_timeout``, then the Dask handshake within as much again; one
    that fails is dropped alone. Without one, ``require_encryption`` refuses to listen.
    ``backlog`` defaults to ``configured_backlog()`` (2048, as distributed listens).
    """
    if ssl_context is None and require_encryption:
        raise SecurityError(
            "encryption required by Dask configuration (distributed.comm.require-encryption), "
            f"refusing to listen on tcp://{host}:{port}"
        )
    listener = Listener(on_comm, handshake_timeout, max_message_bytes, ssl_context)
    loop = asyncio.get_running_loop()
    if backlog is None:
        backlog = configured_backlog()
    # asyncio also accepts up to ``backlog`` connections per wake-up of the listening socket.
    if ssl_context is None:
        server = await loop.create_server(listener._make_comm, host, port, backlog=backlog)
    else:
        server = await loop.create_server(
            listener._make_comm,
            host,
            port,
            backlog=backlog,
            ssl=ssl_context,
            ssl_handshake_timeout=handshake_timeout,
        )
    listener._bind(server)
    return listener
