"""The messages between the runtime (``state/``) and a scheduling policy.

Theory of operation
-------------------
The runtime owns the task state machine: dependencies, reference counts, who holds which
replica, what runs where. A policy answers one question: *which worker runs a task that is
ready*. The runtime tells the policy what it needs to know as a batch of events, and the
policy answers with decisions:

* ``WorkerAdded`` / ``WorkerRemoved`` / ``WorkerStatus``: the set of workers that may run tasks.
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

Decisions: ``Assignment(task, worker)`` runs the task there; ``NoWorker(task)`` says no
running worker can take it now (the runtime parks it and offers it again when workers change).

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

Every record is a frozen, slotted dataclass of ints, floats, tuples and strings, so the same
messages can cross a process boundary unchanged. Task and worker ids are small ints chosen by
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
class WorkerStatus:
    """Only running workers may be given tasks (paused or retiring ones may not)."""

    worker: int
    running: bool


@dataclass(frozen=True, slots=True)
class TaskInput:
    """One dependency of a ready task: its size in bytes and the workers holding a replica."""

    nbytes: int
    holders: tuple[int, ...]


@dataclass(frozen=True, slots=True)
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


@dataclass(frozen=True, slots=True)
class TaskDone:
    task: int
    worker: int
    # Measured compute seconds when known (from the worker's startstops), else None.
    duration: float | None = None
    # Size of the result when the task finished into memory, else None.
    nbytes: int | None = None


@dataclass(frozen=True, slots=True)
class TaskCancelled:
    task: int


@dataclass(frozen=True, slots=True)
class TaskAdded:
    task: int
    priority: Priority
    dependencies: tuple[int, ...] = ()
    # dask.utils.key_split of the key, e.g. "inc" for "inc-8b1a...": the duration group.
    prefix: str = ""


@dataclass(frozen=True, slots=True)
class TaskForgotten:
    task: int


@dataclass(frozen=True, slots=True)
class StealResult:
    task: int
    victim: int
    thief: int
    stolen: bool


PolicyEvent = (
    WorkerAdded
    | WorkerRemoved
    | WorkerStatus
    | TaskReady
    | TaskDone
    | TaskCancelled
    | TaskAdded
    | TaskForgotten
    | StealResult
)


@dataclass(frozen=True, slots=True)
class Assignment:
    task: int
    worker: int


@dataclass(frozen=True, slots=True)
class NoWorker:
    task: int


@dataclass(frozen=True, slots=True)
class Steal:
    """Move a processing task to ``worker`` if its current worker has not started it."""

    task: int
    worker: int


Decision = Assignment | NoWorker | Steal


class Policy(Protocol):
    """A placement policy: pure, deterministic given its seed, never reads the clock."""

    def handle(self, events: Sequence[PolicyEvent], now: float) -> list[Decision]:
        """Take a batch of events (in order) and return the decisions they lead to."""
        ...
