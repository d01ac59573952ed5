"""``subscribe_worker_status``: the feed of workers joining and leaving that cluster
managers (``distributed.deploy.Cluster``) read.

Theory of operation
-------------------
Dask's handler takes over the requesting comm: it answers with the scheduler's identity
(the workers' entries without ``metrics`` and ``last_seen``) and then, through a
``WorkerStatusPlugin``, writes on that comm, batched like any stream, ``["add",
{"workers": {address: identity}}]`` for every worker added and ``["remove", address]`` for
every worker removed.

The comm belongs to the shell: it answers the request with its identity, registers the
comm as a peer of its own (a subscriber id, written to like a client's stream) and tells
this extension with the ``subscribe-worker-status`` stream op from that subscriber id;
when the comm closes it reports ``ClientDisconnected(subscriber id)``. This extension
keeps the subscribers and turns ``WorkerConnected`` / ``WorkerDisconnected`` into
``ToClient`` messages for them, in the order the workers came and went.
"""

from __future__ import annotations

from typing import Any, ClassVar, cast

from dsched.ext.lifecycle import worker_identity
from dsched.ext.protocol import NO_EFFECTS, Effects, Extension, ToClient
from dsched.state import events as ev


class WorkerStatusFeed(Extension):
    name = "worker-status"
    stream_ops: ClassVar = {"subscribe-worker-status": "subscribe"}
    observes = frozenset({ev.WorkerConnected, ev.WorkerDisconnected, ev.ClientDisconnected})

    def __init__(self) -> None:
        self.subscribers: set[str] = set()
        self._known: set[str] = set()  # the workers the feed said were added

    def subscribe(self, peer: str, msg: dict[str, Any], now: float) -> Effects:
        self.subscribers.add(peer)
        return NO_EFFECTS

    def on_event(self, event: ev.Event, now: float) -> Effects:
        if isinstance(event, ev.ClientDisconnected):
            self.subscribers.discard(event.client)
            return NO_EFFECTS
        message: list[Any]
        address = getattr(event, "address", None)
        if isinstance(event, ev.WorkerConnected):
            ws = self.state.workers.get(event.address)
            if ws is None or event.address in self._known:
                return NO_EFFECTS  # registered twice: the first one stays
            self._known.add(event.address)
            message = ["add", {"workers": {ws.address: worker_identity(ws)}}]
        elif isinstance(event, ev.WorkerDisconnected):
            if address not in self._known or address in self.state.workers:
                return NO_EFFECTS  # unknown, or already removed
            self._known.discard(event.address)
            message = ["remove", event.address]
        else:
            return NO_EFFECTS
        if not self.subscribers:
            return NO_EFFECTS
        # Dask's plugin sends lists, not op dicts, on this comm.
        msg = cast(dict[str, Any], message)
        return [ToClient(peer, msg) for peer in sorted(self.subscribers)]
