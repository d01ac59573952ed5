"""The contract between the core and a scheduler extension.

Theory of operation
-------------------
An extension is a pure object, like a policy: observations in, effects out. It never does
I/O, never reads a clock (``now`` is passed in) and never mutates the task state directly.
It adds a feature to the scheduler (topic pub/sub, coordination primitives, datasets, P2P,
...) by declaring, as class attributes, what it takes part in:

* ``rpc_ops``: RPC operations it serves (``{"log_event": "log_event"}``: op -> method name).
  The method gets a ``Request`` and ``now`` and returns effects. A request is answered by a
  ``Reply`` or ``Fail`` effect naming its id, now or later: a request whose effects hold no
  answer is *parked* (a lock acquire that must wait, a variable get before a set) and
  answered by the effects of a later call (a release, a timer). Nothing polls.
* ``stream_ops``: batched-stream operations it serves, from clients or workers (op ->
  method name); the method gets the peer, the message and ``now``.
* ``observes``: the state events (``dsched.state.events`` classes) it wants to see after the
  state machine applied them (``WorkerConnected``, ``ClientDisconnected``, ``Restart``, ...).
* ``observes_transitions``: whether it wants every task transition, as a batch of
  ``(key, start, finish, stimulus_id)`` tuples once per flush.

The core fans out only to the extensions that asked (pluggy's rule: an observation nobody
declared costs nothing), in registration order.

Effects (the whole output vocabulary):

* ``Reply(request, value)`` / ``Fail(request, exception)``: answer a request.
* ``ToClient(client, msg)`` / ``ToWorker(address, msg)``: a message on that peer's stream,
  batched with the rest of the tick.
* ``Rpc(address, msg, token)``: an RPC to a worker or nanny; its answer comes back as
  ``on_rpc_reply(token, reply, error, now)``.
* ``SetTimer(token, at)`` / ``CancelTimer(token)``: ``on_timer(token, now)`` at ``at``.
* ``Stimulus(event)``: a state event to apply (a pseudo-client wanting or releasing keys,
  retiring or removing a worker): how an extension changes task state.
* ``Log(level, text)``.
* ``Observe(observes, transitions)``: from now on observe these event types (and
  transitions, or not) instead of what the class declared: an extension that is idle until
  first used (the task stream) costs nothing until then.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:
    from dsched.state.events import Event
    from dsched.state.machine import SchedulerState


@dataclass(frozen=True, slots=True)
class Request:
    """One RPC: ``args`` are the request's fields without ``op``/``reply``; ``peer`` is the
    address of the comm it came on (for logs and errors)."""

    id: int
    op: str
    peer: str
    args: Mapping[str, Any]


# ----------------------------------------------------------------------------- effects
@dataclass(frozen=True, slots=True)
class Reply:
    request: int
    value: Any


@dataclass(frozen=True, slots=True)
class Fail:
    """Answer a request with an error: the caller's RPC raises ``exception`` (Dask's
    ``error_message`` reply)."""

    request: int
    exception: BaseException


@dataclass(frozen=True, slots=True)
class ToClient:
    client: str
    msg: dict[str, Any]


@dataclass(frozen=True, slots=True)
class ToWorker:
    address: str
    msg: dict[str, Any]


@dataclass(frozen=True, slots=True)
class Rpc:
    """An RPC to ``address``; the reply (or the exception) comes back to the extension
    that asked, as ``on_rpc_reply(token, reply, error, now)``."""

    address: str
    msg: dict[str, Any]
    token: Hashable
    timeout: float | None = None  # then the error is a TimeoutError


@dataclass(frozen=True, slots=True)
class SetTimer:
    token: Hashable
    at: float


@dataclass(frozen=True, slots=True)
class CancelTimer:
    token: Hashable


@dataclass(frozen=True, slots=True)
class Stimulus:
    event: Event


@dataclass(frozen=True, slots=True)
class Log:
    level: str  # "debug" | "info" | "warning" | "error"
    text: str


@dataclass(frozen=True, slots=True)
class Observe:
    observes: frozenset[type]
    transitions: bool = False


Effect = (
    Reply | Fail | ToClient | ToWorker | Rpc | SetTimer | CancelTimer | Stimulus | Log | Observe
)
Effects = Sequence[Effect]
NO_EFFECTS: Effects = ()

Transition = tuple[Any, str, str, str]  # (key, start, finish, stimulus_id)


class Extension:
    """Base class: override what you declare; everything else is never called."""

    name: ClassVar[str] = ""
    rpc_ops: ClassVar[Mapping[str, str]] = {}
    stream_ops: ClassVar[Mapping[str, str]] = {}
    observes: ClassVar[frozenset[type]] = frozenset()
    observes_transitions: ClassVar[bool] = False

    def attach(self, state: SchedulerState) -> None:
        """Called once by the core: ``state`` may be read (never written) by handlers."""
        self.state = state

    def on_event(self, event: Event, now: float) -> Effects:
        """A state event of a type in ``observes``, after the state machine applied it."""
        return NO_EFFECTS

    def on_transitions(self, transitions: Sequence[Transition], now: float) -> Effects:
        return NO_EFFECTS

    def on_timer(self, token: Hashable, now: float) -> Effects:
        return NO_EFFECTS

    def on_rpc_reply(
        self, token: Hashable, reply: Any, error: BaseException | None, now: float
    ) -> Effects:
        return NO_EFFECTS

    def on_request_dropped(self, request: int, now: float) -> Effects:
        """The peer of a parked request went away: forget it (its answer would go nowhere)."""
        return NO_EFFECTS
