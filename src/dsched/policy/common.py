"""What every built-in policy shares: configuration, per-worker load, restrictions, stealing.

Theory of operation
-------------------
``BasePolicy.handle(events, now)`` folds a batch of events into a small model of the cluster,
then asks the subclass to ``schedule()`` what is pending and, if the policy steals, to
``balance()`` the load:

* Workers: ``WorkerInfo`` per worker id (threads, resources, running or not) and the tasks
  assigned to it, each with the duration estimate it was assigned with. ``occupancy`` is the
  sum of those estimates; count-based policies estimate every task at 1.0, so occupancy is
  the number of tasks. A ``LoadIndex`` (lazy min-heap) gives the least occupied running
  worker per thread in O(log workers) amortised, so placing an unrestricted task never scans
  every worker.
* Tasks: ``pending`` holds ready tasks not decided yet (``TaskCancelled`` drops them);
  ``placed`` maps an assigned task to its worker. The runtime sends one ``TaskDone`` per
  assignment and a ``StealResult`` per ``Steal``, so the model only counts.
* Graph: ``TaskAdded`` events build the ``dependencies`` map and a b-level (longest path
  to a sink, in tasks) computed per announced batch in O(tasks + edges).
  ``TaskForgotten`` drops a task's records.
* Restrictions: ``candidates(event)`` returns None for an unrestricted task (any running
  worker) or the running workers that satisfy ``allowed``/``resources`` (falling back to any
  running worker offering the resources when the restriction is loose and no allowed worker
  runs). Restricted tasks are never stolen. When there is no candidate, ``no_worker(event)``
  says which of the two cases it is: ``Unplaceable`` when no worker at all (running or not)
  satisfies the restrictions (``unplaceable_reason``, O(workers), only on this path), else
  ``NoWorker``.
* Optional events (a subclass lists them in ``wants``): ``BandwidthMeasured`` replaces the
  configured bandwidth (``self.bandwidth``). With ``ReplicaAdded`` wanted, ``replicas`` maps
  each task in memory to the workers holding it (from ``TaskDone(nbytes=...)``,
  ``ReplicaAdded`` and ``ReplicaRemoved``), and ``local_bytes`` counts what each worker
  holds *now*, not when the task became ready (``TaskReady.inputs``): copies made since, by
  other tasks' fetches in the same batch or while the task waited in a queue, count. Ids of
  removed workers may linger in ``replicas`` (never reused, they match no running worker)
  until the task's entry goes.
* Stealing (``balance``, once per batch, O(workers + steals)): a running worker with fewer
  tasks than threads (counting steals on their way to it) takes tasks from the worker with
  the largest surplus of assigned-but-probably-not-started tasks, newest assignments first.
  A task whose steal failed is not tried again.

Nothing here reads a clock, draws unseeded randomness or does I/O.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import ClassVar, Protocol

from dsched.policy.protocol import (
    Assignment,
    BandwidthMeasured,
    Decision,
    NoWorker,
    PolicyEvent,
    ReplicaAdded,
    ReplicaRemoved,
    Steal,
    StealResult,
    TaskAdded,
    TaskCancelled,
    TaskDone,
    TaskForgotten,
    TaskReady,
    Unplaceable,
    WorkerAdded,
    WorkerRemoved,
    WorkerResources,
    WorkerStatus,
)


@dataclass(frozen=True, slots=True)
class PolicyConfig:
    """Tunables, with Dask's defaults. The shell fills them from ``dask.config``."""

    # distributed.scheduler.bandwidth, bytes per second.
    bandwidth: float = 100e6
    # distributed.scheduler.unknown-task-duration, seconds.
    unknown_task_duration: float = 0.5
    # distributed.scheduler.worker-saturation (float("inf") disables root-task queuing).
    worker_saturation: float = 1.1
    # distributed.scheduler.work-stealing.
    work_stealing: bool = True
    # Seed of the policy's random choices.
    seed: int = 0


class WorkerInfo:
    __slots__ = ("assigned", "id", "incoming", "nthreads", "occupancy", "resources", "running")

    def __init__(self, event: WorkerAdded) -> None:
        self.id = event.worker
        self.nthreads = max(event.nthreads, 1)
        self.resources = dict(event.resources)
        self.running = event.running
        # task -> the duration estimate it was assigned with; insertion order = assignment order
        self.assigned: dict[int, float] = {}
        self.occupancy = 0.0
        self.incoming = 0  # steals in flight towards this worker

    def offers(self, resources: Iterable[tuple[str, float]]) -> bool:
        return all(self.resources.get(name, 0.0) >= amount for name, amount in resources)

    def load(self) -> float:
        return self.occupancy / self.nthreads

    def __repr__(self) -> str:
        return f"<WorkerInfo {self.id} tasks={len(self.assigned)} running={self.running}>"


class OffersResources(Protocol):
    def offers(self, resources: tuple[tuple[str, float], ...]) -> bool: ...


def unplaceable_reason(event: TaskReady, workers: Mapping[int, OffersResources]) -> str | None:
    """Why no worker of the cluster (running or not) can ever run the task, or None if one
    can, or if there are no workers at all (a cluster still starting is not a mistake).

    ``event.allowed`` holds the registered workers the restriction names (the runtime
    resolves addresses, hosts and names). A loose restriction may fall back to any worker
    offering the resources."""
    allowed = event.allowed
    if not workers or (allowed is None and not event.resources):
        return None
    strict = allowed is not None and not event.loose
    if allowed is not None and strict:
        pool = [workers[w] for w in allowed if w in workers]
        if not pool:
            return "none of the workers it is restricted to is connected"
    else:
        pool = list(workers.values())
    if any(w.offers(event.resources) for w in pool):
        return None
    which = "allowed worker" if strict else "worker"
    return f"no {which} offers resources {dict(event.resources)}"


class LoadIndex:
    """The running worker with the lowest key, in O(log n) amortised (lazy deletion)."""

    __slots__ = ("_heap", "_key")

    def __init__(self) -> None:
        self._key: dict[int, float] = {}
        self._heap: list[tuple[float, int]] = []

    def set(self, worker: int, key: float) -> None:
        if self._key.get(worker) == key:
            return
        self._key[worker] = key
        heapq.heappush(self._heap, (key, worker))
        if len(self._heap) > 4 * len(self._key) + 64:
            self._heap = [(k, w) for w, k in self._key.items()]
            heapq.heapify(self._heap)

    def discard(self, worker: int) -> None:
        self._key.pop(worker, None)

    def best(self) -> int | None:
        heap = self._heap
        while heap:
            key, worker = heap[0]
            if self._key.get(worker) == key:
                return worker
            heapq.heappop(heap)
        return None


class BasePolicy:
    """Bookkeeping shared by the built-in policies; subclasses implement ``schedule``."""

    # Whether ``balance`` runs after every batch (subclasses or config switch it on).
    steals = False
    # The optional events to receive (``protocol.wanted_events``); handled here.
    wants: ClassVar[frozenset[type]] = frozenset()

    def __init__(self, config: PolicyConfig | None = None) -> None:
        self.config = config if config is not None else PolicyConfig()
        self.workers: dict[int, WorkerInfo] = {}
        self.running: dict[int, WorkerInfo] = {}
        self.total_threads = 0
        self.index = LoadIndex()
        self.pending: dict[int, TaskReady] = {}
        self.placed: dict[int, int] = {}  # assigned task -> worker id
        self.restricted: set[int] = set()  # assigned tasks that must not be stolen
        self.input_bytes: dict[int, int] = {}  # assigned task -> total bytes of its inputs
        self.in_flight: dict[int, int] = {}  # task -> thief, for steals not answered yet
        self.unstealable: set[int] = set()
        self.dependencies: dict[int, tuple[int, ...]] = {}
        self.blevel: dict[int, int] = {}
        self.now = 0.0
        # distributed.scheduler.bandwidth until the runtime measures it (BandwidthMeasured).
        self.bandwidth = self.config.bandwidth
        self.tracks_replicas = ReplicaAdded in self.wants
        self.replicas: dict[int, set[int]] = {}  # task in memory -> holders (if tracked)
        self.result_nbytes: dict[int, int] = {}  # task in memory -> size (if tracked)

    # ------------------------------------------------------------------ entry point
    def handle(self, events: Sequence[PolicyEvent], now: float) -> list[Decision]:
        self.now = now
        added: list[TaskAdded] = []
        for event in events:
            if isinstance(event, TaskReady):
                self.pending[event.task] = event
                self.on_ready(event)
            elif isinstance(event, TaskDone):
                self._task_done(event)
            # Next in frequency when wanted (about one per task freed or fetched).
            elif isinstance(event, ReplicaRemoved):
                self._replica_removed(event.task, event.worker)
            elif isinstance(event, ReplicaAdded):
                self._replica_added(event.task, event.worker, event.nbytes)
            elif isinstance(event, TaskAdded):
                added.append(event)
            elif isinstance(event, TaskCancelled):
                self.pending.pop(event.task, None)
                self.on_cancelled(event.task)
            elif isinstance(event, TaskForgotten):
                if added:
                    self._graph_added(added)
                    added = []
                self._forget(event.task)
            elif isinstance(event, StealResult):
                self._steal_result(event)
            elif isinstance(event, WorkerAdded):
                self._worker_added(event)
            elif isinstance(event, WorkerRemoved):
                self._worker_removed(event.worker)
            elif isinstance(event, WorkerStatus):
                self._worker_status(event)
            elif isinstance(event, WorkerResources):
                worker = self.workers.get(event.worker)
                if worker is not None:
                    worker.resources = dict(event.resources)
            elif isinstance(event, BandwidthMeasured):
                self.bandwidth = event.bytes_per_second
        if added:
            self._graph_added(added)
        decisions = self.schedule()
        if self.steals and self.config.work_stealing:
            decisions.extend(self.balance())
        return decisions

    # ------------------------------------------------------------------ subclass hooks
    def schedule(self) -> list[Decision]:
        """Decide (some of) ``self.pending``; what is left stays queued."""
        raise NotImplementedError

    def on_ready(self, event: TaskReady) -> None:
        """A task became ready (it is in ``pending``)."""

    def on_cancelled(self, task: int) -> None:
        """A pending task was cancelled (already removed from ``pending``)."""

    def on_added(self, event: TaskAdded) -> None:
        """A task was announced."""

    def on_done(self, event: TaskDone) -> None:
        """An assignment ended (after the bookkeeping)."""

    def on_forgotten(self, task: int) -> None:
        """The runtime dropped a task."""

    def estimate(self, event: TaskReady) -> float:
        """The duration estimate an assignment adds to its worker's occupancy."""
        return 1.0

    # ------------------------------------------------------------------ helpers
    def assign(self, event: TaskReady, worker: WorkerInfo) -> Assignment:
        task = event.task
        self.pending.pop(task, None)
        estimate = self.estimate(event)
        self._add_load(task, worker, estimate)
        if event.allowed is not None or event.resources:
            self.restricted.add(task)
        self.input_bytes[task] = sum(i.nbytes for i in event.inputs)
        return Assignment(task, worker.id)

    def no_worker(self, event: TaskReady) -> NoWorker | Unplaceable:
        """The task has no candidate now: ``Unplaceable`` if no worker could ever run it,
        else ``NoWorker``."""
        self.pending.pop(event.task, None)
        reason = unplaceable_reason(event, self.workers)
        if reason is not None:
            return Unplaceable(event.task, reason)
        return NoWorker(event.task)

    def candidates(self, event: TaskReady) -> list[WorkerInfo] | None:
        """None: any running worker may run it; else the running workers that may."""
        if event.allowed is None and not event.resources:
            return None
        if event.allowed is None:
            pool: Iterable[WorkerInfo] = self.running.values()
        else:
            pool = (self.running[w] for w in event.allowed if w in self.running)
        found = [w for w in pool if w.offers(event.resources)]
        if not found and event.allowed is not None and event.loose:
            found = [w for w in self.running.values() if w.offers(event.resources)]
        found.sort(key=lambda w: w.id)
        return found

    def least_loaded(self) -> WorkerInfo | None:
        best = self.index.best()
        return None if best is None else self.running[best]

    def local_bytes(
        self, event: TaskReady, eligible: dict[int, WorkerInfo] | None
    ) -> tuple[dict[int, int], int]:
        """Bytes of the task's inputs each running (eligible) holder has, and the total."""
        running = self.running if eligible is None else eligible
        if self.tracks_replicas:
            live = self._live_local_bytes(event.task, running)
            if live is not None:
                return live
        local: dict[int, int] = {}
        total = 0
        for task_input in event.inputs:
            total += task_input.nbytes
            for holder in task_input.holders:
                if holder in running:
                    local[holder] = local.get(holder, 0) + task_input.nbytes
        return local, total

    def _live_local_bytes(
        self, task: int, running: dict[int, WorkerInfo]
    ) -> tuple[dict[int, int], int] | None:
        """``local_bytes`` from the replica map; None if an input is not in it (then the
        ready event's snapshot is what there is)."""
        dependencies = self.dependencies.get(task)
        if dependencies is None:
            return None
        local: dict[int, int] = {}
        total = 0
        replicas = self.replicas
        for dep in dependencies:
            holders = replicas.get(dep)
            if holders is None:
                return None
            nbytes = self.result_nbytes[dep]
            total += nbytes
            for holder in holders:
                if holder in running:
                    local[holder] = local.get(holder, 0) + nbytes
        return local, total

    def place_by_blevel(
        self, cost: Callable[[WorkerInfo, dict[int, int], int], tuple[float, ...]]
    ) -> list[Decision]:
        """Place every pending task, longest path to the end (b-level) first, each on the
        shortlisted worker with the lowest ``cost(worker, local_bytes, total_bytes)``."""
        decisions: list[Decision] = []
        blevel = self.blevel
        order = sorted(
            self.pending.values(), key=lambda e: (-blevel.get(e.task, 0), e.priority, e.task)
        )
        for event in order:
            workers, local, total = self.shortlist(event)
            if not workers:
                decisions.append(self.no_worker(event))
                continue
            best = min(workers, key=lambda w: cost(w, local, total))
            decisions.append(self.assign(event, best))
        return decisions

    def shortlist(self, event: TaskReady) -> tuple[list[WorkerInfo], dict[int, int], int]:
        """Where a task may sensibly go: the holders of its inputs plus the least loaded
        worker (or every candidate if it is restricted), with the local bytes of each."""
        candidates = self.candidates(event)
        if candidates is None:
            local, total = self.local_bytes(event, None)
            chosen = {w: self.running[w] for w in local}
            least = self.least_loaded()
            if least is not None:
                chosen[least.id] = least
            return list(chosen.values()), local, total
        eligible = {w.id: w for w in candidates}
        local, total = self.local_bytes(event, eligible)
        return candidates, local, total

    def _add_load(self, task: int, worker: WorkerInfo, estimate: float) -> None:
        self.placed[task] = worker.id
        worker.assigned[task] = estimate
        worker.occupancy += estimate
        self._reindex(worker)

    def _remove_load(self, task: int, worker_id: int) -> None:
        if self.placed.get(task) == worker_id:
            del self.placed[task]
        worker = self.workers.get(worker_id)
        if worker is None:
            return
        estimate = worker.assigned.pop(task, None)
        if estimate is not None:
            worker.occupancy = max(worker.occupancy - estimate, 0.0)
            if not worker.assigned:
                worker.occupancy = 0.0  # no drift from float sums
            self._reindex(worker)

    def _reindex(self, worker: WorkerInfo) -> None:
        if worker.running:
            self.index.set(worker.id, worker.load())
        else:
            self.index.discard(worker.id)

    # ------------------------------------------------------------------ events
    def _task_done(self, event: TaskDone) -> None:
        if event.nbytes is not None and self.tracks_replicas:
            self._replica_added(event.task, event.worker, event.nbytes)
        self._remove_load(event.task, event.worker)
        if event.task not in self.placed:
            self.restricted.discard(event.task)
            self.input_bytes.pop(event.task, None)
            self.unstealable.discard(event.task)
        self.on_done(event)

    def _steal_result(self, event: StealResult) -> None:
        thief = self.in_flight.pop(event.task, None)
        if thief is not None and thief in self.workers:
            self.workers[thief].incoming -= 1
        if event.stolen:
            worker = self.workers.get(event.thief)
            if worker is not None:
                estimate = self.estimate_of_task(event.task)
                self._add_load(event.task, worker, estimate)
        elif event.task in self.placed:
            self.unstealable.add(event.task)

    def estimate_of_task(self, task: int) -> float:
        """Estimate for a task moved by a steal (its TaskReady is gone)."""
        return 1.0

    def _replica_added(self, task: int, worker: int, nbytes: int) -> None:
        holders = self.replicas.get(task)
        if holders is None:
            self.replicas[task] = {worker}
        else:
            holders.add(worker)
        self.result_nbytes[task] = nbytes

    def _replica_removed(self, task: int, worker: int) -> None:
        holders = self.replicas.get(task)
        if holders is not None:
            holders.discard(worker)
            if not holders:
                del self.replicas[task]
                del self.result_nbytes[task]

    def _worker_added(self, event: WorkerAdded) -> None:
        worker = WorkerInfo(event)
        self._worker_removed(event.worker)
        self.workers[worker.id] = worker
        if worker.running:
            self.running[worker.id] = worker
            self.total_threads += worker.nthreads
        self._reindex(worker)

    def _worker_removed(self, worker_id: int) -> None:
        worker = self.workers.pop(worker_id, None)
        if worker is None:
            return
        if self.running.pop(worker_id, None) is not None:
            self.total_threads -= worker.nthreads
        self.index.discard(worker_id)

    def _worker_status(self, event: WorkerStatus) -> None:
        worker = self.workers.get(event.worker)
        if worker is None or worker.running == event.running:
            return
        worker.running = event.running
        if event.running:
            self.running[worker.id] = worker
            self.total_threads += worker.nthreads
        else:
            del self.running[worker.id]
            self.total_threads -= worker.nthreads
        self._reindex(worker)

    def _graph_added(self, added: list[TaskAdded]) -> None:
        """Record the new tasks and compute their b-levels (longest path to a sink).

        Dependents are counted within the batch only and not kept: a new task's dependents
        are all in its batch or later ones, and a later batch reaches older tasks through
        ``dependencies``. (A set of dependents per task, kept, cost ~300 bytes a task.)
        """
        batch = {event.task for event in added}
        # How many of the batch's tasks depend on each of its tasks (ids are unique, so a
        # task's dependencies hold no duplicates).
        remaining = dict.fromkeys(batch, 0)
        for event in added:
            self.dependencies[event.task] = event.dependencies
            for dep in event.dependencies:
                if dep in remaining:
                    remaining[dep] += 1
            self.on_added(event)
        # Kahn's algorithm from the sinks of the batch towards its sources.
        blevel = self.blevel
        stack = [t for t, n in remaining.items() if n == 0]
        for task in stack:
            blevel[task] = 1  # a sink of the batch: no task depends on it yet
        while stack:
            task = stack.pop()
            level = blevel[task]
            for dep in self.dependencies[task]:
                if dep in batch:
                    if blevel.get(dep, 0) < level + 1:
                        blevel[dep] = level + 1
                    remaining[dep] -= 1
                    if remaining[dep] == 0:
                        stack.append(dep)
                elif blevel.get(dep, 0) < level + 1:
                    blevel[dep] = level + 1  # an older task gained a longer path

    def _forget(self, task: int) -> None:
        self.pending.pop(task, None)
        self.dependencies.pop(task, None)
        self.blevel.pop(task, None)
        self.unstealable.discard(task)
        if self.replicas.pop(task, None) is not None:
            del self.result_nbytes[task]
        self.on_forgotten(task)

    # ------------------------------------------------------------------ stealing
    def stealable(self, task: int, thief: WorkerInfo) -> bool:
        return (
            task not in self.restricted
            and task not in self.in_flight
            and (task not in self.unstealable)
        )

    def balance(self) -> list[Decision]:
        """Idle running workers take not-yet-started tasks from the most loaded ones."""
        thieves = [w for w in self.running.values() if len(w.assigned) + w.incoming < w.nthreads]
        if not thieves:
            return []
        outgoing: dict[int, int] = {}  # victim -> steals in flight from it
        for task in self.in_flight:
            victim_id = self.placed.get(task)
            if victim_id is not None:
                outgoing[victim_id] = outgoing.get(victim_id, 0) + 1
        victims = sorted(
            (w for w in self.workers.values() if len(w.assigned) > w.nthreads),
            key=lambda w: (-(len(w.assigned) - w.nthreads) / w.nthreads, w.id),
        )
        if not victims:
            return []
        decisions: list[Decision] = []
        thieves.sort(key=lambda w: (len(w.assigned) + w.incoming) / w.nthreads)
        for thief in thieves:
            need = thief.nthreads - len(thief.assigned) - thief.incoming
            for victim in victims:
                if need <= 0:
                    break
                # Keep at least one task per thread on the victim (those probably run).
                surplus = len(victim.assigned) - victim.nthreads - outgoing.get(victim.id, 0)
                if surplus <= 0:
                    continue
                scanned = 0
                for task in reversed(victim.assigned):
                    if need <= 0 or surplus <= 0 or scanned > 4 * victim.nthreads + 16:
                        break
                    scanned += 1
                    if not self.stealable(task, thief):
                        continue
                    self.in_flight[task] = thief.id
                    thief.incoming += 1
                    outgoing[victim.id] = outgoing.get(victim.id, 0) + 1
                    need -= 1
                    surplus -= 1
                    decisions.append(Steal(task, thief.id))
        return decisions
