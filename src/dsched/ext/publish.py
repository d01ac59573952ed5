"""Published datasets: the scheduler side of ``Client.publish_dataset`` and friends.

Theory of operation
-------------------
Dask's ``PublishExtension`` (distributed/publish.py:17-124) as a pure extension. A dataset
is a name bound to ``{"data": Serialized, "keys": (...)}``: the client's collection or
futures, serialized (the scheduler never looks inside), and the keys of the futures in it,
held by the pseudo-client ``"published-{stringify(name)}"`` so that the data outlives the
client that published it.

* ``publish_put(names, keys, data, override, client, uid)`` and ``publish_delete(names,
  client, uid)``: the client sends the stream op ``publish_flush_batched_send(uid)`` just
  before the RPC (client.py:2873-2886, 2960-2970), so that a ``persist`` (or the futures
  of a ``get_dataset``) it sent on its stream lands first. The RPC is parked until the
  stream message with its uid has arrived (either may come first), then carried out. As in
  Dask, it fails with ``TimeoutError()`` if the client is gone by then (Dask re-checks
  every 30 s; here its ``ClientDisconnected`` fails it at once, since a stream message can
  no longer come after it).
* ``publish_put``: per name, in order (``zip(..., strict=True)``): an existing name is
  ``KeyError("Dataset {name} already exists")`` unless ``override``; earlier names of the
  same call stay published, as in Dask.
* ``publish_get(names)`` -> ``[{"data", "keys"} | None]``; ``publish_list()`` -> the names
  sorted by ``str``. ``KeyError("Dataset ... not found")`` is the client's own.

Where this is more careful than Dask: an override wants the new keys before it releases
the old ones, so a key in both is never released in between (Dask releases first: a key
shared by the old and new collection and held by nobody else would be forgotten); flush
uids of a client that left are forgotten (Dask keeps an unused one forever); a parked
request whose peer went away is forgotten.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

from dask.utils import stringify

from dsched.ext.protocol import (
    CancelTimer,
    Effect,
    Effects,
    Extension,
    Fail,
    Reply,
    Request,
    SetTimer,
    Stimulus,
)
from dsched.ext.requests import dask_args, dask_signature, stream_args
from dsched.state import events as ev
from dsched.wire.errors import RemoteProtocolError

Key = Any

# How long Dask waits for the flush before checking that the client is still there.
FLUSH_RECHECK_S = 30.0


# ----------------------------------------------------------------------------- Dask signatures
@dask_signature("PublishExtension.flush_batched_send")
def _flush_args(client: Any, uid: Any) -> dict[str, Any]:
    return locals()


@dask_signature("PublishExtension.put")
def _put_args(  # noqa: PLR0917  (Dask's signature, word for word)
    names: Any, keys: Any, data: Any, override: Any, client: Any, uid: Any
) -> dict[str, Any]:
    return locals()


@dask_signature("PublishExtension.delete")
def _delete_args(names: Any, client: Any, uid: Any) -> dict[str, Any]:
    return locals()


@dask_signature("PublishExtension.list")
def _list_args() -> dict[str, Any]:
    return {}


@dask_signature("PublishExtension.get")
def _get_args(names: Any) -> dict[str, Any]:
    return locals()


def holder(name: Any) -> str:
    """The pseudo-client holding a dataset's keys (publish.py:96)."""
    return f"published-{stringify(name)}"


@dataclass(slots=True)
class _Parked:
    """A put or delete waiting for its flush."""

    request: int
    op: str  # "put" | "delete"
    args: dict[str, Any]


class Publish(Extension):
    name = "publish"
    rpc_ops: ClassVar = {
        "publish_put": "rpc_put",
        "publish_delete": "rpc_delete",
        "publish_get": "rpc_get",
        "publish_list": "rpc_list",
    }
    stream_ops: ClassVar = {"publish_flush_batched_send": "stream_flush"}
    observes = frozenset({ev.ClientDisconnected})

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> Publish:
        """The registry's factory (``dsched.ext.registry``): nothing to configure."""
        return cls()

    def __init__(self) -> None:
        self.datasets: dict[Any, dict[str, Any]] = {}
        self._flushed: dict[Hashable, Any] = {}  # uid -> the client whose flush came first
        self._parked: dict[int, _Parked] = {}
        self._by_uid: dict[Hashable, list[int]] = {}

    # ------------------------------------------------------------------ the flush
    def stream_flush(self, peer: str, msg: dict[str, Any], now: float) -> Effects:
        args = stream_args(_flush_args, peer, msg)
        uid = args["uid"]
        try:
            waiting = self._by_uid.pop(uid, None)
        except TypeError:
            raise RemoteProtocolError(f"uid must be hashable, got {uid!r:.200}") from None
        if waiting is None:
            self._flushed[uid] = args["client"]
            return ()
        effects: list[Effect] = []
        for request in waiting:
            parked = self._parked.pop(request)
            effects.append(CancelTimer(request))
            effects += self._carry_out(parked.request, parked.op, parked.args)
        return effects

    def _after_flush(self, request: Request, op: str, args: dict[str, Any], now: float) -> Effects:
        uid = args["uid"]
        if uid in self._flushed:
            del self._flushed[uid]
            return self._carry_out(request.id, op, args)
        self._parked[request.id] = _Parked(request.id, op, args)
        self._by_uid.setdefault(uid, []).append(request.id)
        return [SetTimer(request.id, now + FLUSH_RECHECK_S)]

    def _carry_out(self, request: int, op: str, args: dict[str, Any]) -> list[Effect]:
        effects: list[Effect] = []
        try:
            if op == "put":
                self._put(args, effects)
            else:
                self._delete(args["names"], effects)
        except Exception as exc:  # raised to the caller by Dask's handler, after what it did
            effects.append(Fail(request, exc))
            return effects
        effects.append(Reply(request, None))
        return effects

    # ------------------------------------------------------------------ put / delete
    def rpc_put(self, request: Request, now: float) -> Effects:
        try:
            args = dask_args(_put_args, request.args)
            hash(args["uid"])
        except Exception as exc:
            return [Fail(request.id, exc)]
        return self._after_flush(request, "put", args, now)

    def _put(self, args: dict[str, Any], effects: list[Effect]) -> None:
        datasets = self.datasets
        for name, keys_i, data_i in zip(args["names"], args["keys"], args["data"], strict=True):
            old = None
            if name in datasets:
                if not args["override"]:
                    raise KeyError(f"Dataset {name} already exists")
                old = datasets.pop(name)
            try:
                keys = list(keys_i)  # Dask's TypeError for keys that are not a list
                for key in keys:
                    hash(key)
            except TypeError:
                if old is not None:  # Dask has released them already
                    effects.append(Stimulus(ev.ClientReleasesKeys(holder(name), old["keys"])))
                raise
            effects.append(Stimulus(ev.ClientDesiresKeys(holder(name), keys)))
            datasets[name] = {"data": data_i, "keys": keys_i}
            if old is not None:
                kept = set(keys)
                gone = [key for key in old["keys"] if key not in kept]
                if gone:
                    effects.append(Stimulus(ev.ClientReleasesKeys(holder(name), gone)))

    def rpc_delete(self, request: Request, now: float) -> Effects:
        try:
            args = dask_args(_delete_args, request.args)
            hash(args["uid"])
        except Exception as exc:
            return [Fail(request.id, exc)]
        return self._after_flush(request, "delete", args, now)

    def _delete(self, names: Any, effects: list[Effect]) -> None:
        for name in names:
            out = self.datasets.pop(name, None)
            if out is not None:
                effects.append(Stimulus(ev.ClientReleasesKeys(holder(name), list(out["keys"]))))

    # ------------------------------------------------------------------ reading
    def rpc_list(self, request: Request, now: float) -> Effects:
        try:
            dask_args(_list_args, request.args)
        except Exception as exc:
            return [Fail(request.id, exc)]
        return [Reply(request.id, sorted(self.datasets, key=str))]

    def rpc_get(self, request: Request, now: float) -> Effects:
        try:
            names = dask_args(_get_args, request.args)["names"]
            return [Reply(request.id, [self.datasets.get(name, None) for name in names])]
        except Exception as exc:
            return [Fail(request.id, exc)]

    # ------------------------------------------------------------------ the client leaving
    def on_event(self, event: ev.Event, now: float) -> Effects:
        if not isinstance(event, ev.ClientDisconnected):
            return ()
        client = event.client
        for uid in [u for u, c in self._flushed.items() if c == client]:
            del self._flushed[uid]
        gone = [p for p in self._parked.values() if p.args["client"] == client]
        return [effect for parked in gone for effect in self._give_up(parked)]

    def on_timer(self, token: Hashable, now: float) -> Effects:
        parked = self._parked.get(token) if isinstance(token, int) else None
        if parked is None:
            return ()
        if parked.args["client"] in self.state.clients:
            return [SetTimer(token, now + FLUSH_RECHECK_S)]  # Dask waits another 30 s
        return self._give_up(parked)

    def _give_up(self, parked: _Parked) -> list[Effect]:
        """The flush can no longer come: Dask's ``wait_for`` raises ``TimeoutError()``."""
        self._forget(parked.request)
        return [CancelTimer(parked.request), Fail(parked.request, TimeoutError())]

    def on_request_dropped(self, request: int, now: float) -> Effects:
        if self._forget(request):
            return [CancelTimer(request)]
        return ()

    def _forget(self, request: int) -> bool:
        parked = self._parked.pop(request, None)
        if parked is None:
            return False
        uid = parked.args["uid"]
        same_uid = self._by_uid[uid]
        same_uid.remove(request)
        if not same_uid:
            del self._by_uid[uid]
        return True
