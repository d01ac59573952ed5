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

Decisions: ``Assignment(task, worker)`` runs the task there; ``NoWorker(task)`` says no
running worker can take it now (the runtime parks it and offers it again when workers change).

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


@dataclass(frozen=True, slots=True)
class TaskDone:
    task: int
    worker: int
    # Measured compute seconds when known (from the worker's startstops), else None.
    duration: float | None = None


@dataclass(frozen=True, slots=True)
class TaskCancelled:
    task: int


PolicyEvent = WorkerAdded | WorkerRemoved | WorkerStatus | TaskReady | TaskDone | TaskCancelled


@dataclass(frozen=True, slots=True)
class Assignment:
    task: int
    worker: int


@dataclass(frozen=True, slots=True)
class NoWorker:
    task: int


Decision = Assignment | NoWorker


class Policy(Protocol):
    """A placement policy: pure, deterministic given its seed, never reads the clock."""

    def handle(self, events: Sequence[PolicyEvent], now: float) -> list[Decision]:
        """Take a batch of events (in order) and return the decisions they lead to."""
        ...
