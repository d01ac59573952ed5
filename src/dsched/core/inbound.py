"""Incoming stream messages -> state events: the one place a peer's message is decoded.

Theory of operation
-------------------
A decoder per stream op turns one message dict into one typed event of
``dsched.state.events``, checking every field it reads. A missing or ill-typed field raises
``BadMessage`` naming the peer, the op and the field: the peer's fault, caught by the shell
before anything was applied, so a peer's garbage never reaches the state machine (where an
unhashable "key" could fail half-way through a step). Keys are checked to be Dask keys
(str, bytes, numbers such as int, float and numpy integers, or tuples of those); the
worker's ``stimulus_id`` is kept, so logs and stories name the worker's own stimulus.
``TaskFinished`` / ``TaskErred`` also keep a reference to the message itself (``msg``, no
copy), for the fields only the task stream reads (``startstops``, ``thread``, ...).

``CLIENT_DECODERS`` and ``WORKER_DECODERS`` map ops to decoders; ops served by extensions
are not here (``Core.serves_stream``).
"""

from __future__ import annotations

import numbers
from collections.abc import Callable, Iterable
from typing import Any

from dsched.core.errors import BadMessage
from dsched.state import events as ev

Message = dict[str, Any]
Decoder = Callable[[str, Message], ev.Event | None]

# numbers.Number: dask.array keys may hold numpy integers (vindex), decoded as np.int64.
_KEY_ATOMS = (str, bytes, int, float, numbers.Number)


def key(value: Any) -> Any:
    """A Dask key, else ValueError."""
    if type(value) is str:  # nearly every key: skip the walk
        return value
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, tuple):
            stack.extend(item)
        elif not isinstance(item, _KEY_ATOMS):
            raise ValueError(f"not a valid key: {value!r:.200}")
    return value


def keys(value: Any) -> list[Any]:
    if not isinstance(value, list | tuple | set | frozenset):
        raise ValueError(f"expected a list of keys, got {value!r:.200}")
    return [key(k) for k in value]


class _Fields:
    """Checked access to one message's fields; errors name peer, op and field."""

    __slots__ = ("msg", "op", "peer")

    def __init__(self, peer: str, msg: Message) -> None:
        self.peer = peer
        self.msg = msg
        self.op = str(msg.get("op"))

    def bad(self, name: str, problem: str) -> BadMessage:
        return BadMessage(self.peer, self.op, name, problem)

    def required(self, name: str) -> Any:
        try:
            return self.msg[name]
        except KeyError:
            raise self.bad(name, "missing") from None

    def key(self, name: str = "key") -> Any:
        try:
            return key(self.required(name))
        except ValueError as exc:
            raise self.bad(name, str(exc)) from None

    def keys(self, name: str = "keys", default: Any = None) -> list[Any]:
        value = self.msg.get(name, default) if default is not None else self.required(name)
        try:
            return keys(value)
        except ValueError as exc:
            raise self.bad(name, str(exc)) from None

    def text(self, name: str, default: str | None = None) -> str:
        value = self.msg.get(name, default) if default is not None else self.required(name)
        if not isinstance(value, str):
            raise self.bad(name, f"expected a string, got {value!r:.200}")
        return value

    def optional_text(self, name: str) -> str | None:
        value = self.msg.get(name)
        if value is not None and not isinstance(value, str):
            raise self.bad(name, f"expected a string, got {value!r:.200}")
        return value

    def run_id(self) -> int | None:
        value = self.msg.get("run_id")
        if value is not None and (not isinstance(value, int) or isinstance(value, bool)):
            raise self.bad("run_id", f"expected an int, got {value!r:.200}")
        return value

    def nbytes(self) -> int:
        value = self.msg.get("nbytes") or 0
        if not isinstance(value, int | float) or isinstance(value, bool) or value < 0:
            raise self.bad("nbytes", f"expected a non-negative number, got {value!r:.200}")
        return int(value)

    def stimulus_id(self) -> str:
        value = self.msg.get("stimulus_id") or ""
        return value if isinstance(value, str) else str(value)

    def client(self) -> str:
        """The client a client-stream message speaks for: the stream's own, or a
        pseudo-client it names (``fire-and-forget``)."""
        value = self.msg.get("client", self.peer)
        if not isinstance(value, str):
            raise self.bad("client", f"expected a string, got {value!r:.200}")
        return value


def compute_duration(startstops: Iterable[Any]) -> float | None:
    """Seconds spent computing, from a task-finished's ``startstops``."""
    total = None
    for entry in startstops or ():
        if isinstance(entry, dict) and entry.get("action") == "compute":
            total = (total or 0.0) + float(entry["stop"]) - float(entry["start"])
    return total


def data_placed(client: str | None, who_has: Any, nbytes: Any) -> ev.DataPlaced:
    """``update_data`` (RPC or stream): where scattered keys are, and their sizes."""
    if not isinstance(who_has, dict) or not isinstance(nbytes, dict):
        raise ValueError("who_has and nbytes must be maps")
    if client is not None and not isinstance(client, str):
        raise ValueError(f"client must be a string, got {client!r:.200}")
    placed = {key(k): [str(a) for a in keys(v)] for k, v in who_has.items()}
    sizes = {key(k): int(v) for k, v in nbytes.items()}
    return ev.DataPlaced(client, placed, sizes)


# ----------------------------------------------------------------------------- clients
def _client_desires_keys(peer: str, msg: Message) -> ev.Event:
    f = _Fields(peer, msg)
    return ev.ClientDesiresKeys(f.client(), f.keys())


def _client_releases_keys(peer: str, msg: Message) -> ev.Event:
    f = _Fields(peer, msg)
    return ev.ClientReleasesKeys(f.client(), f.keys())


def _cancel_keys(peer: str, msg: Message) -> ev.Event:
    f = _Fields(peer, msg)
    return ev.CancelKeys(
        f.client(),
        f.keys(),
        force=bool(msg.get("force")),
        reason=f.optional_text("reason"),
        msg=f.optional_text("msg"),
    )


def _report_key(peer: str, msg: Message) -> ev.Event:
    f = _Fields(peer, msg)
    return ev.ReportKey(f.client(), f.key())


def _close_client(peer: str, msg: Message) -> ev.Event:
    return ev.ClientDisconnected(peer)


def _update_data(peer: str, msg: Message) -> ev.Event:
    f = _Fields(peer, msg)
    try:
        return data_placed(f.client(), f.required("who_has"), msg.get("nbytes", {}))
    except ValueError as exc:
        raise f.bad("who_has", str(exc)) from None


def _ignore(peer: str, msg: Message) -> None:
    return None


CLIENT_DECODERS: dict[str, Decoder] = {
    "client-desires-keys": _client_desires_keys,
    "client-releases-keys": _client_releases_keys,
    "cancel-keys": _cancel_keys,
    "report-key": _report_key,
    "close-client": _close_client,
    "update-data": _update_data,
    # The stream being alive is all the scheduler needs to know.
    "heartbeat-client": _ignore,
}


# ----------------------------------------------------------------------------- workers
def _task_finished(peer: str, msg: Message) -> ev.Event:
    # The one message per task from every worker: fields of the usual types are taken as
    # they are (0.64 against 1.14 us a message); anything else gets the checked path below.
    key_, run_id, nbytes = msg.get("key"), msg.get("run_id"), msg.get("nbytes")
    stimulus_id = msg.get("stimulus_id")
    if (
        type(key_) is str
        and type(run_id) is int
        and type(nbytes) is int
        and nbytes >= 0
        and type(stimulus_id) is str
    ):
        return ev.TaskFinished(
            peer,
            key_,
            run_id,
            nbytes,
            msg.get("type"),
            compute_duration(msg.get("startstops", ())),
            stimulus_id,
            msg,
        )
    return _task_finished_checked(peer, msg)


def _task_finished_checked(peer: str, msg: Message) -> ev.Event:
    f = _Fields(peer, msg)
    return ev.TaskFinished(
        peer,
        f.key(),
        f.run_id(),
        f.nbytes(),
        msg.get("type"),
        compute_duration(msg.get("startstops", ())),
        stimulus_id=f.stimulus_id(),
        msg=msg,
    )


def _task_erred(peer: str, msg: Message) -> ev.Event:
    f = _Fields(peer, msg)
    return ev.TaskErred(
        peer,
        f.key(),
        f.run_id(),
        msg.get("exception"),
        msg.get("traceback"),
        str(msg.get("exception_text", "")),
        str(msg.get("traceback_text", "")),
        stimulus_id=f.stimulus_id(),
        msg=msg,
    )


def _release_worker_data(peer: str, msg: Message) -> ev.Event:
    f = _Fields(peer, msg)
    return ev.ReleaseWorkerData(peer, f.key(), stimulus_id=f.stimulus_id())


def _add_keys(peer: str, msg: Message) -> ev.Event:
    f = _Fields(peer, msg)
    return ev.AddKeys(peer, f.keys("keys", default=()), stimulus_id=f.stimulus_id())


def _request_refresh_who_has(peer: str, msg: Message) -> ev.Event:
    f = _Fields(peer, msg)
    return ev.RequestRefreshWhoHas(peer, f.keys(), stimulus_id=f.stimulus_id())


def _long_running(peer: str, msg: Message) -> ev.Event:
    f = _Fields(peer, msg)
    return ev.LongRunning(peer, f.key(), f.run_id(), stimulus_id=f.stimulus_id())


def _reschedule(peer: str, msg: Message) -> ev.Event:
    f = _Fields(peer, msg)
    return ev.Reschedule(f.text("worker", peer), f.key(), stimulus_id=f.stimulus_id())


def _worker_status_change(peer: str, msg: Message) -> ev.Event:
    f = _Fields(peer, msg)
    return ev.WorkerStatusChanged(peer, f.text("status"), stimulus_id=f.stimulus_id())


def _steal_response(peer: str, msg: Message) -> ev.Event:
    f = _Fields(peer, msg)
    return ev.StealResponse(peer, f.key(), f.optional_text("state"), f.stimulus_id())


WORKER_DECODERS: dict[str, Decoder] = {
    "task-finished": _task_finished,
    "task-erred": _task_erred,
    "release-worker-data": _release_worker_data,
    "add-keys": _add_keys,
    "request-refresh-who-has": _request_refresh_who_has,
    "long-running": _long_running,
    "reschedule": _reschedule,
    "worker-status-change": _worker_status_change,
    "steal-response": _steal_response,
    "keep-alive": _ignore,
}


# ----------------------------------------------------------------------------- registration
def registration_problem(request: Message) -> str | None:
    """What is wrong with a register-worker request's fields, or None if they are usable."""
    address = request.get("address")
    if not isinstance(address, str) or "://" not in address:
        return f"register-worker needs an address like tcp://host:port, got {address!r:.100}"
    nthreads = request.get("nthreads", 1)
    if nthreads is not None and (not isinstance(nthreads, int) or nthreads < 0):
        return f"nthreads must be a non-negative int, got {nthreads!r:.100}"
    memory_limit = request.get("memory_limit")
    if memory_limit is not None and not isinstance(memory_limit, int | float):
        return f"memory_limit must be a number, got {memory_limit!r:.100}"
    resources = request.get("resources") or {}
    if not isinstance(resources, dict) or not all(
        isinstance(k, str) and isinstance(v, int | float) for k, v in resources.items()
    ):
        return f"resources must map names to numbers, got {resources!r:.100}"
    name = request.get("name")
    if name is not None and not isinstance(name, str | int | float):
        return f"name must be a string or number, got {name!r:.100}"
    status = request.get("status")
    if status is not None and not isinstance(status, str):
        return f"status must be a string, got {status!r:.100}"
    return None


def worker_connected(request: Message) -> ev.WorkerConnected:
    """A register-worker request that passed ``registration_problem``."""
    return ev.WorkerConnected(
        str(request["address"]),
        int(request.get("nthreads") or 1),
        name=request.get("name", request["address"]),
        memory_limit=request.get("memory_limit"),
        resources=request.get("resources") or {},
        status=str(request.get("status") or "running"),
        info=dict(request),
    )


def reported_bandwidth(metrics: Any) -> float | None:
    """A heartbeat's ``metrics["bandwidth"]["total"]`` (the worker's transfer bandwidth
    estimate, bytes/s) if it is a positive number, else None."""
    bandwidth = metrics.get("bandwidth") if isinstance(metrics, dict) else None
    total = bandwidth.get("total") if isinstance(bandwidth, dict) else None
    if isinstance(total, int | float) and not isinstance(total, bool) and total > 0:
        return float(total)
    return None
