"""Stimuli: everything that can happen to the scheduler's task state.

Each event is a slotted record, never changed once made (``frozen=True`` but for the two made
per task: see ``dsched.policy.protocol``), built by the reactor from one peer message (or from a
policy decision) and handed to ``SchedulerState.handle(event, now)``. Events carry Dask keys
and addresses as they came off the wire; payloads (run_specs, exceptions, result types) are
opaque objects the state machine stores and forwards but never looks into.

``stimulus_id``: the events of a worker's messages carry the id the worker sent (every
message of distributed's ``SendMessageToScheduler`` and ``worker-status-change`` has one),
others the id of the reactor's action (a worker removed, a restart, a retirement). Empty
means none: ``SchedulerState.handle`` then makes one up (``"<EventName>-<now>"``). It
becomes the ``stimulus_id`` of every message the event causes and of its moves in the
transition log.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from dsched.policy.protocol import Decision

Key = Any  # str | bytes | int | float | tuple[Key, ...], hashable


class TaskSpecLike(Protocol):
    """What the state machine reads of a task in a received graph (graph intake's TaskSpec
    has these attributes, so its records are used as they are, without copying)."""

    @property
    def key(self) -> Key: ...
    @property
    def dependencies(self) -> tuple[Key, ...]: ...
    @property
    def run_spec(self) -> object: ...
    @property
    def annotations(self) -> Mapping[str, Any]: ...


# Per task, so not frozen= (see dsched.policy.protocol); never changed once made.
@dataclass(slots=True, unsafe_hash=True)
class NewTask:
    """One task of a received graph, after intake (materialized, culled, run_spec pickled)."""

    key: Key
    dependencies: tuple[Key, ...]
    run_spec: object  # opaque; sent to workers as compute-task.run_spec
    annotations: Mapping[str, Any]


# ----------------------------------------------------------------------------- clients
@dataclass(frozen=True, slots=True)
class ClientConnected:
    client: str


@dataclass(frozen=True, slots=True)
class ClientDisconnected:
    client: str


@dataclass(frozen=True, slots=True)
class GraphReceived:
    client: str
    tasks: Sequence[TaskSpecLike]
    keys: Sequence[Key]  # what the client holds futures for
    order: Mapping[Key, int]  # internal priority
    # Global user priority (the ``priority`` annotation of the whole call).
    user_priority: float = 0
    fifo_timeout: float = 0.1
    submitting_task: Key | None = None
    stimulus_id: str = ""
    # update-graph's ``actors``: True (every key in ``keys``) or the keys that are actors.
    actors: bool | Sequence[Key] = ()
    # The ``ShuffleSpec`` of each P2P barrier task of the graph, by barrier key: opaque here,
    # kept by the P2P extension (``dsched.ext.p2p``), which observes this event.
    shuffle_specs: Mapping[Key, Any] = field(default_factory=dict)
    # A big graph comes in parts (``dsched.state.slicing``): this one's index; what the
    # client's intake holder must keep for later parts (None: this is the last part, or the
    # whole graph); the held keys whose last user is in this part.
    part: int = 0
    hold: Sequence[Key] | None = None
    release: Sequence[Key] = ()


@dataclass(frozen=True, slots=True)
class GraphFailed:
    """The graph could not be unpickled or materialized: every requested key errs."""

    client: str
    keys: Sequence[Key]
    exception: object
    traceback: object


@dataclass(frozen=True, slots=True)
class ClientDesiresKeys:
    client: str
    keys: Sequence[Key]


@dataclass(frozen=True, slots=True)
class ClientReleasesKeys:
    client: str
    keys: Sequence[Key]


@dataclass(frozen=True, slots=True)
class CancelKeys:
    client: str
    keys: Sequence[Key]
    force: bool = False
    reason: str | None = None
    msg: str | None = None


@dataclass(frozen=True, slots=True)
class ReportKey:
    client: str
    key: Key


@dataclass(frozen=True, slots=True)
class DataPlaced:
    """Data put on workers from outside (``scatter`` / ``update_data``), wanted by a client.

    Without a client nobody holds the data, so only replicas of keys already in memory are
    recorded (as Dask's ``update_data`` with no client)."""

    client: str | None
    who_has: Mapping[Key, Sequence[str]]
    nbytes: Mapping[Key, int]


@dataclass(frozen=True, slots=True)
class RetryKeys:
    client: str
    keys: Sequence[Key]


# ----------------------------------------------------------------------------- workers
@dataclass(frozen=True, slots=True)
class WorkerConnected:
    address: str
    nthreads: int
    name: Any = None
    memory_limit: int | None = None
    resources: Mapping[str, float] = field(default_factory=dict)
    status: str = "running"
    # Everything else the worker told us at registration; reported by ``identity``.
    info: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class WorkerDisconnected:
    address: str
    # An expected loss (retire, close) does not count against the tasks it was running.
    expected: bool = False
    stimulus_id: str = ""


@dataclass(frozen=True, slots=True)
class WorkerStatusChanged:
    address: str
    status: str
    stimulus_id: str = ""


# Per task, so not frozen= (see dsched.policy.protocol); never changed once made.
@dataclass(slots=True, unsafe_hash=True)
class TaskFinished:
    worker: str
    key: Key
    run_id: int | None
    nbytes: int
    type: object = None  # pickled class bytes, forwarded to clients as key-in-memory.type
    duration: float | None = None
    stimulus_id: str = ""
    # The worker's message as decoded (a reference, no copy): the task stream reads its
    # startstops, thread, typename and metadata.
    msg: Mapping[str, Any] | None = field(default=None, compare=False, repr=False)


@dataclass(frozen=True, slots=True)
class TaskErred:
    worker: str
    key: Key
    run_id: int | None
    exception: object
    traceback: object
    exception_text: str = ""
    traceback_text: str = ""
    stimulus_id: str = ""
    msg: Mapping[str, Any] | None = field(default=None, compare=False, repr=False)


@dataclass(frozen=True, slots=True)
class ReleaseWorkerData:
    worker: str
    key: Key
    stimulus_id: str = ""


@dataclass(frozen=True, slots=True)
class AddKeys:
    worker: str
    keys: Sequence[Key]
    stimulus_id: str = ""


@dataclass(frozen=True, slots=True)
class RequestRefreshWhoHas:
    worker: str
    keys: Sequence[Key]
    stimulus_id: str = ""


@dataclass(frozen=True, slots=True)
class LongRunning:
    worker: str
    key: Key
    run_id: int | None = None
    stimulus_id: str = ""


@dataclass(frozen=True, slots=True)
class Reschedule:
    worker: str
    key: Key
    stimulus_id: str = ""


@dataclass(frozen=True, slots=True)
class StealResponse:
    """The victim's answer to a ``steal-request``: its local state of the task."""

    worker: str
    key: Key
    state: str | None
    # The steal-request's id, echoed: it tells which steal this answers.
    stimulus_id: str = ""


@dataclass(frozen=True, slots=True)
class BandwidthReported:
    """A worker's heartbeat: its own estimate of its transfer bandwidth, bytes per second
    (``metrics["bandwidth"]["total"]``: a moving average over its transfers of more than
    1 MB, starting at ``distributed.scheduler.bandwidth``)."""

    worker: str
    bytes_per_second: float


# ----------------------------------------------------------------------------- cluster-wide
@dataclass(frozen=True, slots=True)
class Restart:
    """``restart``: every client lets go of every key; clients are told to reset."""

    stimulus_id: str = ""


@dataclass(frozen=True, slots=True)
class RetireWorkers:
    """Start (or keep) retiring these workers: no new tasks for them, and every key whose
    only replicas are on them is copied to another running worker (``acquire-replicas``).
    Idempotent; the reactor repeats it until ``SchedulerState.unique_keys_on`` is empty and
    then removes the workers (``WorkerDisconnected(expected=True)``)."""

    addresses: Sequence[str]
    stimulus_id: str = ""


@dataclass(frozen=True, slots=True)
class WorkerResourcesSet:
    """``set_resources`` (``Worker.set_resources``): the worker now offers these resources
    (merged into what it offered, as Dask's ``add_resources``)."""

    address: str
    resources: Mapping[str, float]
    stimulus_id: str = ""


@dataclass(frozen=True, slots=True)
class DropReplicas:
    """Drop these replicas from ``worker`` (Dask's ``request_remove_replicas``, used by the
    active memory manager, ``replicate`` and ``rebalance``): forgotten by the scheduler at
    once and ``remove-replicas`` sent; never a key's last replica. A worker that must keep
    one answers ``add-keys``, which adds it back."""

    worker: str
    keys: Sequence[Key]
    stimulus_id: str = ""


@dataclass(frozen=True, slots=True)
class SetWorkerRestrictions:
    """Dask's ``Scheduler.set_restrictions``: each task may run only on the workers named
    (addresses, hosts or names; ``None`` lifts the restriction), from its next offer to the
    policy on. P2P pins a shuffle's output tasks with it. Unknown keys are skipped."""

    restrictions: Mapping[Key, frozenset[str] | None]
    stimulus_id: str = ""


@dataclass(frozen=True, slots=True)
class DisallowQueuing:
    """Never hold these tasks in a policy's root-task queue (Dask's ``_queueable = False``):
    P2P output tasks look root-ish but must reach the workers at once, where most of them
    pin themselves and reschedule."""

    keys: Sequence[Key]
    stimulus_id: str = ""


@dataclass(frozen=True, slots=True)
class RecomputeTasks:
    """Throw away these tasks' results and runs: replicas are freed, runs cancelled, and
    each task that is still needed is computed again (its running dependents restart).
    P2P restarts a shuffle with it (Dask's ``transitions({key: "released"})``, which a
    task's waiters do not stop). Erred, waiting and released tasks and unknown keys are
    left as they are."""

    keys: Sequence[Key]
    stimulus_id: str = ""


# ----------------------------------------------------------------------------- policy
@dataclass(frozen=True, slots=True)
class PolicyDecisions:
    decisions: Sequence[Decision]


Event = (
    ClientConnected
    | ClientDisconnected
    | GraphReceived
    | GraphFailed
    | ClientDesiresKeys
    | ClientReleasesKeys
    | CancelKeys
    | ReportKey
    | DataPlaced
    | RetryKeys
    | WorkerConnected
    | WorkerDisconnected
    | WorkerStatusChanged
    | TaskFinished
    | TaskErred
    | ReleaseWorkerData
    | AddKeys
    | RequestRefreshWhoHas
    | LongRunning
    | Reschedule
    | StealResponse
    | BandwidthReported
    | Restart
    | RetireWorkers
    | WorkerResourcesSet
    | DropReplicas
    | SetWorkerRestrictions
    | DisallowQueuing
    | RecomputeTasks
    | PolicyDecisions
)
