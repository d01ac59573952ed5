"""Distributed events (``distributed.Event``): ``event_wait``, ``event_set``, ``event_clear``,
``event_is_set``.

Theory of operation
-------------------
Dask's ``EventExtension`` (distributed/event.py:17-149) keeps an ``asyncio.Event`` per name
and a count of the coroutines waiting on it. Here an event is its flag, and its waiters are
parked requests in arrival order:

* ``event_wait(name, timeout)`` answers True at once if the flag is set; otherwise it parks
  until ``event_set`` (answered True) or until ``now + timeout`` (a ``SetTimer``; answered
  False). Every waiter is answered True by the set that wakes it, even if the event is
  cleared right after: asyncio.Event resolves its waiters' futures inside ``set()``
  (event.py:62-89). A timeout <= 0 answers False at once unless the flag is set, as
  ``asyncio.timeout(0)`` does.
* ``event_set(name)`` sets the flag (creating the event), ``event_is_set(name)`` reads it (an
  unknown event is not set, and is not created: event.py:123-133).
* Cleanup (event.py:24-42, 80-87, 102-121): an event that is not set and has no waiters is
  forgotten, so that names do not pile up: the last waiter to leave an unset event removes
  it, and ``event_clear`` removes an event nobody waits on (it only lowers the flag while
  there are waiters). Hence: an event is known <=> it is set or has waiters.
* A waiter whose peer went away (``on_request_dropped``) is forgotten like one that timed out.
  (Dask cannot notice that: its coroutine stays counted until the event is set or the
  timeout passes. Nothing a client can observe depends on it.)

Requests are bound to stubs of Dask's handler signatures (``dsched.ext.requests``); the
handlers then perform the same operations as Dask's code in the same order (``hash(name)``
where Dask indexes a dict, ``float(now) + timeout`` where asyncio computes a deadline), which
raises the same exceptions with the same messages for ill-typed fields.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from typing import Any, ClassVar

from dsched.ext.protocol import (
    CancelTimer,
    Effect,
    Effects,
    Extension,
    Reply,
    Request,
)
from dsched.ext.requests import (
    PARKED,
    dask_args,
    dask_signature,
    deadline,
    deadline_timer,
    expired,
    serve,
)


# ----------------------------------------------------------------------------- Dask's handlers
@dask_signature("EventExtension.event_wait")
def _event_wait(name: Any = None, timeout: Any = None) -> tuple[Any, Any]:
    return name, timeout


@dask_signature("EventExtension.event_set")
def _event_set(name: Any = None) -> Any:
    return name


@dask_signature("EventExtension.event_clear")
def _event_clear(name: Any = None) -> Any:
    return name


@dask_signature("EventExtension.event_is_set")
def _event_is_set(name: Any = None) -> Any:
    return name


def _normalize_name(name: Any) -> Any:
    """event.py:135-140 (lists arrive as tuples over msgpack anyway)."""
    return tuple(name) if isinstance(name, list) else name


class Events(Extension):
    name = "events"
    rpc_ops: ClassVar = {
        "event_wait": "rpc_wait",
        "event_set": "rpc_set",
        "event_clear": "rpc_clear",
        "event_is_set": "rpc_is_set",
    }

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> Events:
        """The registry's factory (``dsched.ext.registry``): nothing to configure."""
        return cls()

    def __init__(self) -> None:
        # name -> flag, for every known event (Dask's ``_events``).
        self.flags: dict[Hashable, bool] = {}
        # name -> {request id: whether it has a timer}, in arrival order (Dask's
        # ``_waiter_count`` is the length).
        self.waiters: dict[Hashable, dict[int, bool]] = {}
        self._parked: dict[int, Hashable] = {}  # request id -> event name

    # ------------------------------------------------------------------ requests
    def rpc_wait(self, request: Request, now: float) -> Effects:
        return serve(request, now, self._wait)

    def _wait(self, request: Request, now: float, effects: list[Effect]) -> Any:
        name, timeout = dask_args(_event_wait, request.args, unpickle=True)
        name = _normalize_name(name)
        hash(name)  # ``self._events[name]`` comes first (event.py:70)
        at = deadline(now, timeout)
        if self.flags.get(name):
            return True
        if expired(at, now):
            return False
        self.flags.setdefault(name, False)
        timers = deadline_timer(("wait", request.id), at)
        self.waiters.setdefault(name, {})[request.id] = bool(timers)
        self._parked[request.id] = name
        effects.extend(timers)
        return PARKED

    def rpc_set(self, request: Request, now: float) -> Effects:
        return serve(request, now, self._set)

    def _set(self, request: Request, now: float, effects: list[Effect]) -> Any:
        name = _normalize_name(dask_args(_event_set, request.args, unpickle=True))
        self.flags[name] = True
        for waiter, timed in self.waiters.pop(name, {}).items():
            del self._parked[waiter]
            effects.append(Reply(waiter, True))
            if timed:
                effects.append(CancelTimer(("wait", waiter)))
        return None

    def rpc_clear(self, request: Request, now: float) -> Effects:
        return serve(request, now, self._clear)

    def _clear(self, request: Request, now: float, effects: list[Effect]) -> Any:
        name = _normalize_name(dask_args(_event_clear, request.args, unpickle=True))
        if not self.waiters.get(name):
            self.flags.pop(name, None)
            self.waiters.pop(name, None)
        else:
            self.flags[name] = False
        return None

    def rpc_is_set(self, request: Request, now: float) -> Effects:
        return serve(request, now, self._is_set)

    def _is_set(self, request: Request, now: float, effects: list[Effect]) -> Any:
        name = _normalize_name(dask_args(_event_is_set, request.args, unpickle=True))
        return self.flags.get(name, False)

    # ------------------------------------------------------------------ waiters leaving
    def _leave(self, request: int) -> bool | None:
        """Forget a parked waiter; returns whether it had a timer (None: not parked)."""
        if request not in self._parked:
            return None
        name = self._parked.pop(request)
        waiters = self.waiters[name]
        timed = waiters.pop(request)
        if not waiters:
            del self.waiters[name]
            if not self.flags.get(name):
                self.flags.pop(name, None)
        return timed

    def on_timer(self, token: Hashable, now: float) -> Effects:
        if not (isinstance(token, tuple) and len(token) == 2 and token[0] == "wait"):
            return ()
        request = token[1]
        if self._leave(request) is None:
            return ()  # answered or dropped meanwhile
        return [Reply(request, False)]

    def on_request_dropped(self, request: int, now: float) -> Effects:
        timed = self._leave(request)
        return [CancelTimer(("wait", request))] if timed else ()

    # ------------------------------------------------------------------ checking
    def validate(self) -> None:
        """The invariants (for tests)."""
        for name, flag in self.flags.items():
            assert flag or self.waiters.get(name), f"unset event {name!r} without waiters"
        for name, waiters in self.waiters.items():
            assert waiters, f"empty waiter list for {name!r}"
            assert name in self.flags and not self.flags[name], f"waiters on set {name!r}"
            for request in waiters:
                assert self._parked.get(request, object()) == name
        assert len(self._parked) == sum(len(w) for w in self.waiters.values())
