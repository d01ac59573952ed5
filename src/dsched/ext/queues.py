"""Queues: the scheduler side of ``distributed.Queue``.

Theory of operation
-------------------
Dask's ``QueueExtension`` (distributed/queues.py:17-132) as a pure extension. Each named
queue is an ``asyncio.Queue`` of records, ``{"type": "msgpack", "value": data}`` or
``{"type": "Future", "value": key}``, modelled here without a loop: items, parked getters
and parked putters, each a FIFO, settled after every change. A future's key is held by the
pseudo-client ``"queue-{name}"`` from the put until the getter confirms it holds the key.

* ``queue_create(name, maxsize=0)``: creates the queue, or counts one more user of it (every
  ``Queue(name)``, unpickled ones in tasks too); ``queue_release(name)`` (stream) counts one
  less, and the last one deletes it and lets go of the keys still in it.
* ``queue_put(name, key | data, timeout)``: ``timeout`` covers both waits, for a key the
  scheduler does not know yet (``TimeoutError("Task {key} unknown to scheduler.")``, as
  ``Variable.set``) and for room in a full queue (``TimeoutError()``). An unknown name is
  ``KeyError(name)``; a ``maxsize`` that is not a number is ``asyncio.Queue.full``'s
  ``TypeError``, raised by puts only (as in asyncio).
* ``queue_get(name, timeout, batch=False)``: one record, waiting up to ``timeout``;
  ``batch=True``: every record there is now, never waiting; ``batch=n``: ``n`` records,
  waiting as long as it takes (a timeout with an integer batch is Dask's
  ``NotImplementedError``). A batch getter that still needs more goes to the back of the
  getters' line after each record, as its ``await q.get()`` loop does in asyncio. Futures'
  records get their task's ``state`` (and ``exception``/``traceback`` if erred) when the
  answer is made (queues.py:92-105).
* ``queue-future-release(name, key)`` (stream, from the getter): the getter's client wants
  the key, and ``"queue-{name}"`` lets go of it once as many releases as puts arrived.
* Timeouts follow ``asyncio.timeout``: what can complete at once does, even with a timeout
  of 0; what must wait fails at the deadline (at once if it is past).

Where this is more careful than Dask (same replies and errors otherwise): a put that fails
(unknown queue, bad ``maxsize``, timed out, or dropped) never holds its key (Dask keeps it
wanted forever); deleting a queue forgets the reference counts of the keys it held, so a new
queue of the same name starts from zero; a release for a key the queue never held is
ignored (Dask's count would go negative); a parked request whose peer went away is
forgotten, and the records a dropped batch getter had collected go back to the front of the
queue (Dask's handler would take them for nobody).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Hashable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

from dsched.ext.protocol import (
    CancelTimer,
    Effect,
    Effects,
    Extension,
    Fail,
    Reply,
    Request,
    Stimulus,
)
from dsched.ext.requests import (
    dask_args,
    dask_signature,
    deadline,
    deadline_timer,
    expires,
    stream_args,
)
from dsched.ext.variables import KeyWaits, checked_key, future_record
from dsched.state import events as ev
from dsched.wire.errors import RemoteProtocolError

Key = Any
Record = dict[str, Any]

BATCH_WITH_TIMEOUT = (
    "Dask queues don't support simultaneous use of integer batch sizes and timeouts"
)


# ----------------------------------------------------------------------------- Dask signatures
@dask_signature("QueueExtension.create")
def _create_args(name: Any = None, client: Any = None, maxsize: Any = 0) -> dict[str, Any]:
    return locals()


@dask_signature("QueueExtension.release")
def _release_args(name: Any = None, client: Any = None) -> dict[str, Any]:
    return locals()


@dask_signature("QueueExtension.put")
def _put_args(
    name: Any = None, key: Any = None, data: Any = None, client: Any = None, timeout: Any = None
) -> dict[str, Any]:
    return locals()


@dask_signature("QueueExtension.future_release")
def _future_release_args(name: Any = None, key: Any = None, client: Any = None) -> dict[str, Any]:
    return locals()


@dask_signature("QueueExtension.get")
def _get_args(
    name: Any = None, client: Any = None, timeout: Any = None, batch: Any = False
) -> dict[str, Any]:
    return locals()


@dask_signature("QueueExtension.qsize")
def _qsize_args(name: Any = None, client: Any = None) -> dict[str, Any]:
    return locals()


def holder(name: Any) -> str:
    """The pseudo-client holding the futures of a queue (queues.py:79)."""
    return f"queue-{name}"


@dataclass(slots=True)
class _Get:
    request: int
    want: int | None  # None: one record; n: a batch of n
    got: list[Record] = field(default_factory=list)
    timed: bool = False


@dataclass(slots=True)
class _Put:
    request: int
    record: Record
    timed: bool = False


class _Queue:
    """One ``asyncio.Queue``: records, and the getters and putters waiting on it."""

    __slots__ = ("getters", "items", "maxsize", "name", "putters")

    def __init__(self, name: Any, maxsize: Any) -> None:
        self.name = name
        self.maxsize = maxsize
        self.items: deque[Record] = deque()
        self.getters: deque[_Get] = deque()
        self.putters: deque[_Put] = deque()

    def full(self) -> bool:
        """``asyncio.Queue.full``, with its ``TypeError`` for a maxsize that is no number."""
        if self.maxsize <= 0:
            return False
        return bool(len(self.items) >= self.maxsize)


@dataclass(slots=True)
class _WaitingKey:
    """A put waiting for its key to be known."""

    name: Any
    key: Key
    at: float | None


class Queues(Extension):
    name = "queues"
    rpc_ops: ClassVar = {
        "queue_create": "rpc_create",
        "queue_put": "rpc_put",
        "queue_get": "rpc_get",
        "queue_qsize": "rpc_qsize",
    }
    stream_ops: ClassVar = {
        "queue-future-release": "stream_future_release",
        "queue_release": "stream_release",
    }
    observes = KeyWaits.OBSERVES

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> Queues:
        """The registry's factory (``dsched.ext.registry``): nothing to configure."""
        return cls()

    def __init__(self) -> None:
        self.queues: dict[Any, _Queue] = {}
        self.client_refcount: dict[Any, int] = {}
        # (name, key) -> records of that key put and not yet released by their getter.
        self.future_refcount: dict[tuple[Any, Key], int] = {}
        self._parked: dict[int, tuple[_Queue, _Get | _Put]] = {}
        self._key_puts: dict[int, _WaitingKey] = {}
        self._key_waits = KeyWaits()

    # ------------------------------------------------------------------ create / release
    def rpc_create(self, request: Request, now: float) -> Effects:
        try:
            args = dask_args(_create_args, request.args)
            name = args["name"]
            if name not in self.queues:
                self.queues[name] = _Queue(name, args["maxsize"])
                self.client_refcount[name] = 1
            else:
                self.client_refcount[name] += 1
        except Exception as exc:  # what Dask's handler would raise to the caller
            return [Fail(request.id, exc)]
        return [Reply(request.id, None)]

    def stream_release(self, peer: str, msg: dict[str, Any], now: float) -> Effects:
        name = checked_key(stream_args(_release_args, peer, msg)["name"], "name")
        if name not in self.queues:
            return ()
        self.client_refcount[name] -= 1
        if self.client_refcount[name]:
            return ()
        del self.client_refcount[name]
        queue = self.queues.pop(name)
        # Parked getters and putters stay on the deleted queue until their deadline, as
        # they do on Dask's orphaned asyncio.Queue.
        keys = [record["value"] for record in queue.items if record["type"] == "Future"]
        for key in keys:
            count = self.future_refcount.get((name, key), 0) - 1
            if count > 0:
                self.future_refcount[name, key] = count
            else:
                self.future_refcount.pop((name, key), None)
        if not keys:
            return ()
        return [Stimulus(ev.ClientReleasesKeys(holder(name), list(dict.fromkeys(keys))))]

    # ------------------------------------------------------------------ put
    def rpc_put(self, request: Request, now: float) -> Effects:
        try:
            args = dask_args(_put_args, request.args)
            name, key = args["name"], args["key"]
            at = deadline(now, args["timeout"])  # Deadline.after's TypeError if not a number
            hash(name)
            known = key is None or key in self.state.tasks
        except Exception as exc:
            return [Fail(request.id, exc)]
        if known:
            return self._put(request.id, name, key, args["data"], at=at, now=now)
        self._key_puts[request.id] = _WaitingKey(name, key, at)
        self._key_waits.add(key, request.id)
        return deadline_timer(("key", request.id), at if at is None else max(at, now))

    def _put(
        self, request: int, name: Any, key: Key, data: Any, *, at: float | None, now: float
    ) -> list[Effect]:
        queue = self.queues.get(name)
        if queue is None:
            return [Fail(request, KeyError(name))]
        try:
            full = queue.full()
        except TypeError as exc:
            return [Fail(request, exc)]
        if full and at is not None and at <= now:
            return [Fail(request, TimeoutError())]
        effects: list[Effect] = []
        if key is not None:
            record: Record = {"type": "Future", "value": key}
            self.future_refcount[name, key] = self.future_refcount.get((name, key), 0) + 1
            effects.append(Stimulus(ev.ClientDesiresKeys(holder(name), [key])))
        else:
            record = {"type": "msgpack", "value": data}
        if full:
            put = _Put(request, record)
            put.timed = expires(at)
            queue.putters.append(put)
            self._parked[request] = (queue, put)
            return effects + deadline_timer(("put", request), at)
        queue.items.append(record)
        effects.append(Reply(request, None))
        return effects + self._settle(queue)

    def _unref(self, name: Any, key: Key) -> list[Effect]:
        """One record of ``key`` less in queue ``name``: the last lets go of the key."""
        count = self.future_refcount.get((name, key))
        if count is None:
            return []
        if count > 1:
            self.future_refcount[name, key] = count - 1
            return []
        del self.future_refcount[name, key]
        return [Stimulus(ev.ClientReleasesKeys(holder(name), [key]))]

    def stream_future_release(self, peer: str, msg: dict[str, Any], now: float) -> Effects:
        args = stream_args(_future_release_args, peer, msg)
        name, key, client = args["name"], checked_key(args["key"]), args["client"]
        checked_key(name, "name")
        if not isinstance(client, str):
            raise RemoteProtocolError(f"client must be a string, got {client!r:.200}")
        return [Stimulus(ev.ClientDesiresKeys(client, [key])), *self._unref(name, key)]

    # ------------------------------------------------------------------ get
    def rpc_get(self, request: Request, now: float) -> Effects:
        try:
            args = dask_args(_get_args, request.args)
            name, timeout, batch = args["name"], args["timeout"], args["batch"]
            queue = self.queues[name]
            if batch is True:
                got = list(queue.items)
                queue.items.clear()
                return [Reply(request.id, self._process(got)), *self._settle(queue)]
            if batch:
                if timeout is not None:
                    raise NotImplementedError(BATCH_WITH_TIMEOUT)
                want = len(range(batch))  # range's TypeError for a batch that is no int
                at = None
            else:
                want = None
                at = deadline(now, timeout)  # asyncio.timeout's TypeError if not a number
        except Exception as exc:
            return [Fail(request.id, exc)]
        get = _Get(request.id, want)
        need = 1 if want is None else want
        while queue.items and len(get.got) < need:  # what is there now is taken at once
            get.got.append(queue.items.popleft())
        if len(get.got) >= need:
            return [self._answer(get), *self._settle(queue)]
        if at is not None and at <= now:
            return [Fail(request.id, TimeoutError())]
        get.timed = expires(at)
        queue.getters.append(get)
        self._parked[request.id] = (queue, get)
        return deadline_timer(("get", request.id), at)

    def _process(self, records: list[Record]) -> list[Record]:
        return [self._processed(record) for record in records]

    def _processed(self, record: Record) -> Record:
        if record["type"] == "Future":
            return future_record(self.state, record["value"])
        return record

    def _answer(self, get: _Get) -> Reply:
        if get.want is None:
            return Reply(get.request, self._processed(get.got[0]))
        return Reply(get.request, self._process(get.got))

    def _settle(self, queue: _Queue) -> list[Effect]:
        """Hand records to waiting getters and let waiting putters in, until neither can."""
        effects: list[Effect] = []
        moved = True
        while moved:
            moved = False
            while queue.getters and queue.items:
                get = queue.getters.popleft()
                get.got.append(queue.items.popleft())
                moved = True
                if get.want is not None and len(get.got) < get.want:
                    queue.getters.append(get)  # its next `await q.get()` queues up again
                    continue
                del self._parked[get.request]
                if get.timed:
                    effects.append(CancelTimer(("get", get.request)))
                effects.append(self._answer(get))
            while queue.putters and not queue.full():
                put = queue.putters.popleft()
                queue.items.append(put.record)
                moved = True
                del self._parked[put.request]
                if put.timed:
                    effects.append(CancelTimer(("put", put.request)))
                effects.append(Reply(put.request, None))
        return effects

    def rpc_qsize(self, request: Request, now: float) -> Effects:
        try:
            name = dask_args(_qsize_args, request.args)["name"]
            return [Reply(request.id, len(self.queues[name].items))]
        except Exception as exc:
            return [Fail(request.id, exc)]

    # ------------------------------------------------------------------ observations
    def on_event(self, event: ev.Event, now: float) -> Effects:
        if not self._key_waits:
            return ()
        effects: list[Effect] = []
        for request in self._key_waits.arrived(self.state.tasks):
            waiting = self._key_puts.pop(request)
            effects.append(CancelTimer(("key", request)))
            effects += self._put(request, waiting.name, waiting.key, None, at=waiting.at, now=now)
        return effects

    def on_timer(self, token: Hashable, now: float) -> Effects:
        if not isinstance(token, tuple):
            return ()
        kind, request = token
        if kind == "key":
            waiting = self._key_puts.pop(request, None)
            if waiting is None:
                return ()
            self._key_waits.discard(waiting.key, request)
            return [Fail(request, TimeoutError(f"Task {waiting.key} unknown to scheduler."))]
        entry = self._parked.pop(request, None)
        if entry is None:
            return ()
        queue, parked = entry
        if isinstance(parked, _Get):
            queue.getters.remove(parked)
            return [Fail(request, TimeoutError())]
        queue.putters.remove(parked)
        return [*self._unput(queue, parked), Fail(request, TimeoutError())]

    def _unput(self, queue: _Queue, put: _Put) -> list[Effect]:
        if put.record["type"] == "Future":
            return self._unref(queue.name, put.record["value"])
        return []

    def on_request_dropped(self, request: int, now: float) -> Effects:
        waiting = self._key_puts.pop(request, None)
        if waiting is not None:
            self._key_waits.discard(waiting.key, request)
            return [CancelTimer(("key", request))]
        entry = self._parked.pop(request, None)
        if entry is None:
            return ()
        queue, parked = entry
        if isinstance(parked, _Put):
            queue.putters.remove(parked)
            cancel = [CancelTimer(("put", request))] if parked.timed else []
            return [*cancel, *self._unput(queue, parked)]
        queue.getters.remove(parked)
        queue.items.extendleft(reversed(parked.got))
        cancel = [CancelTimer(("get", request))] if parked.timed else []
        return [*cancel, *self._settle(queue)]
