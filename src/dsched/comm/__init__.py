"""asyncio comms speaking the Dask TCP protocol (tcp:// and tls://): connections, a
listener, a client pool, and TLS settings built from distributed's Security."""

from dsched.comm.pool import ConnectionPool
from dsched.comm.tcp import (
    Comm,
    CommClosedError,
    Listener,
    SecurityError,
    TLSComm,
    connect,
    format_address,
    listen,
    parse_address,
    split_address,
)
from dsched.comm.tls import TLSSettings

__all__ = [
    "Comm",
    "CommClosedError",
    "ConnectionPool",
    "Listener",
    "SecurityError",
    "TLSComm",
    "TLSSettings",
    "connect",
    "format_address",
    "listen",
    "parse_address",
    "split_address",
]
