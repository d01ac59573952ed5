"""The records of the state machine: one ``TaskState`` per key, one ``WorkerState`` per
worker address, one ``ClientState`` per client id.

Theory of operation
-------------------
Records are plain slotted objects that point at each other (a task's dependencies and
dependents, its holders ``who_has``, the worker running it, the clients wanting it); the
engine keeps both sides of every relation in step and ``validate()`` checks that it does.
They hold no logic beyond construction. ``TaskState.state`` is written by ``__init__``
(``released``) and otherwise only by ``Engine._move``, which checks each change against
``dsched.state.edges.EDGES``.

Memory is per task, and a graph may have millions of tasks: an empty ``set`` costs 216
bytes. Most tasks are wanted by no client and never err anywhere: those share the empty
frozensets ``NOBODY`` / ``NOWHERE`` instead of two empty sets each (see ``unwant`` and
``Engine._want``). A task's holders (``who_has``) and the inputs it waits for
(``waiting_on``) start as the shared ``NOTHING`` and get a set of their own when something
is added; ``NOTHING`` reads like an empty set and its ``discard``/``clear`` do nothing, so
only the sites that add must care (mypy makes them: it has no ``add``), and emptying sites
put ``NOTHING`` back. At the peak (a whole graph taken in, nothing run yet) no task holds
data and root tasks wait for nothing: 216-432 bytes a task saved.

A task's ``dependents`` and ``waiters`` (the dependents that still need its data) are
*groups*: a tuple of up to ``SMALL_GROUP`` members (56 bytes for one, 8 a member more),
past that a set, changed only through ``group_add`` / ``group_discard``, which return the
group to store. Most tasks feed one to a few others, so this saves about 320 bytes a task
against two sets, and a tuple is quicker to walk; a P2P barrier's thousands of dependents
are a set, where membership is a hash.
"""

from __future__ import annotations

from typing import Any

from dsched.state import events as ev
from dsched.state.edges import RELEASED

Key = Any

# Shared empty values of TaskState.who_wants / erred_on (never mutated: replaced by a set).
NOBODY: frozenset[ClientState] = frozenset()
NOWHERE: frozenset[str] = frozenset()


class Nothing(frozenset[Any]):
    """The type of ``NOTHING``: an empty frozenset whose ``discard`` and ``clear`` are no-ops,
    so code that removes from a ``who_has`` / ``waiting_on`` works on it unchanged."""

    __slots__ = ()

    def discard(self, item: object) -> None:
        pass

    def clear(self) -> None:
        pass


# Shared empty value of TaskState.who_has / waiting_on until something is added.
NOTHING = Nothing()

# Up to this many members, a group (dependents, waiters) is a tuple; past it, a set.
SMALL_GROUP = 8

Group = tuple["TaskState", ...] | set["TaskState"]


def group_add(group: Group, ts: TaskState) -> Group:
    """``group`` with ``ts`` in it: the group to store (a new tuple, or the same set)."""
    if isinstance(group, tuple):
        if ts in group:
            return group
        if len(group) < SMALL_GROUP:
            return (*group, ts)
        return {*group, ts}
    group.add(ts)
    return group


def group_discard(group: Group, ts: TaskState) -> Group:
    """``group`` without ``ts``: the group to store (an emptied set becomes ``()``)."""
    if isinstance(group, tuple):
        if ts in group:
            return tuple([member for member in group if member is not ts])
        return group
    group.discard(ts)
    return group if group else ()


def unwant(ts: TaskState, cs: ClientState) -> None:
    """``cs`` no longer wants ``ts``: drop it, and the set with it once empty."""
    wants = ts.who_wants
    if isinstance(wants, set):
        wants.discard(cs)
        if not wants:
            ts.who_wants = NOBODY


class TaskState:
    __slots__ = (
        "actor",
        "annotations",
        "dependencies",
        "dependents",
        "erred_on",
        "exception",
        "exception_blame",
        "exception_text",
        "id",
        "key",
        "long_running",
        "loose_restrictions",
        "nbytes",
        "prefix",
        "priority",
        "processing_on",
        "resource_restrictions",
        "retries",
        "run_id",
        "run_spec",
        "state",
        "suspicious",
        "traceback",
        "type",
        "unplaceable_reason",
        "waiters",
        "waiting_on",
        "who_has",
        "who_wants",
        "worker_restrictions",
    )

    def __init__(self, key: Key, task_id: int, run_spec: object, annotations: Any) -> None:
        self.key = key
        self.id = task_id
        self.run_spec = run_spec  # None for data placed by scatter: cannot be recomputed
        self.annotations = annotations
        self.state = RELEASED
        # Fixed when the task is created: a tuple (a frozenset past a few inputs, where
        # membership is tested), NOTHING for a root task.
        self.dependencies: tuple[TaskState, ...] | frozenset[TaskState] = NOTHING
        self.dependents: Group = ()
        self.waiting_on: set[TaskState] | Nothing = NOTHING
        self.waiters: Group = ()
        # Most tasks are wanted by no client and never err anywhere: those share one empty
        # frozenset instead of two empty sets (432 bytes a task); see _want/_unwant.
        self.who_wants: set[ClientState] | frozenset[ClientState] = NOBODY
        self.who_has: set[WorkerState] | Nothing = NOTHING
        self.processing_on: WorkerState | None = None
        self.long_running = False
        self.run_id: int | None = None
        self.priority: tuple[float, ...] = (0, 0, 0)
        self.prefix = ""  # key_split(key): the policy's duration group, set on creation
        self.nbytes = 0
        self.type: object = None
        self.retries = 0
        self.suspicious = 0
        self.exception: object = None
        self.traceback: object = None
        self.exception_text = ""
        self.exception_blame: TaskState | None = None
        self.erred_on: set[str] | frozenset[str] = NOWHERE
        self.worker_restrictions: frozenset[str] | None = None
        self.loose_restrictions = False
        self.resource_restrictions: dict[str, float] | None = None
        # Why the policy last found no worker that could ever run it (logged once); reset
        # when it is assigned.
        self.unplaceable_reason: str | None = None
        # An actor (update-graph's ``actors``): a stateful object living on the one worker
        # that computed it. Never replicated, moved, stolen, rebalanced or dropped (code
        # copying or dropping replicas must check this); lost with its worker: erred.
        self.actor = False

    def __repr__(self) -> str:
        return f"<TaskState {self.key!r} {self.state}>"


class WorkerState:
    __slots__ = (
        "actors",
        "address",
        "has_what",
        "host",
        "id",
        "info",
        "memory_limit",
        "name",
        "nthreads",
        "processing",
        "resources",
        "status",
    )

    def __init__(self, worker_id: int, event: ev.WorkerConnected) -> None:
        self.id = worker_id
        self.address = event.address
        self.host = host_of(event.address)
        self.name = event.name if event.name is not None else event.address
        self.nthreads = event.nthreads
        self.memory_limit = event.memory_limit
        self.resources = dict(event.resources)
        self.status = event.status
        self.info = event.info
        self.processing: set[TaskState] = set()
        self.has_what: set[TaskState] = set()
        # The actor tasks processing here or in memory here (Dask's ``WorkerState.actors``).
        self.actors: set[TaskState] = set()

    def __repr__(self) -> str:
        return f"<WorkerState {self.address} {self.status}>"


class ClientState:
    __slots__ = ("id", "wants")

    def __init__(self, client_id: str) -> None:
        self.id = client_id
        self.wants: set[TaskState] = set()

    def __repr__(self) -> str:
        return f"<ClientState {self.id}>"


def host_of(address: str) -> str:
    """'tcp://127.0.0.1:8786' -> '127.0.0.1'; '[::1]' keeps its brackets off."""
    location = address.split("://", 1)[-1]
    host = location.rsplit(":", 1)[0]
    return host.strip("[]")
