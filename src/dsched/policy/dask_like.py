"""The ``dask`` policy: what makes Dask's scheduler good on real workloads, done cheaply.

Theory of operation
-------------------
Three ideas from ``distributed.scheduler`` (protocol.md §6.5) and one restraint, each O(1)
amortised per task:

* **Learned durations.** Every ``TaskDone`` with a measured duration updates the estimate of
  its task prefix (``key_split`` of the key) as Dask does: the first measurement, then the
  mean of the old estimate and the new measurement. A prefix never measured is estimated at
  ``unknown-task-duration``. A worker's *occupancy* is the sum of the estimates of the tasks
  assigned to it.
* **Earliest finish time with locality.** A task that is not root-ish goes to the worker
  minimising ``occupancy / threads + bytes of inputs it lacks / bandwidth + 2 ms x inputs it
  lacks`` (then fewer tasks per thread, then id). The last term is the fetch round trip
  Dask's objective leaves out: without it, tiny inputs look free to move, and a reduction of
  short tasks followed the least occupied worker instead of its inputs (tree-12 on 2 real
  workers: 20% faster with it). Candidates are the holders of its inputs plus the least
  occupied worker (a lazy heap), the latter only when it has a free thread, the inputs
  are small enough that the round trip, not their bytes, is the cost of moving them, and
  the task is worth that fetch (``worth_moving``: the task's estimate is at least half of
  it; a 20 us step is not); otherwise the holders alone, as in Dask's ``decide_worker``.
  Every allowed worker is a candidate for a restricted task.
* **Load does not move data between busy workers.** A busy worker holding none of the
  inputs is never a candidate, however its occupancy compares: the gain is a guess about
  two queues that will have changed by the time the task runs (estimated at
  ``unknown-task-duration``, 0.5 s, while a prefix is unmeasured), the cost a real transfer,
  which the objective's ``2 ms + bytes / bandwidth`` underestimates for small inputs. Offered,
  set_index with the tasks shuffle made 3x Dask's transfers (165-262 against 45-74; 39-88
  without), 60-80 KB each, taking 6-25 ms (median, on a loaded 2-core machine) to feed tasks
  of 0.2-0.3 ms. Leaving out the unmeasured estimates alone did not help (126-262): by then
  most prefixes were measured. An idle thread is a fact, not a guess: a worker with one
  takes the task at once (``balance()`` would steal it there anyway, a round trip later).
* **Root-task queuing.** A root-ish task (no restrictions, and no inputs or a large prefix fed
  by fewer than 5 tasks, as Dask decides) waits in a priority queue here and is handed out
  only while a worker holds fewer tasks than its *slots*::

      slots = max(ceil(worker-saturation x threads), 1) + depth
      depth = min(ceil(threads x LATENCY_BUDGET / estimate of the queue head), threads x 256)

  The first term is Dask's memory bound; ``depth`` keeps about ``LATENCY_BUDGET`` seconds of
  extra work per thread queued on the worker, so short tasks are never latency-bound on the
  round trip to the scheduler (with Dask's 1.1 a single-thread worker idles for a round trip
  per task), while long tasks (the ones with big outputs) still get about one extra. Slots
  are filled per batch in contiguous runs of the queue, so neighbours in ``dask.order``
  stay together: every free slot when the queue is longer than they are, else a share per
  worker water-filled by tasks per thread (``spread``), so that a short queue of cheap
  roots is split between the workers instead of filling the most idle one's deep slots
  (bag-10k-50: 47 of 50 roots on one worker, and the products of their outputs followed
  them). ``worker-saturation: inf`` turns queuing off:
  root-ish tasks are then cut into contiguous blocks, one per worker, by thread share.

With ``work-stealing`` on, ``balance()`` (see ``common``) moves not-started tasks to idle
workers, but only tasks worth the move (``worth_moving``): fetching their inputs (bytes at
the bandwidth plus ``TRANSFER_LATENCY`` for the round trip) takes no longer than twice
their estimate.

Bandwidth is ``distributed.scheduler.bandwidth`` until the runtime measures it
(``BandwidthMeasured``, wanted), then the measured value, for placement and stealing.
Replica events are not wanted: placement happens in the batch the task becomes ready in (the
holders in ``TaskReady`` are current), queued root-ish tasks are handed out by load alone (as
Dask does), and the replica events plus a live replica map, which would let the steal check
count what the thief lacks rather than every input, cost about 2 us (7 %) more runtime +
policy CPU per task on a 10k-task tree with transfers (2.2 replica events per task), for a
check that runs on a handful of tasks per batch.
"""

from __future__ import annotations

import heapq
import math

from dsched.policy.common import BasePolicy, PolicyConfig, WorkerInfo
from dsched.policy.protocol import (
    BandwidthMeasured,
    Decision,
    Priority,
    TaskAdded,
    TaskDone,
    TaskReady,
)

# Seconds of work per thread kept queued on a worker beyond worker-saturation.
LATENCY_BUDGET = 0.02
MAX_DEPTH_PER_THREAD = 256
# Seconds a missing input costs beyond its bytes: the fetch round trip between workers.
TRANSFER_LATENCY = 0.002
# Dask's root-ish rule: a prefix with more than 2 x total threads tasks, fed by < 5 tasks.
ROOTISH_MAX_DEPENDENCIES = 5


class DaskPolicy(BasePolicy):
    steals = True
    wants = frozenset({BandwidthMeasured})

    def __init__(self, config: PolicyConfig | None = None) -> None:
        super().__init__(config)
        self.durations: dict[str, float] = {}
        self.task_prefix: dict[int, str] = {}
        self.prefix_count: dict[str, int] = {}
        self.prefix_inputs: dict[str, set[int]] = {}
        self._queue: list[tuple[Priority, int, int]] = []
        self._queued: dict[int, tuple[int, TaskReady]] = {}  # task -> (sequence, event)
        self._sequence = 0
        self.queuing = math.isfinite(self.config.worker_saturation)

    # ------------------------------------------------------------------ learning
    def on_added(self, event: TaskAdded) -> None:
        prefix = event.prefix
        self.task_prefix[event.task] = prefix
        self.prefix_count[prefix] = self.prefix_count.get(prefix, 0) + 1
        inputs = self.prefix_inputs.setdefault(prefix, set())
        for dep in event.dependencies:
            if len(inputs) >= ROOTISH_MAX_DEPENDENCIES:
                break
            inputs.add(dep)

    def on_forgotten(self, task: int) -> None:
        self._queued.pop(task, None)
        prefix = self.task_prefix.pop(task, None)
        if prefix is None:
            return
        left = self.prefix_count.get(prefix, 1) - 1
        if left > 0:
            self.prefix_count[prefix] = left
        else:
            self.prefix_count.pop(prefix, None)
            self.prefix_inputs.pop(prefix, None)

    def on_done(self, event: TaskDone) -> None:
        if event.duration is None:
            return
        prefix = self.task_prefix.get(event.task)
        if prefix is None:
            return
        old = self.durations.get(prefix)
        self.durations[prefix] = event.duration if old is None else (old + event.duration) / 2

    def estimate(self, event: TaskReady) -> float:
        return self.durations.get(event.prefix, self.config.unknown_task_duration)

    def estimate_of_task(self, task: int) -> float:
        prefix = self.task_prefix.get(task)
        if prefix is None:
            return self.config.unknown_task_duration
        return self.durations.get(prefix, self.config.unknown_task_duration)

    # ------------------------------------------------------------------ queue
    def on_ready(self, event: TaskReady) -> None:
        self._queued.pop(event.task, None)  # offered again: decide afresh

    def on_cancelled(self, task: int) -> None:
        self._queued.pop(task, None)

    def is_rootish(self, event: TaskReady) -> bool:
        if event.allowed is not None or event.resources or not event.queueable:
            return False
        if not event.inputs:
            return True
        count = self.prefix_count.get(event.prefix, 0)
        inputs = self.prefix_inputs.get(event.prefix, ())
        return count > 2 * self.total_threads and len(inputs) < ROOTISH_MAX_DEPENDENCIES

    def queued(self) -> int:
        return len(self._queued)

    def slots(self, worker: WorkerInfo, estimate: float) -> int:
        nthreads = worker.nthreads
        base = max(math.ceil(self.config.worker_saturation * nthreads), 1)
        depth = min(
            math.ceil(nthreads * LATENCY_BUDGET / max(estimate, 1e-9)),
            nthreads * MAX_DEPTH_PER_THREAD,
        )
        return base + depth

    def _push(self, event: TaskReady) -> None:
        self._sequence += 1
        self._queued[event.task] = (self._sequence, event)
        heapq.heappush(self._queue, (event.priority, self._sequence, event.task))

    def _peek(self) -> TaskReady | None:
        queue = self._queue
        while queue:
            _, sequence, task = queue[0]
            entry = self._queued.get(task)
            if entry is not None and entry[0] == sequence:
                return entry[1]
            heapq.heappop(queue)
        return None

    def _fill_slots(self) -> list[Decision]:
        head = self._peek()
        if head is None or not self.running:
            return []
        workers = sorted(self.running.values(), key=lambda w: (len(w.assigned) / w.nthreads, w.id))
        estimate = self.estimate(head)
        free = [max(self.slots(w, estimate) - len(w.assigned), 0) for w in workers]
        queued = len(self._queued)
        if queued < sum(free):  # else every free slot, without building the lists
            held = [len(w.assigned) for w in workers]
            free = spread(queued, held, [w.nthreads for w in workers], free)
        decisions: list[Decision] = []
        for worker, share in zip(workers, free, strict=True):
            for _ in range(share):
                event = self._peek()
                if event is None:
                    return decisions
                heapq.heappop(self._queue)
                del self._queued[event.task]
                decisions.append(self.assign(event, worker))
        return decisions

    # ------------------------------------------------------------------ placement
    def schedule(self) -> list[Decision]:
        decisions: list[Decision] = []
        if self.pending:
            roots: list[TaskReady] = []
            for event in sorted(self.pending.values(), key=lambda e: (e.priority, e.task)):
                if self.is_rootish(event):
                    roots.append(event)
                else:
                    decisions.append(self._place(event))
            if self.queuing:
                for event in roots:
                    del self.pending[event.task]
                    self._push(event)
            elif roots:
                decisions.extend(self._place_blocks(roots))
        if self._queued:
            decisions.extend(self._fill_slots())
        return decisions

    def shortlist(self, event: TaskReady) -> tuple[list[WorkerInfo], dict[int, int], int]:
        """The holders of the task's inputs, plus the least loaded worker only when it has a
        free thread and moving the inputs costs no more than the fetch round trip itself
        (``TRANSFER_LATENCY`` at the bandwidth: 200 KB at 100 MB/s); with no running holder,
        ``BasePolicy.shortlist`` (the least loaded). Bigger inputs stay put, as in Dask's
        ``decide_worker`` (holders only); ``balance()`` moves work to idle workers
        afterwards. Offering the least loaded worker for big inputs moved them to balance
        estimates: the reductions of a persisted 4000x4000 array, placed in one batch at
        ``unknown-task-duration`` (0.5 s) each, sent 2 MB blocks to the other worker to even
        out 0.5 s guesses of tasks that take milliseconds. Offering it busy moved small
        inputs between busy workers (the module docstring)."""
        if event.inputs and self.candidates(event) is None:
            local, total = self.local_bytes(event, None)
            if local:
                chosen = {w: self.running[w] for w in local}
                if total <= self.bandwidth * TRANSFER_LATENCY and self.worth_moving(
                    total, self.estimate(event)
                ):
                    least = self.least_loaded()
                    # The least loaded worker may be busy while another has a free thread
                    # (fewer threads, or longer tasks): balance() serves that one.
                    if least is not None and len(least.assigned) + least.incoming < least.nthreads:
                        chosen[least.id] = least
                return list(chosen.values()), local, total
        return super().shortlist(event)

    def _place(self, event: TaskReady) -> Decision:
        workers, local, total = self.shortlist(event)
        if not workers:
            return self.no_worker(event)
        bandwidth = self.bandwidth
        # Inputs each worker already holds, in one pass (not one scan per candidate: a merge
        # task's 25k inputs would be scanned once per holder).
        held: dict[int, int] = {}
        for task_input in event.inputs:
            for holder in task_input.holders:
                held[holder] = held.get(holder, 0) + 1
        n_inputs = len(event.inputs)
        best = min(
            workers,
            key=lambda w: (
                w.load()
                + (total - local.get(w.id, 0)) / bandwidth
                + TRANSFER_LATENCY * (n_inputs - held.get(w.id, 0)),
                len(w.assigned) / w.nthreads,
                w.id,
            ),
        )
        return self.assign(event, best)

    def _place_blocks(self, roots: list[TaskReady]) -> list[Decision]:
        """No queuing: contiguous blocks of the priority order, one per worker, so that each
        worker gets the same number of tasks per thread."""
        workers = sorted(self.running.values(), key=lambda w: w.id)
        if not workers:
            return [self.no_worker(event) for event in roots]
        total_load = sum(len(w.assigned) for w in workers) + len(roots)
        decisions: list[Decision] = []
        start = 0
        for index, worker in enumerate(workers):
            if index == len(workers) - 1:
                share = len(roots) - start
            else:
                target = total_load * worker.nthreads / self.total_threads
                share = max(0, min(round(target) - len(worker.assigned), len(roots) - start))
            decisions.extend(self.assign(event, worker) for event in roots[start : start + share])
            start += share
        return decisions

    # ------------------------------------------------------------------ stealing
    def worth_moving(self, nbytes: int, estimate: float) -> bool:
        """Whether a task estimated at ``estimate`` seconds is worth running away from inputs
        of ``nbytes``: the fetch (its bytes at the bandwidth plus the round trip) takes no
        more than twice the task. Without the round trip, a 20 us task whose input is 1 KB
        looked free to move: bag-10k-50's ``sum-part`` steps (one 0.02 ms task per 4 ms
        product) were stolen by, and placed on, the idle worker, each after a 5-8 ms fetch,
        which kept that worker from ever being idle enough to steal the 4 ms products."""
        return nbytes / self.bandwidth + TRANSFER_LATENCY * (nbytes > 0) <= 2 * estimate

    def stealable(self, task: int, thief: WorkerInfo) -> bool:
        if not super().stealable(task, thief):
            return False
        nbytes = self.input_bytes.get(task, 0)
        if not nbytes and self.dependencies.get(task):
            nbytes = 1  # inputs of unknown (zero) size still take a round trip to fetch
        return self.worth_moving(nbytes, self.estimate_of_task(task))


def spread(tasks: int, held: list[int], nthreads: list[int], free: list[int]) -> list[int]:
    """How many of ``tasks`` queued root-ish tasks each worker takes, at most ``free[i]``:
    all free slots when there are enough tasks; fewer, water-filled by tasks per thread
    (the emptiest first), so that both workers of a pair get half of a short queue.

    Filling the most idle worker's slots first gave it the whole queue when the slots were
    deep: bag-10k-50's 50 ``from_sequence`` roots (0.1 ms each: 200 slots) went 47 to one
    worker, then the 2,500 4 ms products of their outputs followed the data, ~85 % on that
    worker. O(log workers) per task handed out (workers at one level take turns)."""
    if tasks >= sum(free):
        return list(free)
    shares = [0] * len(free)
    # Workers by their fill level; the level rises through the workers that are below it
    # and not yet full, until the tasks are placed.
    heap = [(held[i] / nthreads[i], i) for i in range(len(free)) if free[i] > 0]
    heapq.heapify(heap)
    left = tasks
    while left > 0 and heap:
        level, i = heapq.heappop(heap)
        # Fill worker i up to the next worker's level (or one task, at least), within free.
        room = free[i] - shares[i]
        want = max(math.floor((heap[0][0] - level) * nthreads[i]), 1) if heap else room
        take = min(room, want, left)
        shares[i] += take
        left -= take
        if shares[i] < free[i]:
            heapq.heappush(heap, ((held[i] + shares[i]) / nthreads[i], i))
    return shares
