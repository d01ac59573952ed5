"""Run a policy in a separate process, behind the same ``Policy`` interface.

Theory of operation
-------------------
``PolicyProcess(name, config)`` starts a child process (``spawn``) that builds the policy with
``make_policy``, sends the optional events it wants (``wanted_events``: the parent reads
them into ``PolicyProcess.wants`` on first use, so the runtime sends the same events as in
process), and then serves one request at a time over a pipe: the parent sends the batch of
``PolicyEvent`` records and ``now``, the child answers with the list of ``Decision``
records. The records cross the boundary pickled, and the receiving side unpickles only the
record classes of ``dsched.policy.protocol`` (plus the builtins they are made of), so the
messages are exactly the in-process ones and nothing else.

``handle`` is synchronous: the reactor's flush waits for the answer (one pipe round trip per
tick, not per task). If the child dies, ``handle`` raises ``PolicyProcessError``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import multiprocessing
import pickle
from collections.abc import Sequence
from multiprocessing.connection import Connection
from typing import Any

import dask

from dsched.policy import PolicyConfig, make_policy
from dsched.policy import protocol as protocol_module
from dsched.policy.protocol import OPTIONAL_EVENTS, Decision, PolicyEvent, wanted_events

_ALLOWED_BUILTINS = frozenset({"frozenset", "tuple", "list", "set", "dict", "float", "int"})


class PolicyProcessError(RuntimeError):
    """The policy process died or answered something that is not a list of decisions."""


def _is_record_class(obj: object) -> bool:
    """A dataclass defined in ``protocol`` (not a function or an import of that module)."""
    return (
        isinstance(obj, type)
        and obj.__module__ == protocol_module.__name__
        and dataclasses.is_dataclass(obj)
    )


class _RecordUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if module == protocol_module.__name__ and _is_record_class(
            getattr(protocol_module, name, None)
        ):
            return getattr(protocol_module, name)
        if module == "builtins" and name in _ALLOWED_BUILTINS:
            return getattr(__import__("builtins"), name)
        raise pickle.UnpicklingError(f"refusing to unpickle {module}.{name}")


def dumps(obj: object) -> bytes:
    return pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)


def loads(data: bytes) -> Any:
    return _RecordUnpickler(io.BytesIO(data)).load()


def dask_policy_config(seed: int = 0) -> PolicyConfig:
    """The policy tunables from ``dask.config`` (as the stock scheduler reads them)."""
    from dask.utils import parse_bytes, parse_timedelta

    defaults = PolicyConfig()

    def get(name: str, default: object) -> Any:
        # distributed's defaults apply even when distributed was not imported yet.
        return dask.config.get(f"distributed.scheduler.{name}", default)

    bandwidth = get("bandwidth", defaults.bandwidth)
    unknown = get("unknown-task-duration", defaults.unknown_task_duration)
    return PolicyConfig(
        bandwidth=float(parse_bytes(bandwidth) if isinstance(bandwidth, str) else bandwidth),
        unknown_task_duration=float(parse_timedelta(unknown) or 0.0),
        worker_saturation=float(get("worker-saturation", defaults.worker_saturation)),
        work_stealing=bool(get("work-stealing", defaults.work_stealing)),
        seed=seed,
    )


def _serve(conn: Connection, name: str, config: PolicyConfig) -> None:
    policy = make_policy(name, config)
    conn.send_bytes(dumps(wanted_events(policy)))
    while True:
        try:
            request = conn.recv_bytes()
        except EOFError:
            return
        if not request:
            return
        events, now = loads(request)
        conn.send_bytes(dumps(policy.handle(events, now)))


class PolicyProcess:
    """A ``Policy`` whose ``handle`` runs in a child process."""

    def __init__(self, name: str, config: PolicyConfig | None = None) -> None:
        context = multiprocessing.get_context("spawn")
        self._conn, child_conn = context.Pipe()
        self._process = context.Process(
            target=_serve,
            args=(child_conn, name, config if config is not None else PolicyConfig()),
            name=f"dsched-policy-{name}",
            daemon=True,
        )
        self._process.start()
        child_conn.close()
        self._wants: frozenset[type] | None = None

    @property
    def wants(self) -> frozenset[type]:
        """The optional events the policy in the child wants (``wanted_events``)."""
        return self._receive_wants()

    def _receive_wants(self) -> frozenset[type]:
        """The child's first message, read once (waits for the child to build its policy)."""
        if self._wants is None:
            try:
                wants = loads(self._conn.recv_bytes())
            except (EOFError, OSError) as exc:
                raise PolicyProcessError(f"the policy process is gone: {exc!r}") from exc
            if not isinstance(wants, frozenset) or not wants <= OPTIONAL_EVENTS:
                raise PolicyProcessError(f"the policy process wants {wants!r:.200}")
            self._wants = wants
        return self._wants

    @property
    def pid(self) -> int | None:
        return self._process.pid

    def handle(self, events: Sequence[PolicyEvent], now: float) -> list[Decision]:
        self._receive_wants()  # the child's first message comes before any answer
        try:
            self._conn.send_bytes(dumps((list(events), now)))
            answer = loads(self._conn.recv_bytes())
        except (EOFError, OSError, BrokenPipeError) as exc:
            raise PolicyProcessError(f"the policy process is gone: {exc!r}") from exc
        if not isinstance(answer, list):
            raise PolicyProcessError(f"the policy process answered {answer!r:.200}")
        return answer

    def close(self, timeout: float = 5.0) -> None:
        """Ask the child to exit; kill it (by its PID, via the Process) if it does not."""
        with contextlib.suppress(OSError, BrokenPipeError):
            self._conn.send_bytes(b"")
        self._process.join(timeout)
        if self._process.is_alive():
            self._process.kill()
            self._process.join(timeout)
        self._conn.close()
