"""Actors' method calls through the scheduler: the ``proxy`` RPC.

Theory of operation
-------------------
An actor (``client.submit(cls, actor=True)``) is a task flagged ``TaskState.actor`` by the
state machine (``dsched.state``: placement on the running worker with the fewest actors,
``"actor": True`` in compute-task, erred when its worker is lost). Its worker keeps the
instance; the client's ``Actor`` handle calls the worker's ``actor_execute`` /
``actor_attribute`` handlers at the address stored in the handle. With
``distributed.client.direct_to_workers`` unset or false (the default) the client cannot
assume it reaches workers, and sends each call to the scheduler instead: ``proxy(msg,
worker, serializers)`` (``distributed.actor.ProxyRPC``), which Dask serves by
``broadcast(msg=msg, workers=[worker])`` and answers with that worker's reply.

Here ``proxy`` is one ``Rpc`` effect to ``worker`` carrying ``msg`` as it came (arguments
and results are opaque ``Serialized`` payloads: the scheduler never unpickles them), and the
request is parked until ``on_rpc_reply`` answers it with the worker's reply, or fails it
with the connection error (Dask's ``on_error="raise"``: the client's ``Actor`` then sees an
``OSError``, waits for the actor's future, which has erred if the worker died). Like Dask,
it forwards to any address given, registered or not. The token is the request id, so a
dropped request (the client left) is simply forgotten and its late reply ignored.
"""

from __future__ import annotations

from collections.abc import Hashable
from typing import Any, ClassVar

from dsched.ext.protocol import Effects, Extension, Fail, Reply, Request, Rpc
from dsched.wire.errors import RemoteProtocolError


class ActorProxy(Extension):
    name = "actors"
    rpc_ops: ClassVar = {"proxy": "proxy"}

    def __init__(self) -> None:
        self._waiting: set[int] = set()  # parked proxy requests

    def proxy(self, request: Request, now: float) -> Effects:
        msg = request.args.get("msg")
        worker = request.args.get("worker")
        if not isinstance(msg, dict) or not isinstance(msg.get("op"), str):
            raise RemoteProtocolError(f"proxy: msg must be a dict with an op, not {msg!r:.100}")
        if not isinstance(worker, str):
            raise RemoteProtocolError(f"proxy: worker must be an address, not {worker!r:.100}")
        self._waiting.add(request.id)
        return [Rpc(worker, dict(msg), ("proxy", request.id))]

    def on_rpc_reply(
        self, token: Hashable, reply: Any, error: BaseException | None, now: float
    ) -> Effects:
        if not isinstance(token, tuple) or token[0] != "proxy":
            return []
        request: int = token[1]
        if request not in self._waiting:
            return []  # the caller left meanwhile
        self._waiting.discard(request)
        if error is not None:
            return [Fail(request, error)]
        return [Reply(request, reply)]

    def on_request_dropped(self, request: int, now: float) -> Effects:
        self._waiting.discard(request)
        return []
