"""Variables: the scheduler side of ``distributed.Variable``.

Theory of operation
-------------------
Dask's ``VariableExtension`` (distributed/variable.py:21-134) as a pure extension. A
variable is a name bound to a *record*: ``{"type": "msgpack", "value": data}`` or
``{"type": "Future", "value": key}``. A future's key is held by the pseudo-client
``"variable-{name}"`` (a ``ClientDesiresKeys`` stimulus), so it outlives the client that set
it.

* ``variable_set(name, key | data, client, timeout)``: ``timeout`` goes through
  ``parse_timedelta`` (the client sends ``"30 s"``). A key the scheduler does not know yet
  (the client's ``update-graph`` travels on its stream, the RPC on another comm) parks the
  request until a ``GraphReceived`` / ``DataPlaced`` makes it known, or fails it at the
  deadline with ``TimeoutError("Task {key} unknown to scheduler.")`` (Dask polls every
  10 ms; here the observation re-checks). Then the key is held, the record stored, and an
  old future of the variable let go of (see below). Setting a name that had no record
  answers the ``variable_get`` requests parked on it.
* ``variable_get(name, client, timeout)``: the record at once if there is one, else parked
  until a set, or failed with ``TimeoutError()`` at the deadline (at once for a timeout
  <= 0; ``asyncio.timeout``'s rule). A future's record gets ``token`` (unique), ``state``
  (the task's state now, ``"lost"`` if the scheduler forgot it) and, when erred, the
  ``exception`` and ``traceback`` of the task to blame (variable.py:106-118).
* Tokens: the getter confirms with stream op ``variable-future-received-confirm(name, key,
  token)``, which makes that client want the key, then ends the token. Letting go of a
  variable's old key (a set to another value, or ``variable_delete``) waits until every
  token handed out for ``(key, name)`` is confirmed, so the key is never released between
  a get and the getter holding it (variable.py:70-85). A waiting let-go is a deferred
  action run by the last confirmation, never a poll.
* ``variable_delete(name)`` (stream): once the tokens of its current future are confirmed,
  the record is removed and the pseudo-client with it (Dask's ``remove_client``, here a
  ``ClientDisconnected`` stimulus), which releases whatever it still held.

Where this is more careful than Dask (same replies and errors otherwise):

* A set's deferred let-go of an old key skips the release if the variable holds that key
  again by then (Dask releases it under the variable's feet: set A, get, set B, set A).
* A client that leaves with unconfirmed tokens can never confirm them: its tokens end with
  it (in Dask the let-go, and a ``variable_delete``, would wait forever).
* A parked request whose peer went away (``on_request_dropped``) is forgotten; Dask's
  handler would still run and answer nobody.

The helpers below (``dask_args``, ``stream_args``, ``future_record``, ``deadline_timer``,
``KeyWaits``) are shared with ``dsched.ext.queues`` and ``dsched.ext.publish``.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

from dask.utils import parse_timedelta

from dsched.ext.protocol import (
    CancelTimer,
    Effect,
    Effects,
    Extension,
    Fail,
    Log,
    Reply,
    Request,
    Stimulus,
)
from dsched.ext.requests import (
    dask_args,
    dask_signature,
    deadline,
    deadline_timer,
    stream_args,
)
from dsched.state import events as ev
from dsched.wire.errors import RemoteProtocolError

if TYPE_CHECKING:
    from dsched.state.machine import SchedulerState

Key = Any
Stub = Callable[..., dict[str, Any]]
_F = TypeVar("_F", bound=Callable[..., Any])



# ----------------------------------------------------------------------------- shared helpers






def checked_key(value: Any, field: str = "key") -> Any:
    """A stream message's key, hashable (anything else is the peer's fault)."""
    try:
        hash(value)
    except TypeError:
        raise RemoteProtocolError(f"{field} must be a Dask key, got {value!r:.200}") from None
    return value


def future_record(state: SchedulerState, key: Key, **extra: Any) -> dict[str, Any]:
    """``{"type": "Future", "value": key, **extra, "state": ...}`` with the task's state as
    it is now, plus the blamed task's exception and traceback if it erred (variable.py:
    106-118, queues.py:92-105)."""
    ts = state.tasks.get(key)
    record: dict[str, Any] = {"type": "Future", "value": key, **extra}
    if ts is None:
        record["state"] = "lost"
        return record
    record["state"] = ts.state
    if ts.state == "erred":
        blame = ts.exception_blame if ts.exception_blame is not None else ts
        record["exception"] = blame.exception
        record["traceback"] = blame.traceback
    return record








class KeyWaits:
    """Requests waiting for a key to become known to the scheduler (Dask's
    ``while key not in self.scheduler.tasks: await asyncio.sleep(0.01)``). Checked when a
    task may have appeared (``GraphReceived``, ``DataPlaced``); O(waiting keys), nothing
    while nobody waits."""

    OBSERVES: ClassVar[frozenset[type]] = frozenset({ev.GraphReceived, ev.DataPlaced})

    def __init__(self) -> None:
        self._by_key: dict[Key, dict[int, None]] = {}  # key -> request ids, in arrival order

    def __bool__(self) -> bool:
        return bool(self._by_key)

    def add(self, key: Key, request: int) -> None:
        self._by_key.setdefault(key, {})[request] = None

    def discard(self, key: Key, request: int) -> None:
        waiting = self._by_key.get(key)
        if waiting is not None:
            waiting.pop(request, None)
            if not waiting:
                del self._by_key[key]

    def arrived(self, tasks: Mapping[Key, Any]) -> list[int]:
        """The requests whose key is now known, in arrival order per key; forgotten here."""
        ready: list[int] = []
        for key in [k for k in self._by_key if k in tasks]:
            ready.extend(self._by_key.pop(key))
        return ready


# ----------------------------------------------------------------------------- Dask signatures
@dask_signature("VariableExtension.set")
def _set_args(
    name: Any = None, key: Any = None, data: Any = None, client: Any = None, timeout: Any = None
) -> dict[str, Any]:
    return locals()


@dask_signature("VariableExtension.get")
def _get_args(name: Any = None, client: Any = None, timeout: Any = None) -> dict[str, Any]:
    return locals()


@dask_signature("VariableExtension.future_received_confirm")
def _confirm_args(
    name: Any = None, key: Any = None, token: Any = None, client: Any = None
) -> dict[str, Any]:
    return locals()


@dask_signature("VariableExtension.delete")
def _delete_args(name: Any = None, client: Any = None) -> dict[str, Any]:
    return locals()


def holder(name: Any) -> str:
    """The pseudo-client holding a variable's future (variable.py:55)."""
    return f"variable-{name}"


@dataclass(slots=True)
class _ParkedSet:
    name: Any
    key: Key


@dataclass(slots=True)
class _ParkedGet:
    name: Any
    client: Any


_RELEASE = "release"  # a set's let-go of the variable's previous key
_DELETE = "delete"  # variable_delete, waiting for its current key's tokens


class Variables(Extension):
    name = "variables"
    rpc_ops: ClassVar = {"variable_set": "rpc_set", "variable_get": "rpc_get"}
    stream_ops: ClassVar = {
        "variable-future-received-confirm": "stream_confirm",
        "variable_delete": "stream_delete",
    }
    observes = KeyWaits.OBSERVES | {ev.ClientDisconnected}

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> Variables:
        """The registry's factory (``dsched.ext.registry``): nothing to configure."""
        return cls()

    def __init__(self) -> None:
        self.variables: dict[Any, dict[str, Any]] = {}
        # (key, name) -> tokens handed out by variable_get and not confirmed yet.
        self.waiting: dict[tuple[Key, Any], set[str]] = {}
        self._token_client: dict[str, tuple[Any, tuple[Key, Any]]] = {}
        self._client_tokens: dict[Any, set[str]] = {}
        self._deferred: dict[tuple[Key, Any], list[str]] = {}  # run once no token is left
        self._sets: dict[int, _ParkedSet] = {}  # variable_set waiting for its key
        self._key_waits = KeyWaits()
        self._gets: dict[int, _ParkedGet] = {}  # variable_get waiting for a set
        self._gets_by_name: dict[Any, dict[int, None]] = {}
        self._next_token = 0

    # ------------------------------------------------------------------ variable_set
    def rpc_set(self, request: Request, now: float) -> Effects:
        try:
            args = dask_args(_set_args, request.args)
            name, key = args["name"], args["key"]
            at = deadline(now, parse_timedelta(args["timeout"]))
            hash(name)
            known = key is None or key in self.state.tasks
        except Exception as exc:  # what Dask's handler would raise to the caller
            return [Fail(request.id, exc)]
        if known:
            return [*self._set(name, key, args["data"]), Reply(request.id, None)]
        self._sets[request.id] = _ParkedSet(name, key)
        self._key_waits.add(key, request.id)
        # Dask checks its deadline after each 10 ms sleep: a past deadline fails at once.
        return deadline_timer(("set", request.id), at if at is None else max(at, now))

    def _set(self, name: Any, key: Key, data: Any) -> list[Effect]:
        effects: list[Effect] = []
        if key is not None:
            record = {"type": "Future", "value": key}
            effects.append(Stimulus(ev.ClientDesiresKeys(holder(name), [key])))
        else:
            record = {"type": "msgpack", "value": data}
        old = self.variables.get(name)
        self.variables[name] = record
        if old is not None and old["type"] == "Future" and old["value"] != key:
            effects += self._after_tokens(old["value"], name, _RELEASE)
        if old is None:
            effects += self._answer_gets(name)
        return effects

    # ------------------------------------------------------------------ variable_get
    def rpc_get(self, request: Request, now: float) -> Effects:
        try:
            args = dask_args(_get_args, request.args)
            name, timeout = args["name"], args["timeout"]
            hash(args["client"])  # it owns the tokens handed out
            if name in self.variables:
                return [Reply(request.id, self._record(name, args["client"]))]
            left = None if timeout is None else timeout - 0.0  # Dask's TypeError if not a number
            at = deadline(now, left)
        except Exception as exc:
            return [Fail(request.id, exc)]
        if left is not None and left <= 0:  # `left < 0` raises; asyncio.timeout(0) expires
            return [Fail(request.id, TimeoutError())]
        self._gets[request.id] = _ParkedGet(name, args["client"])
        self._gets_by_name.setdefault(name, {})[request.id] = None
        return deadline_timer(("get", request.id), at)

    def _record(self, name: Any, client: Any) -> dict[str, Any]:
        record = self.variables[name]
        if record["type"] != "Future":
            return record
        key = record["value"]
        token = f"{self._next_token:032x}"
        self._next_token += 1
        self.waiting.setdefault((key, name), set()).add(token)
        self._token_client[token] = (client, (key, name))
        self._client_tokens.setdefault(client, set()).add(token)
        return future_record(self.state, key, token=token)

    def _answer_gets(self, name: Any) -> list[Effect]:
        parked = self._gets_by_name.pop(name, None)
        if not parked:
            return []
        effects: list[Effect] = []
        for request in parked:
            get = self._gets.pop(request)
            effects.append(CancelTimer(("get", request)))
            effects.append(Reply(request, self._record(name, get.client)))
        return effects

    # ------------------------------------------------------------------ tokens
    def stream_confirm(self, peer: str, msg: dict[str, Any], now: float) -> Effects:
        args = stream_args(_confirm_args, peer, msg)
        name, key, token, client = args["name"], args["key"], args["token"], args["client"]
        checked_key(key)
        checked_key(name, "name")
        if not isinstance(client, str):
            raise RemoteProtocolError(f"client must be a string, got {client!r:.200}")
        effects: list[Effect] = [Stimulus(ev.ClientDesiresKeys(client, [key]))]
        tokens = self.waiting.get((key, name))
        if tokens is None or not isinstance(token, str) or token not in tokens:
            effects.append(Log("warning", f"{client}: unknown variable token {token!r:.100}"))
            return effects
        self._end_token(token)
        return effects + self._token_ended(key, name)

    def _end_token(self, token: str) -> None:
        client, (key, name) = self._token_client.pop(token)
        self.waiting[key, name].discard(token)
        tokens = self._client_tokens[client]
        tokens.discard(token)
        if not tokens:
            del self._client_tokens[client]

    def _token_ended(self, key: Key, name: Any) -> list[Effect]:
        if self.waiting.get((key, name)):
            return []
        self.waiting.pop((key, name), None)
        effects: list[Effect] = []
        for action in self._deferred.pop((key, name), ()):
            effects += self._run(action, key, name)
        return effects

    def _after_tokens(self, key: Key, name: Any, action: str) -> list[Effect]:
        if self.waiting.get((key, name)):
            self._deferred.setdefault((key, name), []).append(action)
            return []
        return self._run(action, key, name)

    def _run(self, action: str, key: Key, name: Any) -> list[Effect]:
        self.waiting.pop((key, name), None)
        if action == _RELEASE:
            current = self.variables.get(name)
            if current is not None and current["type"] == "Future" and current["value"] == key:
                return []  # set to that key again meanwhile: still held
            return [Stimulus(ev.ClientReleasesKeys(holder(name), [key]))]
        # _DELETE (variable.py:121-134): the record goes, and the pseudo-client with
        # everything it holds.
        self.variables.pop(name, None)
        return self._remove_holder(name)

    def _remove_holder(self, name: Any) -> list[Effect]:
        pseudo = holder(name)
        if pseudo in self.state.clients:
            return [Stimulus(ev.ClientDisconnected(pseudo))]
        return []

    # ------------------------------------------------------------------ variable_delete
    def stream_delete(self, peer: str, msg: dict[str, Any], now: float) -> Effects:
        name = checked_key(stream_args(_delete_args, peer, msg)["name"], "name")
        old = self.variables.get(name)
        if old is not None and old["type"] == "Future":
            return self._after_tokens(old["value"], name, _DELETE)
        self.variables.pop(name, None)
        return self._remove_holder(name)

    # ------------------------------------------------------------------ observations
    def on_event(self, event: ev.Event, now: float) -> Effects:
        if isinstance(event, ev.ClientDisconnected):
            return self._client_left(event.client)
        if not self._key_waits:
            return ()
        effects: list[Effect] = []
        for request in self._key_waits.arrived(self.state.tasks):
            parked = self._sets.pop(request)
            effects.append(CancelTimer(("set", request)))
            effects += self._set(parked.name, parked.key, None)
            effects.append(Reply(request, None))
        return effects

    def _client_left(self, client: str) -> list[Effect]:
        """Its tokens can never be confirmed: end them as if they were (without the want)."""
        tokens = self._client_tokens.get(client)
        if not tokens:
            return []
        effects: list[Effect] = []
        for token in list(tokens):
            key, name = self._token_client[token][1]
            self._end_token(token)
            effects += self._token_ended(key, name)
        return effects

    def on_timer(self, token: Hashable, now: float) -> Effects:
        if not isinstance(token, tuple):
            return ()
        kind, request = token
        if kind == "set":
            parked = self._sets.pop(request, None)
            if parked is None:
                return ()
            self._key_waits.discard(parked.key, request)
            return [Fail(request, TimeoutError(f"Task {parked.key} unknown to scheduler."))]
        if self._forget_get(request):
            return [Fail(request, TimeoutError())]
        return ()

    def on_request_dropped(self, request: int, now: float) -> Effects:
        parked = self._sets.pop(request, None)
        if parked is not None:
            self._key_waits.discard(parked.key, request)
            return [CancelTimer(("set", request))]
        if self._forget_get(request):
            return [CancelTimer(("get", request))]
        return ()

    def _forget_get(self, request: int) -> bool:
        get = self._gets.pop(request, None)
        if get is None:
            return False
        same_name = self._gets_by_name[get.name]
        del same_name[request]
        if not same_name:
            del self._gets_by_name[get.name]
        return True
