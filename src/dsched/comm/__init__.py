"""asyncio comms speaking the Dask TCP protocol: connections, a listener, a client pool."""

from dsched.comm.pool import ConnectionPool
from dsched.comm.tcp import (
    Comm,
    CommClosedError,
    Listener,
    connect,
    format_address,
    listen,
    parse_address,
)

__all__ = [
    "Comm",
    "CommClosedError",
    "ConnectionPool",
    "Listener",
    "connect",
    "format_address",
    "listen",
    "parse_address",
]
