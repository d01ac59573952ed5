"""Distributed events (``distributed.Event``): ``event_wait``, ``event_set``, ``event_clear``,
``event_is_set``; and the request binding shared by the coordination primitives.

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

Request binding
---------------
Dask calls a handler as ``handler(**msg)`` once ``handle_comm`` has popped ``op``, ``reply``,
``serializers`` and ``close`` (distributed/core.py:755-812), and sends back whatever the
handler raises. ``call_as_dask`` does the same with a stub carrying the Dask handler's
parameters and ``__qualname__`` (``_event_wait`` below is ``EventExtension.event_wait``), so
a missing or unexpected field raises exactly Dask's TypeError; the handlers then perform the
same operations as Dask's code in the same order (``hash(name)`` where Dask indexes a dict,
``float(now) + timeout`` where asyncio computes a deadline), which raises the same exceptions
with the same messages for ill-typed fields. ``serve`` turns an exception into a ``Fail``
(the caller's RPC raises it, as Dask's ``error_message`` reply makes it) without losing the
effects of what happened before it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable, Mapping
from typing import Any, ClassVar, Final, TypeVar

from dsched.ext.protocol import (
    CancelTimer,
    Effect,
    Effects,
    Extension,
    Fail,
    Reply,
    Request,
    SetTimer,
)
from dsched.wire.codec import Pickled

T = TypeVar("T")

# The fields ``distributed.core.Server.handle_comm`` pops before calling a handler.
_NOT_HANDLER_ARGUMENTS: Final = frozenset({"op", "reply", "serializers", "close"})

# ``serve``'s marker for a request that is parked (answered by a later call's effects).
PARKED: Final = object()

Body = Callable[[Request, float, list[Effect]], Any]


def dask_handler(qualname: str) -> Callable[[Callable[..., T]], Callable[..., T]]:
    """Name a binding stub like the Dask handler it stands for (for TypeError messages)."""

    def name(stub: Callable[..., T]) -> Callable[..., T]:
        stub.__qualname__ = qualname
        return stub

    return name


def _plain(value: Any) -> Any:
    """A field as Dask's ``loads`` hands it over: objects msgpack could not carry arrive
    pickled, and Dask unpickles them on receipt (distributed/protocol/core.py)."""
    if isinstance(value, Pickled):
        return value.unpickle()
    if type(value) is tuple:
        return tuple(_plain(item) for item in value)
    return value


def call_as_dask(stub: Callable[..., T], args: Mapping[Any, Any]) -> T:
    """Call ``stub`` with a request's fields, as ``handle_comm`` calls a handler."""
    fields = {k: _plain(v) for k, v in args.items() if k not in _NOT_HANDLER_ARGUMENTS}
    return stub(**fields)


def serve(request: Request, now: float, body: Body) -> list[Effect]:
    """Run a handler body: its return value is the answer (unless ``PARKED``); what it raises
    fails the request, after the effects it produced before raising. (The shell logs the
    failures of the requests it answers.)"""
    effects: list[Effect] = []
    try:
        value = body(request, now, effects)
    except Exception as exc:
        effects.append(Fail(request.id, exc))
        return effects
    if value is not PARKED:
        effects.append(Reply(request.id, value))
    return effects


def deadline(now: float, timeout: Any) -> float | None:
    """When a wait of ``timeout`` seconds started at ``now`` ends (None: never), with the
    arithmetic (and so the TypeError of an ill-typed timeout) of ``Deadline.after`` and
    ``asyncio.timeout``, which add the timeout to a float clock reading."""
    if timeout is None:
        return None
    at: float = float(now) + timeout
    return at


def expired(at: float | None, now: float) -> bool:
    """A wait that ends at ``at`` is over before it starts (timeout <= 0, or NaN, which
    ``Deadline.remaining`` turns into 0)."""
    return at is not None and not at > now


def timer(token: Hashable, at: float | None) -> list[Effect]:
    """The timer of a wait ending at ``at`` (none for an endless one)."""
    return [SetTimer(token, at)] if at is not None and math.isfinite(at) else []


# ----------------------------------------------------------------------------- Dask's handlers
@dask_handler("EventExtension.event_wait")
def _event_wait(name: Any = None, timeout: Any = None) -> tuple[Any, Any]:
    return name, timeout


@dask_handler("EventExtension.event_set")
def _event_set(name: Any = None) -> Any:
    return name


@dask_handler("EventExtension.event_clear")
def _event_clear(name: Any = None) -> Any:
    return name


@dask_handler("EventExtension.event_is_set")
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
        name, timeout = call_as_dask(_event_wait, request.args)
        name = _normalize_name(name)
        hash(name)  # ``self._events[name]`` comes first (event.py:70)
        at = deadline(now, timeout)
        if self.flags.get(name):
            return True
        if expired(at, now):
            return False
        self.flags.setdefault(name, False)
        timers = timer(("wait", request.id), at)
        self.waiters.setdefault(name, {})[request.id] = bool(timers)
        self._parked[request.id] = name
        effects.extend(timers)
        return PARKED

    def rpc_set(self, request: Request, now: float) -> Effects:
        return serve(request, now, self._set)

    def _set(self, request: Request, now: float, effects: list[Effect]) -> Any:
        name = _normalize_name(call_as_dask(_event_set, request.args))
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
        name = _normalize_name(call_as_dask(_event_clear, request.args))
        if not self.waiters.get(name):
            self.flags.pop(name, None)
            self.waiters.pop(name, None)
        else:
            self.flags[name] = False
        return None

    def rpc_is_set(self, request: Request, now: float) -> Effects:
        return serve(request, now, self._is_set)

    def _is_set(self, request: Request, now: float, effects: list[Effect]) -> Any:
        name = _normalize_name(call_as_dask(_event_is_set, request.args))
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
