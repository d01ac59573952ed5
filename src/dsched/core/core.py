"""The scheduler's core: the state machine, the policy and the extensions, driven as one.

Theory of operation
-------------------
Everything that happens to the scheduler enters through one of the core's methods, each
given ``now`` (the core never reads a clock and does no I/O):

* ``handle(event, now)``: a state event (``dsched.state.events``), decoded from a peer's
  message by ``dsched.core.inbound``. The state machine applies it, appending messages
  and policy events to the tick's pending ``Outbox``; extensions that declared the event's
  type observe it afterwards.
* ``request(op, peer, args, now)`` / ``stream(peer, op, msg, now)``: an RPC or a stream
  message served by an extension (see ``dsched.ext.protocol``).
* ``timer(...)``, ``rpc_reply(...)``, ``drop_request(...)``: what the shell reports back for
  the effects it carried out.

``flush(now)`` ends a tick. It holds the only state <-> policy loop of the program: while
the pending outbox holds policy events, the policy decides on the whole batch and its
decisions go back into the state machine (which may produce more policy events); batched
task transitions go to the extensions that observe them, whose effects may move tasks
again. The loop is capped (``MAX_FLUSH_ROUNDS``): a policy and a state machine that keep
bouncing are a bug of ours, reported as ``FlushLoopError`` rather than a hung scheduler.
What is left for the shell comes out as one ``Flush``: every peer's messages of the tick
(one batch per peer), answers to requests, RPCs and timers the extensions asked for.

The server's reactor, the simulator, the unit-test harness and the hot-path benchmark all
drive this same object, so what the tests exercise is what production runs.
"""

from __future__ import annotations

import traceback
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from dsched.core.errors import FlushLoopError, InternalError
from dsched.ext.protocol import (
    CancelTimer,
    Effects,
    Extension,
    Fail,
    Log,
    Observe,
    Reply,
    Request,
    Rpc,
    SetTimer,
    Stimulus,
    ToClient,
    ToWorker,
)
from dsched.policy.protocol import Decision, Policy, PolicyEvent
from dsched.state import events as ev
from dsched.state.machine import SchedulerState
from dsched.state.outbox import Outbox
from dsched.wire.errors import RemoteProtocolError

# A flush that needs more policy rounds than this is looping: every round must consume the
# previous one's events (a graph of any size settles in a handful).
MAX_FLUSH_ROUNDS = 1000
# Stimulus effects whose observers answer with stimuli whose observers answer with ...
MAX_STIMULUS_DEPTH = 50

PolicyObserver = Callable[[Sequence[PolicyEvent], Sequence[Decision], float], None]
RpcHandler = Callable[[Request, float], Effects]
StreamHandler = Callable[[str, dict[str, Any], float], Effects]


@dataclass(slots=True)
class Flush:
    """What one tick asks of the shell."""

    out: Outbox  # messages per worker and per client, workers to close, log lines
    answers: list[Reply | Fail] = field(default_factory=list)
    rpcs: list[tuple[str, Rpc]] = field(default_factory=list)  # (extension name, rpc)
    timers: list[tuple[str, SetTimer | CancelTimer]] = field(default_factory=list)


class Core:
    def __init__(
        self,
        state: SchedulerState,
        policy: Policy,
        extensions: Sequence[Extension] = (),
        *,
        validate: bool = False,
        policy_observer: PolicyObserver | None = None,
    ) -> None:
        self.state = state
        self.policy = policy
        self.validate = validate
        self.policy_observer = policy_observer
        self.extensions: dict[str, Extension] = {}
        self._rpc_ops: dict[str, tuple[Extension, RpcHandler]] = {}
        self._stream_ops: dict[str, tuple[Extension, StreamHandler]] = {}
        self._observers: dict[type, list[Extension]] = {}
        self._transition_observers: list[Extension] = []
        for extension in extensions:
            self.add_extension(extension)
        self._pending = Outbox()
        self._flush = Flush(self._pending)
        self._next_request = 0
        self._parked: dict[int, Extension] = {}  # request id -> the extension answering it
        self._depth = 0

    # ------------------------------------------------------------------ extensions
    def add_extension(self, extension: Extension) -> None:
        name = extension.name or type(extension).__name__
        if name in self.extensions:
            raise ValueError(f"an extension named {name!r} is already registered")
        for op, method in extension.rpc_ops.items():
            if op in self._rpc_ops:
                raise ValueError(f"RPC op {op!r} of {name} is already served")
            self._rpc_ops[op] = (extension, getattr(extension, method))
        for op, method in extension.stream_ops.items():
            if op in self._stream_ops:
                raise ValueError(f"stream op {op!r} of {name} is already served")
            self._stream_ops[op] = (extension, getattr(extension, method))
        for event_type in extension.observes:
            self._observers.setdefault(event_type, []).append(extension)
        if extension.observes_transitions:
            self._transition_observers.append(extension)
            self.state.observe_transitions = True
        self.extensions[name] = extension
        extension.attach(self.state)

    def set_observations(
        self, extension: Extension, observes: frozenset[type], transitions: bool
    ) -> None:
        """Change at run time what a registered extension observes (e.g. scheduler plugins
        come and go). The lists are replaced, never mutated, so a fan-out in progress is
        not disturbed; the state machine records transitions only while someone observes."""
        for event_type in set(self._observers) | set(observes):
            current = [e for e in self._observers.get(event_type, ()) if e is not extension]
            if event_type in observes:
                current.append(extension)
            if current:
                self._observers[event_type] = current
            else:
                self._observers.pop(event_type, None)
        observers = [e for e in self._transition_observers if e is not extension]
        if transitions:
            observers.append(extension)
        self._transition_observers = observers
        self.state.observe_transitions = bool(observers)

    def serves_rpc(self, op: str) -> bool:
        return op in self._rpc_ops

    def serves_stream(self, op: str) -> bool:
        return op in self._stream_ops

    @property
    def rpc_ops(self) -> Mapping[str, tuple[Extension, RpcHandler]]:
        return self._rpc_ops

    @property
    def stream_ops(self) -> Mapping[str, tuple[Extension, StreamHandler]]:
        return self._stream_ops

    # ------------------------------------------------------------------ inputs
    def handle(self, event: ev.Event, now: float) -> Any:
        """Apply a state event; returns its reply (``retry``'s keys), if it has one."""
        reply = self.state.handle(event, now, self._pending).reply
        observers = self._observers.get(type(event))
        if observers is not None:
            for extension in observers:
                self._apply(extension, extension.on_event(event, now), now)
        if self.validate:
            self.state.validate()
        return reply

    def request(self, op: str, peer: str, args: Mapping[str, Any], now: float) -> int:
        """Start an RPC served by an extension; its answer comes out of a later ``flush``
        (this tick's, unless the extension parks it). Returns the request id."""
        extension, handler = self._rpc_ops[op]
        request = Request(self._next_request, op, peer, args)
        self._next_request += 1
        self._parked[request.id] = extension
        try:
            effects = handler(request, now)
        except RemoteProtocolError as exc:
            self._pending.log("warning", f"bad {op!r} request from {peer}: {exc}")
            effects = [Fail(request.id, exc)]
        except Exception as exc:
            self._pending.log(
                "error",
                f"internal error: extension {extension.name} failed on {op!r} from {peer}:\n"
                + "".join(traceback.format_exception(exc)),
            )
            effects = [Fail(request.id, exc)]
        self._apply(extension, effects, now)
        return request.id

    def stream(self, peer: str, op: str, msg: dict[str, Any], now: float) -> None:
        """A stream message served by an extension. A ``RemoteProtocolError`` (the peer's
        fault) propagates to the caller, as does any other exception (ours)."""
        extension, handler = self._stream_ops[op]
        self._apply(extension, handler(peer, msg, now), now)

    def timer(self, extension: str, token: Hashable, now: float) -> None:
        ext = self.extensions[extension]
        self._apply(ext, ext.on_timer(token, now), now)

    def rpc_reply(
        self,
        extension: str,
        token: Hashable,
        reply: Any,
        error: BaseException | None,
        now: float,
    ) -> None:
        ext = self.extensions[extension]
        self._apply(ext, ext.on_rpc_reply(token, reply, error, now), now)

    def drop_request(self, request: int, now: float) -> None:
        """The peer of a parked request left; the extension may forget it."""
        ext = self._parked.pop(request, None)
        if ext is not None:
            self._apply(ext, ext.on_request_dropped(request, now), now)

    @property
    def parked_requests(self) -> int:
        return len(self._parked)

    # ------------------------------------------------------------------ effects
    def _apply(self, extension: Extension, effects: Effects, now: float) -> None:
        out = self._pending
        flush = self._flush
        for effect in effects:
            if isinstance(effect, ToClient):
                out.send_client_raw(effect.client, effect.msg)
            elif isinstance(effect, ToWorker):
                out.send_worker_raw(effect.address, effect.msg)
            elif isinstance(effect, Reply | Fail):
                if self._parked.pop(effect.request, None) is not None:
                    flush.answers.append(effect)
            elif isinstance(effect, Stimulus):
                self._depth += 1
                try:
                    if self._depth > MAX_STIMULUS_DEPTH:
                        raise InternalError(
                            f"extension {extension.name}: stimuli caused stimuli "
                            f"{MAX_STIMULUS_DEPTH} deep (last: {effect.event!r:.200})"
                        )
                    self.handle(effect.event, now)
                finally:
                    self._depth -= 1
            elif isinstance(effect, Rpc):
                flush.rpcs.append((extension.name, effect))
            elif isinstance(effect, SetTimer | CancelTimer):
                flush.timers.append((extension.name, effect))
            elif isinstance(effect, Log):
                out.log(effect.level, effect.text)
            elif isinstance(effect, Observe):
                self.set_observations(extension, effect.observes, effect.transitions)
            else:
                raise InternalError(f"extension {extension.name} returned {effect!r:.200}")

    # ------------------------------------------------------------------ the tick
    def flush(self, now: float) -> Flush:
        """Run the state <-> policy loop to a fixed point and hand over the tick's output."""
        out = self._pending
        state = self.state
        policy = self.policy
        for _ in range(MAX_FLUSH_ROUNDS):
            if out.transitions and self._transition_observers:
                batch, out.transitions = out.transitions, []
                for extension in self._transition_observers:
                    self._apply(extension, extension.on_transitions(batch, now), now)
                continue
            if not out.policy:
                break
            policy_events, out.policy = out.policy, []
            decisions = policy.handle(policy_events, now)
            if self.policy_observer is not None:
                self.policy_observer(policy_events, decisions, now)
            if decisions:
                state.handle(ev.PolicyDecisions(decisions), now, out)
                if self.validate:
                    state.validate()
        else:
            raise FlushLoopError(
                f"the state machine and the policy did not settle in {MAX_FLUSH_ROUNDS} rounds "
                f"({len(out.policy)} policy events pending)"
            )
        out.transitions.clear()
        flush = self._flush
        self._pending = Outbox()
        self._flush = Flush(self._pending)
        return flush

    # ------------------------------------------------------------------ reading
    def story(self, *keys: Any) -> list[tuple[Any, ...]]:
        """The recorded transitions of these keys, oldest first (``Scheduler.story``)."""
        return self.state.story(*keys)
