"""Outgoing connection pool for the scheduler's RPCs to workers and nannies.

Theory of operation
-------------------
Dask RPCs have no request ids: a reply is matched to its request purely by order on the
comm (protocol.md §1.7). So a comm carries one conversation at a time; concurrency to one
peer comes from several comms, at most ``limit_per_address`` of them (extra callers wait
for a free one). A comm whose conversation completed normally goes back to that
address's idle list and is reused by the next caller; a comm whose conversation raised
(peer closed, timeout, cancellation, bad data) may be out of step with its peer and is
aborted, never reused. Idle comms the peer closed meanwhile are skipped at reuse time.

``rpc()`` is the one-request-one-reply case. ``connection()`` lends a comm for longer
exchanges, such as worker ``get_data``, where the caller must write ``"OK"`` after
reading the reply before the comm is back in a reusable state.

``tls://`` addresses are reached with the pool's ``ssl_context`` (for the scheduler: a
client context carrying the scheduler role certificate, as distributed's scheduler uses);
with ``require_encryption``, ``tcp://`` addresses are refused (``SecurityError``).

``close()`` politely tells each idle peer ``{"op": "close", "reply": False}`` (what
distributed's pools do) and aborts comms still lent out.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from dsched.comm.tcp import Comm, CommClosedError, connect

__all__ = ["ConnectionPool"]


@dataclass(slots=True)
class _AddressState:
    """Comms of one peer address: idle ones and a limit on how many may be lent out."""

    slots: asyncio.Semaphore
    idle: list[Comm] = field(default_factory=list)
    lent: set[Comm] = field(default_factory=set)
    users: int = 0  # callers holding or waiting for a comm; the state is dropped at 0


class ConnectionPool:
    """Reusable outgoing comms, one outstanding request per comm (see the module docstring)."""

    def __init__(
        self,
        limit_per_address: int = 16,
        connect_timeout: float = 30.0,
        *,
        ssl_context: ssl.SSLContext | None = None,
        require_encryption: bool = False,
    ) -> None:
        if limit_per_address < 1:
            raise ValueError("limit_per_address must be at least 1")
        self._limit_per_address = limit_per_address
        self._connect_timeout = connect_timeout
        self._ssl_context = ssl_context
        self._require_encryption = require_encryption
        self._addresses: dict[str, _AddressState] = {}
        self._lent: set[Comm] = set()
        self._closed = False

    @property
    def closed(self) -> bool:
        return self._closed

    def idle_count(self, address: str) -> int:
        """Idle comms kept for ``address`` (for tests and diagnostics)."""
        state = self._addresses.get(address)
        return len(state.idle) if state is not None else 0

    async def rpc(self, address: str, msg: dict[str, object]) -> object:
        """Send one request and return the reply (``None`` without reading if reply=False).

        Error replies (``{"status": "uncaught-error", ...}``) are returned as they are; the
        caller decides what they mean.
        """
        async with self.connection(address) as comm:
            comm.write(msg)
            if msg.get("reply", True) is False:
                await comm.drain()
                return None
            return await comm.read()

    @contextlib.asynccontextmanager
    async def connection(self, address: str) -> AsyncIterator[Comm]:
        """Lend a comm for a multi-step exchange; it is reused only if the block succeeds."""
        if self._closed:
            raise CommClosedError("the connection pool is closed")
        state = self._addresses.get(address)
        if state is None:
            state = _AddressState(asyncio.Semaphore(self._limit_per_address))
            self._addresses[address] = state
        state.users += 1
        try:
            async with state.slots:
                if self._closed:
                    raise CommClosedError("the connection pool was closed while waiting")
                comm = self._take_idle(state)
                if comm is None:
                    comm = await connect(
                        address,
                        timeout=self._connect_timeout,
                        ssl_context=self._ssl_context,
                        require_encryption=self._require_encryption,
                    )
                    comm.name = f"pool->{address}"
                self._lent.add(comm)
                state.lent.add(comm)
                completed = False
                try:
                    yield comm
                    completed = True
                finally:
                    self._lent.discard(comm)
                    state.lent.discard(comm)
                    if completed and not comm.closed and not self._closed:
                        state.idle.append(comm)
                    else:
                        # Out of step with the peer (or shutting down): never reuse it.
                        comm.abort()
        finally:
            state.users -= 1
            if state.users == 0 and not state.idle:
                self._addresses.pop(address, None)

    def discard(self, address: str) -> None:
        """Abort every comm to ``address``, idle or lent (e.g. the worker there has gone, or
        stopped answering): a conversation in progress fails with CommClosedError at once
        instead of waiting on a peer that will never reply."""
        state = self._addresses.get(address)
        if state is None:
            return
        for comm in [*state.idle, *state.lent]:
            comm.abort()
        state.idle.clear()
        if state.users == 0:
            del self._addresses[address]

    async def close(self) -> None:
        """Say goodbye on idle comms and close them; abort comms currently lent out."""
        self._closed = True
        idle = [comm for state in self._addresses.values() for comm in state.idle]
        self._addresses.clear()
        for comm in list(self._lent):
            comm.abort()
        for comm in idle:
            with contextlib.suppress(CommClosedError):
                comm.write({"op": "close", "reply": False})
        await asyncio.gather(*(comm.close() for comm in idle))

    @staticmethod
    def _take_idle(state: _AddressState) -> Comm | None:
        while state.idle:
            comm = state.idle.pop()  # most recently used first: the likeliest to be alive
            if not comm.closed:
                return comm
        return None
