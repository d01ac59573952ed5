"""tls:// comms: addresses, TLS settings from distributed's Security and the Dask config,
and our connect/listen/pool over TLS against each other and against real distributed comms.

Certificates come from ``Security.temporary()`` (one in-memory self-signed certificate that is
both the CA and every role's certificate). Every test binds only 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import dask
import numpy as np
import pytest
from distributed.comm import connect as distributed_connect
from distributed.core import Server
from distributed.security import Security

from dsched.comm import (
    Comm,
    CommClosedError,
    ConnectionPool,
    SecurityError,
    TLSComm,
    TLSSettings,
    connect,
    format_address,
    listen,
    parse_address,
    split_address,
)
from dsched.wire import Serialized

pytestmark = pytest.mark.timeout(30)


def run(coroutine_function: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(asyncio.wait_for(coroutine_function(), 20))  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def security() -> Security:
    return Security.temporary()


async def echo_forever(comm: Comm) -> None:
    try:
        while True:
            message = await comm.read()
            assert isinstance(message, dict)
            if message.get("op") == "close":
                break
            comm.write(message.get("x"))
    except CommClosedError:
        pass
    finally:
        await comm.close()


# -- addresses ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("address", "expected"),
    [
        ("tls://127.0.0.1:8786", ("tls", "127.0.0.1", 8786)),
        ("tcp://127.0.0.1:8786", ("tcp", "127.0.0.1", 8786)),
        ("127.0.0.1:1", ("tcp", "127.0.0.1", 1)),
        ("tls://[::1]:8786", ("tls", "::1", 8786)),
        ("tls://example.org:0", ("tls", "example.org", 0)),
    ],
)
def test_split_address(address: str, expected: tuple[str, str, int]) -> None:
    assert split_address(address) == expected
    scheme, host, port = expected
    if "://" in address:
        assert format_address(host, port, scheme) == address


@pytest.mark.parametrize(
    "address", ["ucx://h:1", "tls://::1:80", "tls://h", "tls://h:x", "tls://[::1]", "tls://:80"]
)
def test_split_address_rejects(address: str) -> None:
    with pytest.raises(ValueError):
        split_address(address)


def test_parse_address_stays_plain_tcp() -> None:
    assert parse_address("tcp://127.0.0.1:5") == ("127.0.0.1", 5)
    with pytest.raises(ValueError, match="unsupported scheme 'tls'"):
        parse_address("tls://127.0.0.1:5")
    assert format_address("::1", 5) == "tcp://[::1]:5"
    assert format_address("::1", 5, "tls") == "tls://[::1]:5"


# -- TLS settings -------------------------------------------------------------------------------


def write_pem_files(security: Security, directory: Path) -> tuple[str, str, str]:
    ca, cert, key = directory / "ca.pem", directory / "cert.pem", directory / "key.pem"
    ca.write_text(security.tls_ca_file)
    cert.write_text(security.tls_scheduler_cert)
    key.write_text(security.tls_scheduler_key)
    return str(ca), str(cert), str(key)


def test_settings_without_tls_listen_on_tcp_only() -> None:
    settings = TLSSettings.from_options()
    assert settings.listen_context is None
    assert settings.connect_context is None
    assert not settings.require_encryption
    assert settings.listen_protocol() == "tcp"
    assert settings.listen_protocol("tcp://") == "tcp"
    with pytest.raises(ValueError, match="needs a CA file and a certificate"):
        settings.listen_protocol("tls")
    with pytest.raises(ValueError, match="not supported"):
        settings.listen_protocol("ucx")


def test_settings_from_files_are_mutual_tls_and_require_encryption(
    security: Security, tmp_path: Path
) -> None:
    settings = TLSSettings.from_options(*write_pem_files(security, tmp_path))
    assert settings.require_encryption  # as `dask scheduler --tls-*` does
    assert settings.listen_protocol() == "tls"
    with pytest.raises(ValueError, match="refusing to listen on tcp://"):
        settings.listen_protocol("tcp")
    for context in (settings.listen_context, settings.connect_context):
        assert context is not None
        assert context.verify_mode == ssl.CERT_REQUIRED  # client certificates required
        assert not context.check_hostname
        assert context.minimum_version == ssl.TLSVersion.TLSv1_2


def test_settings_honour_the_distributed_config_keys(security: Security, tmp_path: Path) -> None:
    ca, cert, key = write_pem_files(security, tmp_path)
    with dask.config.set(
        {
            "distributed.comm.tls.ca-file": ca,
            "distributed.comm.tls.scheduler.cert": cert,
            "distributed.comm.tls.scheduler.key": key,
            "distributed.comm.tls.min-version": 1.3,
            "distributed.comm.require-encryption": True,
        }
    ):
        settings = TLSSettings.from_security()
    assert settings.require_encryption
    assert settings.listen_context is not None
    assert settings.listen_context.minimum_version == ssl.TLSVersion.TLSv1_3
    with dask.config.set({"distributed.comm.require-encryption": False}):
        relaxed = TLSSettings.from_options(ca, cert, key)
    assert not relaxed.require_encryption
    assert relaxed.listen_protocol() == "tcp"
    assert relaxed.listen_protocol("tls") == "tls"


def test_unreadable_tls_files_are_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="invalid TLS configuration"):
        TLSSettings.from_options(str(tmp_path / "nope.pem"), str(tmp_path / "nope.pem"))


# -- comms over TLS -----------------------------------------------------------------------------


def test_round_trip_over_tls_between_our_connect_and_listener(security: Security) -> None:
    settings = TLSSettings.from_security(security)

    async def main() -> None:
        listener = await listen("127.0.0.1", 0, echo_forever, ssl_context=settings.listen_context)
        assert listener.address == f"tls://127.0.0.1:{listener.port}"
        comm = await connect(listener.address, ssl_context=settings.connect_context)
        assert isinstance(comm, TLSComm)
        assert comm.peer_address == listener.address
        assert comm.local_address.startswith("tls://127.0.0.1:")
        assert comm.peer_certificate is not None
        # A big payload, and a memoryview whose items are not bytes.
        array = np.arange(1_000_000, dtype="i8")
        payload = Serialized({"serializer": "pickle"}, [b"\x07" * 5_000_000, memoryview(array)])
        comm.write({"op": "echo", "x": payload})
        reply = await comm.read()
        assert isinstance(reply, Serialized)
        assert bytes(reply.frames[0]) == b"\x07" * 5_000_000
        assert bytes(reply.frames[1]) == array.tobytes()
        for index in range(100):
            comm.write({"op": "echo", "x": index})
        assert [await comm.read() for _ in range(100)] == list(range(100))
        await comm.close()
        await listener.stop()

    run(main)


def test_distributed_comm_talks_to_our_tls_listener(security: Security) -> None:
    settings = TLSSettings.from_security(security)

    async def main() -> None:
        listener = await listen("127.0.0.1", 0, echo_forever, ssl_context=settings.listen_context)
        comm = await distributed_connect(listener.address, **security.get_connection_args("client"))
        await comm.write({"op": "echo", "x": [1, 2, 3]})
        assert await comm.read() == (1, 2, 3)
        await comm.close()
        await listener.stop()

    run(main)


def test_our_pool_reaches_a_distributed_tls_server(security: Security) -> None:
    settings = TLSSettings.from_security(security)

    async def main() -> None:
        async def echo(x: Any = None) -> Any:
            return x

        server = Server({"echo": echo}, deserialize=False)
        await server.listen("tls://127.0.0.1:0", **security.get_listen_args("worker"))
        try:
            assert server.address.startswith("tls://")
            pool = ConnectionPool(ssl_context=settings.connect_context, require_encryption=True)
            assert await pool.rpc(server.address, {"op": "echo", "x": [1, 2]}) == (1, 2)
            assert await pool.rpc(server.address, {"op": "echo", "x": 3}) == 3
            assert pool.idle_count(server.address) == 1
            await pool.close()
        finally:
            await server.close()

    run(main)


def test_peers_without_a_valid_certificate_are_refused_alone(security: Security) -> None:
    settings = TLSSettings.from_security(security)
    stranger = TLSSettings.from_security(Security.temporary())  # another CA
    no_certificate = ssl.create_default_context(cadata=security.tls_ca_file)
    no_certificate.check_hostname = False

    async def main() -> None:
        listener = await listen(
            "127.0.0.1",
            0,
            echo_forever,
            handshake_timeout=5,
            ssl_context=settings.listen_context,
        )
        good = await connect(listener.address, ssl_context=settings.connect_context)
        for context in (no_certificate, stranger.connect_context):
            # TLS 1.3: the client may finish its side of the handshake before the server
            # rejects its certificate; either way no Dask handshake completes.
            with pytest.raises((OSError, CommClosedError)):
                await connect(listener.address, timeout=5, ssl_context=context)
        # Plain TCP to the TLS port: the TLS handshake fails on the server side.
        with pytest.raises((OSError, CommClosedError)):
            await connect(f"tcp://127.0.0.1:{listener.port}", timeout=5)
        # The established comm and the listener are untouched.
        good.write({"op": "echo", "x": "still here"})
        assert await good.read() == "still here"
        again = await connect(listener.address, ssl_context=settings.connect_context)
        again.write({"op": "echo", "x": 1})
        assert await again.read() == 1
        await good.close()
        await again.close()
        await listener.stop()

    run(main)


def test_require_encryption_refuses_plain_tcp(security: Security) -> None:
    settings = TLSSettings.from_security(security)

    async def main() -> None:
        with pytest.raises(SecurityError, match="refusing to listen"):
            await listen("127.0.0.1", 0, echo_forever, require_encryption=True)
        plain = await listen("127.0.0.1", 0, echo_forever)
        with pytest.raises(SecurityError, match="require-encryption"):
            await connect(plain.address, require_encryption=True)
        pool = ConnectionPool(ssl_context=settings.connect_context, require_encryption=True)
        with pytest.raises(OSError, match="require-encryption"):
            await pool.rpc(plain.address, {"op": "echo", "x": 1})
        with pytest.raises(SecurityError, match="no TLS configuration"):
            await connect(f"tls://127.0.0.1:{plain.port}")
        await pool.close()
        await plain.stop()

    run(main)


# -- `dsched scheduler` listen addresses ---------------------------------------------------------


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        ([], (None, "", 8786)),
        (["--host", "127.0.0.1", "--port", "0"], (None, "127.0.0.1", 0)),
        (["--host", "tls://127.0.0.1"], ("tls", "127.0.0.1", 8786)),
        (["--host", "tls://127.0.0.1:9000"], ("tls", "127.0.0.1", 9000)),
        (["--host", "tls://"], ("tls", "", 8786)),
        (["--host", "tcp://[::1]:5", "--port", "5"], ("tcp", "::1", 5)),
        (["--host", "[::1]"], (None, "::1", 8786)),
        (["--host", "::"], (None, "::", 8786)),
        (["--protocol", "tls://", "--host", "10.0.0.1"], ("tls://", "10.0.0.1", 8786)),
        (["--protocol", "tls", "--host", "tls://10.0.0.1"], ("tls", "10.0.0.1", 8786)),
    ],
)
def test_scheduler_listen_address_flags(
    flags: list[str], expected: tuple[str | None, str, int]
) -> None:
    from dsched.cli import _listen_address, _parser

    args = _parser().parse_args(["scheduler", *flags])
    assert _listen_address(args) == expected


@pytest.mark.parametrize(
    "flags",
    [
        ["--host", "tls://127.0.0.1", "--protocol", "tcp"],
        ["--host", "127.0.0.1:1", "--port", "2"],
        ["--host", "tls://127.0.0.1:x"],
    ],
)
def test_scheduler_listen_address_conflicts(flags: list[str]) -> None:
    from dsched.cli import _listen_address, _parser

    args = _parser().parse_args(["scheduler", *flags])
    with pytest.raises(SystemExit):
        _listen_address(args)
