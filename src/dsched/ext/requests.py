"""Binding requests to Dask's handler signatures, and the deadlines of waiting requests.

Theory of operation
-------------------
Dask calls a handler as ``handler(**msg)`` once ``Server.handle_comm`` has popped ``op``,
``reply``, ``serializers`` and ``close`` (distributed/core.py:755-812), and a stream handler
as ``handler(**merge({"client": peer}, msg))``; whatever the handler raises goes back to the
caller. The extensions that reimplement Dask's do the same with *stubs*: functions with the
Dask handler's parameters, named after it with ``dask_signature`` (``"VariableExtension.get"``),
so a missing or unexpected field raises exactly Dask's ``TypeError`` text.

``serve`` runs a handler body that returns its answer (or ``PARKED``) and turns what it raises
into a ``Fail``, keeping the effects produced before. Waits end at a ``deadline`` computed with
Dask's arithmetic (``now + timeout``, so an ill-typed timeout raises Dask's ``TypeError``); a
deadline that ever comes gets a timer.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable, Mapping
from typing import Any, Final, TypeVar

from dsched.ext.protocol import Effect, Fail, Reply, Request, SetTimer
from dsched.wire.codec import Pickled
from dsched.wire.errors import RemoteProtocolError

T = TypeVar("T")
_F = TypeVar("_F", bound=Callable[..., Any])

# The fields ``distributed.core.Server.handle_comm`` pops before calling a handler.
CONTROL_FIELDS: Final = frozenset({"op", "reply", "serializers", "close"})

# ``serve``'s marker for a request that is parked (answered by a later call's effects).
PARKED: Final = object()

Body = Callable[[Request, float, list[Effect]], Any]


def dask_signature(qualname: str) -> Callable[[_F], _F]:
    """Name a stub after the Dask handler whose signature it copies, so that binding a
    request to it raises Dask's own ``TypeError`` text (``"VariableExtension.get() got an
    unexpected keyword argument 'x'"``)."""

    def rename(stub: _F) -> _F:
        stub.__qualname__ = qualname
        return stub

    return rename


def _plain(value: Any) -> Any:
    """A field as Dask's ``loads`` hands it over: objects msgpack could not carry arrive
    pickled, and Dask unpickles them on receipt (distributed/protocol/core.py)."""
    if isinstance(value, Pickled):
        return value.unpickle()
    if type(value) is tuple:
        return tuple(_plain(item) for item in value)
    return value


def dask_args(stub: Callable[..., T], args: Mapping[Any, Any], *, unpickle: bool = False) -> T:
    """Call ``stub`` with an RPC's fields as ``handle_comm`` calls a handler; raises the
    ``TypeError`` Dask's ``handler(**msg)`` would. ``unpickle``: hand pickled fields over
    unpickled, as Dask does (only for fields that are names and numbers, never user data,
    which stays opaque)."""
    fields = {k: v for k, v in args.items() if k not in CONTROL_FIELDS}
    if unpickle:
        fields = {k: _plain(v) for k, v in fields.items()}
    return stub(**fields)


def stream_args(stub: Callable[..., T], peer: str, msg: Mapping[Any, Any]) -> T:
    """A stream message's fields bound as Dask's ``handler(**merge({"client": peer}, msg))``
    does; a mismatch is the peer's fault."""
    try:
        return stub(**{"client": peer, **{k: v for k, v in msg.items() if k != "op"}})
    except TypeError as exc:
        raise RemoteProtocolError(str(exc)) from None


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
    return float(at)


def expired(at: float | None, now: float) -> bool:
    """A wait that ends at ``at`` is over before it starts (timeout <= 0, or NaN, which
    ``Deadline.remaining`` turns into 0)."""
    return at is not None and not at > now


def expires(at: float | None) -> bool:
    """Whether a deadline ever comes (None, inf and nan never do)."""
    return at is not None and math.isfinite(at)


def deadline_timer(token: Hashable, at: float | None) -> list[Effect]:
    """The timer of a wait ending at ``at`` (none for one that never ends)."""
    return [SetTimer(token, at)] if at is not None and math.isfinite(at) else []
