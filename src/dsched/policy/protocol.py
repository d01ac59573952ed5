"""The messages between the runtime (``state/``) and a scheduling policy.

Theory of operation
-------------------
The runtime owns the task state machine: dependencies, reference counts, who holds which
replica, what runs where. A policy answers one question: *which worker runs a task that is
ready*. The runtime tells the policy what it needs to know as a batch of events, and the
policy answers with decisions:

* ``WorkerAdded`` / ``WorkerRemoved`` / ``WorkerStatus``: the set of workers that may run tasks;
  ``WorkerResources``: a worker's resources changed (``Worker.set_resources``).
* ``TaskReady``: every dependency of the task is in memory. It carries what placement needs:
  the priority, each input's size and holders, and the workers allowed to run it.
* ``TaskDone``: a task the policy assigned is no longer running on that worker (it finished,
  erred, was released, seceded, or the assignment turned out stale). The runtime sends exactly
  one ``TaskDone`` per ``Assignment`` it accepted or rejected, so a policy can keep per-worker
  load by counting.
* ``TaskCancelled``: a ready task left the ready state before it was assigned (released by
  its clients, or its input was lost); a policy that queues tasks drops it.
* ``TaskAdded``: a task entered the runtime (from a graph, or scattered data), with its
  dependencies (task ids), its *prefix* (``dask.utils.key_split`` of the key: what Dask
  groups duration estimates by) and its priority. Sent once per task, before any other event
  about it; the tasks of one graph are announced together, so a task's dependencies were
  announced earlier or in the same run of ``TaskAdded`` events. A policy
  that needs the graph (b-level, per-prefix durations, root-task detection) keeps it from
  these; one that does not simply ignores them.
* ``TaskForgotten``: the runtime dropped the task for good; the id is never reused.

Decisions: ``Assignment(task, worker)`` runs the task there. When a policy cannot place a
task it says why, because the two cases wait for different things:

* ``NoWorker(task)``: a worker that satisfies the task's restrictions exists but none of them
  is running now (paused, retiring), or there are no workers at all yet. The runtime parks
  the task in ``no-worker`` and offers it again when a worker is added or starts running.
* ``Unplaceable(task, reason)``: no worker of the cluster, running or not, satisfies the
  restrictions (``resources={"GPU": 1}`` that no worker offers, ``workers=[...]`` naming no
  registered worker). The runtime parks it in ``no-worker`` too (clusters scale: Dask waits
  for a suitable worker to join), offers it again only when a worker is *added*, and logs
  one warning per task (aggregated per batch and reason), not one per offer. ``reason`` is
  a short human text ("no worker offers resources {'GPU': 1}").

Decide either only after folding the whole batch: a ``WorkerAdded`` later in the same batch
may be the worker the task needs, and the runtime offers parked tasks only for events that
come *after* the task was parked.

Work stealing: ``Steal(task, worker)`` asks the runtime to move a *processing* task to
``worker`` (the thief). The runtime sends Dask's ``steal-request`` to the worker running it
(the victim), which gives the task up only if it has not started it yet. Every ``Steal`` is
answered by exactly one ``StealResult(task, victim, thief, stolen)``:

* ``stolen=True``: the task now runs on the thief. The victim's assignment ended (a
  ``TaskDone(task, victim)`` precedes the result) and a ``TaskDone(task, thief)`` will end
  the thief's one, so per-worker load stays a matter of counting.
* ``stolen=False``: nothing moved. Either the steal was refused at once (the task is not
  processing, is long-running, already has a steal in flight, or the thief is not running),
  the victim had already started it, or the task left the victim (finished, erred, released,
  victim died) while the request was in flight: then its ``TaskDone`` came as usual. When the
  victim released the task but the thief is gone, the task is offered again (``TaskReady``).

Optional events
---------------
Three events are sent only to a policy that asks for them, because most policies do not need
them and the runtime should not pay for building them. A policy lists the ones it wants in a
class attribute, read once when the runtime is made (``wanted_events``); the default (no
attribute) is none::

    class MyPolicy:
        wants = frozenset({ReplicaAdded, ReplicaRemoved, BandwidthMeasured})

* ``ReplicaAdded(task, worker, nbytes)``: ``worker`` gained a copy of the task's result other
  than by computing it for an assignment: fetched as a dependency of a task it runs or on
  the scheduler's request (``add-keys``: retire, replicate), scattered or placed by
  ``update_data``, or computed a second time while the task was already in memory. Also the
  result of a task that seceded (``long-running``), whose ``TaskDone`` went out when it
  seceded. A result computed for an assignment is ``TaskDone(nbytes=...)``, not this.
* ``ReplicaRemoved(task, worker)``: ``worker`` no longer holds the result: freed because
  nobody needs it, dropped by the worker (``release-worker-data``), or the task was
  released. A worker that leaves loses every replica it held *without* one event per
  replica: ``WorkerRemoved`` says it (so a policy drops the worker from its replica map, or
  ignores ids of removed workers, which are never reused). With these, ``TaskDone`` and
  ``WorkerRemoved``, a policy's map ``task -> holders`` equals the runtime's ``who_has``
  after every batch (the property test checks it).
* ``BandwidthMeasured(bytes_per_second)``: the runtime's estimate of the transfer bandwidth
  between workers changed noticeably (by more than ``BANDWIDTH_CHANGE``). Until the first
  one, the configured ``distributed.scheduler.bandwidth`` holds. The estimate follows Dask's
  ``heartbeat_worker``: each worker heartbeat carries the worker's own estimate (a moving
  average over its transfers larger than 1 MB, with exact byte counts), blended in with
  weight ``1 / number of workers``. Why not a per-transfer event: the worker messages that
  describe single transfers (``startstops`` entries ``{"action": "transfer", "start",
  "stop", "source"}`` attached to one task per gather) carry no byte count, and one event per
  transfer would cost on the hot path what one per heartbeat costs per half second.

Every record is a slotted dataclass of ints, floats, tuples and strings, so the same
messages can cross a process boundary unchanged, and none is changed once made. The rare
ones say so with ``frozen=True``; the ones made per task (``TaskAdded``, ``TaskReady``,
``TaskInput``, ``TaskDone``, ``TaskCancelled``, ``TaskForgotten``, ``Assignment``) are
hashable without it, because a frozen dataclass sets each field through
``object.__setattr__``: 680 against 133 ns for eight fields, about 2 us a task in all
(``benchmarks/state_hotpath.py tree 14``: 25.1 -> 22.3 us a task, with ``TaskFinished``
and ``NewTask`` of ``dsched.state.events``). Task and worker ids are small ints chosen by
the runtime; Dask keys and addresses never reach a policy.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

# A task's priority as Dask defines it: (-user_priority, generation, graph order). Smaller runs
# first.
Priority = tuple[float, ...]


@dataclass(frozen=True, slots=True)
class WorkerAdded:
    worker: int
    nthreads: int
    resources: tuple[tuple[str, float], ...] = ()
    running: bool = True


@dataclass(frozen=True, slots=True)
class WorkerRemoved:
    worker: int


@dataclass(frozen=True, slots=True)
class WorkerResources:
    """The worker now offers these resources (all of them; ``Worker.set_resources``)."""

    worker: int
    resources: tuple[tuple[str, float], ...]


@dataclass(frozen=True, slots=True)
class WorkerStatus:
    """Only running workers may be given tasks (paused or retiring ones may not)."""

    worker: int
    running: bool


@dataclass(slots=True, unsafe_hash=True)
class TaskInput:
    """One dependency of a ready task: its size in bytes and the workers holding a replica."""

    nbytes: int
    holders: tuple[int, ...]


@dataclass(slots=True, unsafe_hash=True)
class TaskReady:
    task: int
    priority: Priority
    inputs: tuple[TaskInput, ...] = ()
    # Workers allowed to run the task; None means any worker.
    allowed: frozenset[int] | None = None
    # With loose restrictions the task may run elsewhere when no allowed worker is running.
    loose: bool = False
    # Abstract resources the worker must offer (``resources=`` annotation).
    resources: tuple[tuple[str, float], ...] = ()
    # dask.utils.key_split of the key (as in TaskAdded).
    prefix: str = ""
    # False: never hold it in a root-task queue, however root-ish it looks (P2P outputs).
    queueable: bool = True


@dataclass(slots=True, unsafe_hash=True)
class TaskDone:
    task: int
    worker: int
    # Measured compute seconds when known (from the worker's startstops), else None.
    duration: float | None = None
    # Size of the result when the task finished into memory, else None.
    nbytes: int | None = None


@dataclass(slots=True, unsafe_hash=True)
class TaskCancelled:
    task: int


@dataclass(slots=True, unsafe_hash=True)
class TaskAdded:
    task: int
    priority: Priority
    dependencies: tuple[int, ...] = ()
    # dask.utils.key_split of the key, e.g. "inc" for "inc-8b1a...": the duration group.
    prefix: str = ""


@dataclass(slots=True, unsafe_hash=True)
class TaskForgotten:
    task: int


@dataclass(frozen=True, slots=True)
class StealResult:
    task: int
    victim: int
    thief: int
    stolen: bool


@dataclass(frozen=True, slots=True)
class ReplicaAdded:
    """``worker`` holds a copy of ``task``'s result, not computed there for an assignment
    (optional: see ``wants``)."""

    task: int
    worker: int
    nbytes: int


@dataclass(frozen=True, slots=True)
class ReplicaRemoved:
    """``worker`` no longer holds ``task``'s result (optional; not sent when the worker
    itself leaves: ``WorkerRemoved`` covers its replicas)."""

    task: int
    worker: int


@dataclass(frozen=True, slots=True)
class BandwidthMeasured:
    """The runtime's estimate of the transfer bandwidth between workers (optional)."""

    bytes_per_second: float


PolicyEvent = (
    WorkerAdded
    | WorkerRemoved
    | WorkerStatus
    | WorkerResources
    | TaskReady
    | TaskDone
    | TaskCancelled
    | TaskAdded
    | TaskForgotten
    | StealResult
    | ReplicaAdded
    | ReplicaRemoved
    | BandwidthMeasured
)

# Events a policy receives only if its ``wants`` attribute lists them.
OPTIONAL_EVENTS: frozenset[type] = frozenset({ReplicaAdded, ReplicaRemoved, BandwidthMeasured})
# The relative change of the bandwidth estimate that is worth a BandwidthMeasured.
BANDWIDTH_CHANGE = 0.05


def wanted_events(policy: object) -> frozenset[type]:
    """The optional events ``policy`` asked for with its ``wants`` attribute (none without).

    Read once, when the runtime is made for the policy; anything that is not an optional
    event is a mistake in the policy and refused."""
    wants = frozenset(getattr(policy, "wants", frozenset()))
    unknown = wants - OPTIONAL_EVENTS
    if unknown:
        names = sorted(getattr(t, "__name__", repr(t)) for t in unknown)
        optional = sorted(t.__name__ for t in OPTIONAL_EVENTS)
        raise ValueError(f"{type(policy).__name__}.wants: {names} are not among {optional}")
    return wants


@dataclass(slots=True, unsafe_hash=True)
class Assignment:
    task: int
    worker: int


@dataclass(frozen=True, slots=True)
class NoWorker:
    task: int


@dataclass(frozen=True, slots=True)
class Unplaceable:
    """No worker of the cluster, running or not, satisfies the task's restrictions; the task
    waits for one to join. ``reason`` says what is missing, for the scheduler's log."""

    task: int
    reason: str


@dataclass(frozen=True, slots=True)
class Steal:
    """Move a processing task to ``worker`` if its current worker has not started it."""

    task: int
    worker: int


Decision = Assignment | NoWorker | Unplaceable | Steal


class Policy(Protocol):
    """A placement policy: pure, deterministic given its seed, never reads the clock.

    It may also have a ``wants`` attribute (a frozenset of ``OPTIONAL_EVENTS`` classes, see
    the module docstring); a Protocol cannot declare an optional attribute, so
    ``wanted_events(policy)`` reads it."""

    def handle(self, events: Sequence[PolicyEvent], now: float) -> list[Decision]:
        """Take a batch of events (in order) and return the decisions they lead to."""
        ...
