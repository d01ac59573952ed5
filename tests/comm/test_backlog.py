"""The listener's backlog: as large as distributed's (``distributed.comm.socket-backlog``),
not asyncio's 100, so that many peers connecting at once are not left retrying SYNs.

The backlog the kernel applied is read back from the listening socket with ``TCP_INFO``
(Linux reports ``sk_max_ack_backlog`` in ``tcpi_sacked`` for a socket in LISTEN), and the
burst test waits on a condition (every connection greeted), never on a sleep.
"""

from __future__ import annotations

import asyncio
import socket
import struct
import sys

import dask
import distributed  # noqa: F401  (loads distributed's configuration defaults)
import pytest

from dsched.comm import Comm, listen
from dsched.comm.tcp import DEFAULT_BACKLOG, Listener, configured_backlog

pytestmark = pytest.mark.timeout(30)

linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="TCP_INFO layout")


def _somaxconn() -> int:
    with open("/proc/sys/net/core/somaxconn") as f:
        return int(f.read())


def _listen_backlog(listener: Listener) -> int:
    """The kernel's accept-queue limit of the listener's socket (Linux TCP_INFO)."""
    assert listener._server is not None
    sock = listener._server.sockets[0]
    info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 104)
    # 8 bytes of u8 fields, then u32 rto, ato, snd_mss, rcv_mss, unacked, sacked.
    return int(struct.unpack_from("I", info, 28)[0])


async def _serve_nothing(comm: Comm) -> None:
    await comm.wait_lost()


def test_default_backlog_is_distributeds() -> None:
    assert DEFAULT_BACKLOG == 2048
    assert configured_backlog() == dask.config.get("distributed.comm.socket-backlog")
    with dask.config.set({"distributed.comm.socket-backlog": 777}):
        assert configured_backlog() == 777


@linux_only
def test_listener_uses_the_configured_backlog() -> None:
    async def main() -> None:
        default = await listen("127.0.0.1", 0, _serve_nothing)
        explicit = await listen("127.0.0.1", 0, _serve_nothing, backlog=333)
        with dask.config.set({"distributed.comm.socket-backlog": 555}):
            configured = await listen("127.0.0.1", 0, _serve_nothing)
        try:
            assert _listen_backlog(default) == min(DEFAULT_BACKLOG, _somaxconn())
            assert _listen_backlog(explicit) == 333
            assert _listen_backlog(configured) == 555
        finally:
            for listener in (default, explicit, configured):
                await listener.stop()

    asyncio.run(main())


@linux_only
def test_a_burst_of_connections_above_asyncios_default_backlog_is_served() -> None:
    """300 peers connect at once (asyncio's default backlog is 100); all are greeted."""
    count = 300
    if _somaxconn() < count:
        pytest.skip("net.core.somaxconn caps the backlog below the burst")

    async def main() -> None:
        listener = await listen("127.0.0.1", 0, _serve_nothing)
        host, port = "127.0.0.1", listener.port
        loop = asyncio.get_running_loop()
        socks = [socket.socket() for _ in range(count)]
        try:
            for sock in socks:
                sock.setblocking(False)
            await asyncio.gather(*(loop.sock_connect(sock, (host, port)) for sock in socks))
            greetings = await asyncio.gather(*(loop.sock_recv(sock, 1024) for sock in socks))
            assert all(greetings), "a connection was closed before its handshake"
        finally:
            for sock in socks:
                sock.close()
            await listener.stop()

    asyncio.run(asyncio.wait_for(main(), 20))
