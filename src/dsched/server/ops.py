"""The op registry's vocabulary: what an RPC handler of the shell is.

Theory of operation
-------------------
Every RPC op maps to one ``RpcOp``: ``(comm, request fields) -> awaitable reply``. The
scheduler builds its registry from *op providers* (objects with ``rpc_ops()``: the data
proxy, the forwarding of diagnostics to workers, plugins, ...) and from every op an
extension of the core serves; an op served twice is an error at start-up. A handler that
turns its comm into a stream (registration) returns ``TAKEN_OVER``: nothing more is read
from that comm by the RPC loop.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Protocol

from dsched.comm.tcp import Comm

RpcOp = Callable[[Comm, dict[str, Any]], Awaitable[Any]]
TAKEN_OVER = object()


class OpProvider(Protocol):
    def rpc_ops(self) -> Mapping[str, RpcOp]: ...


def call(handler: Callable[..., Any]) -> RpcOp:
    """An RpcOp from a plain handler of the request's fields (sync or async)."""

    async def op(comm: Comm, args: dict[str, Any]) -> Any:
        result = handler(**args)
        if asyncio.iscoroutine(result):
            result = await result
        return result

    return op
