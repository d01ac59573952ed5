"""The transition engine: the records' registry, the one writer of task states, and the
transitions that recommendations are carried out by.

Theory of operation
-------------------
``Engine`` owns the records (``tasks``, ``workers``, ``clients`` and their indexes) and
everything that changes a task's state. The event handlers (``dsched.state.clients``,
``.workers``, ``.placement``, ``.cluster``) are mixins over it; ``SchedulerState``
(``dsched.state.machine``) puts them together.

*Moves.* ``_move(ts, finish, out)`` is the only place that writes ``ts.state`` (besides
``TaskState.__init__``). It checks the edge against ``dsched.state.edges.NEXT`` (one dict
and one set lookup; ``InvalidTransition`` for an edge the automaton lacks), appends
``(key, start, finish, stimulus_id, now)`` to ``transition_log`` (a bounded deque: the
per-key story, see ``story``), and, when ``observe_transitions`` is set, appends
``(key, start, finish, stimulus_id)`` to ``out.transitions`` for the extensions. While
``count_prefixes`` is on, it also keeps ``prefix_counts`` (``{prefix: {state: tasks}}``,
Dask's ``TaskPrefix.state_counts``, for the dashboard) up to date: two dict updates per
move instead of a reported move per task for an extension to count in Python.

*Recommendations.* Handlers do not pick edges themselves: they record recommendations
``{task: target}`` and ``_run`` carries them out until none are left. A recommendation is
a request, re-checked when it is carried out (``_transition``): a task recommended for
release that has become needed again stays. ``_transitions`` maps a (start, target) pair
to the code that carries it out; a pair it lacks goes through ``released``, whose
settling step (``_settle_released``) decides what comes next: wait again if still
needed, forget if nothing refers to it.

*Interest* (reference counting): a task is needed while a client wants it (``who_wants``)
or a dependent in waiting/ready/no-worker/processing needs it (``waiters``). A task that
is not needed is released (its data freed on every holder at once); a task that is not
needed and has no dependents left is forgotten.

*Actors* (``TaskState.actor``) are placed here, not by the policy, as Dask places them
(``decide_worker_non_rootish``): on the running worker, within the task's restrictions, with
the fewest actors, ignoring where the inputs are (objective ``(len(ws.actors), processing
per thread, input bytes to fetch, id)``: dsched's runtime has no occupancy, the policy does).
An actor never enters ``no-worker``: with no running worker it waits in ``ready``
(``actors_pending``) until one runs. The policy never hears of actors (no ``TaskReady``,
``TaskDone`` or ``TaskCancelled``), so it never steals or counts them. ``ws.actors`` holds
the actors processing or in memory on ``ws``. An actor whose worker is lost is not
recomputed: ``memory -> erred`` with Dask's "Worker holding Actor was lost", its dependents
err with it (``_lose_data``).

Pure: time comes in as ``now`` (``_now``), log lines and messages go out in the outbox.
"""

from __future__ import annotations

import pickle
import sys
from collections import deque
from collections.abc import Callable, Iterable
from typing import Any

from dask.utils import key_split

from dsched.policy import protocol as policy
from dsched.state.edges import (
    ACTIVE,
    ERRED,
    FORGOTTEN,
    MEMORY,
    NEXT,
    NO_WORKER,
    PROCESSING,
    READY,
    RELEASED,
    RUNNABLE,
    STATES,
    WAITING,
)
from dsched.state.errors import InvalidTransition, InvariantError
from dsched.state.messages import CancelledKeys, KeyInMemory, TaskErred
from dsched.state.outbox import Outbox
from dsched.state.records import (
    NOBODY,
    NOTHING,
    NOWHERE,
    ClientState,
    Key,
    TaskState,
    WorkerState,
    group_add,
    group_discard,
    unwant,
)
from dsched.state.slicing import GraphInProgress

FIRE_AND_FORGET = "fire-and-forget"

# How many moves ``story`` remembers: distributed.admin.low-level-log-length's default,
# which the server passes from the config (longer logs cost cache misses, see the docs).
TRANSITION_LOG_LENGTH = 1000

KilledWorkerFactory = Callable[[Key, str, int], object]
# One entry of ``transition_log``: (key, start, finish, stimulus_id, now).
StoryEntry = tuple[Key, str, str, str, float]
Recommendations = dict[TaskState, str]
TransitionCode = Callable[[TaskState, Recommendations, Outbox], None]
NO_TRANSITIONS: dict[str, TransitionCode] = {}

# What Dask reports for an actor whose worker died (scheduler.py, memory -> erred), pickled
# as the scheduler's own exceptions are (protocol 4); clients unpickle it.
ACTOR_LOST_TEXT = "Worker holding Actor was lost"
ACTOR_LOST = pickle.dumps(RuntimeError(ACTOR_LOST_TEXT), protocol=4)


class Engine:
    def __init__(
        self,
        *,
        killed_worker: KilledWorkerFactory,
        allowed_failures: int = 3,
        wants: frozenset[type] = frozenset(),
        bandwidth: float = 100e6,
        transition_log_length: int = TRANSITION_LOG_LENGTH,
        observe_transitions: bool = False,
    ) -> None:
        """``wants``: the optional policy events to send (``policy.protocol.wanted_events``);
        ``bandwidth``: the configured ``distributed.scheduler.bandwidth``, the estimate until
        workers report theirs; ``transition_log_length``: how many moves ``story`` keeps
        (``distributed.admin.low-level-log-length``); ``observe_transitions``: also report
        every move in ``Outbox.transitions`` (may be switched on later)."""
        self.tasks: dict[Key, TaskState] = {}
        self.workers: dict[str, WorkerState] = {}
        self.clients: dict[str, ClientState] = {}
        # Each client's big graph whose parts are still arriving (``dsched.state.slicing``).
        self.graphs_in_progress: dict[str, GraphInProgress] = {}
        self.no_worker: set[TaskState] = set()
        # The no-worker tasks no worker of the cluster can run (offered only to new workers).
        self.unplaceable: set[TaskState] = set()
        # Ready actors waiting for a running worker (placed by ``_place_actor``, not the policy).
        self.actors_pending: set[TaskState] = set()
        # Tasks a policy must never queue (``DisallowQueuing``: P2P output tasks).
        self.unqueueable: set[TaskState] = set()
        # Plain booleans, tested on the hot path instead of set lookups.
        self._replica_added_events = policy.ReplicaAdded in wants
        self._replica_removed_events = policy.ReplicaRemoved in wants
        self._bandwidth_events = policy.BandwidthMeasured in wants
        # Transfer bandwidth estimate (bytes/s) and the value the policy last heard of.
        self.bandwidth = float(bandwidth)
        self._bandwidth_sent = self.bandwidth
        self._tasks_by_id: dict[int, TaskState] = {}
        self._workers_by_id: dict[int, WorkerState] = {}
        self._next_task_id = 0
        self._next_worker_id = 0
        self._next_run_id = 0
        self._killed_worker = killed_worker
        self.allowed_failures = allowed_failures
        self.generation = 0
        self._last_graph_time = float("-inf")
        self._stimulus_id = ""
        self._now = 0.0
        # Work stealing: processing task -> (steal-request stimulus_id, thief worker id).
        self.steals: dict[TaskState, tuple[str, int]] = {}
        self._next_steal_id = 0
        # Every move, oldest first, the oldest dropped beyond the bound (see ``story``).
        self.transition_log: deque[StoryEntry] = deque(maxlen=transition_log_length)
        self._log_move = self.transition_log.append  # (one attribute lookup per move)
        self.observe_transitions = observe_transitions
        # {prefix: {state: tasks}} while ``count_prefixes`` is on, else None (no cost).
        self.prefix_counts: dict[str, dict[str, int]] | None = None
        self._transitions: dict[tuple[str, str], TransitionCode] = {
            (RELEASED, WAITING): self._released_waiting,
            (WAITING, READY): self._waiting_ready,
            (NO_WORKER, READY): self._waiting_ready,
            (WAITING, RELEASED): self._waiting_released,
            (READY, RELEASED): self._ready_released,
            (NO_WORKER, RELEASED): self._ready_released,
            (PROCESSING, RELEASED): self._processing_released,
            (MEMORY, RELEASED): self._memory_released,
            (ERRED, RELEASED): self._erred_released,
            (RELEASED, FORGOTTEN): self._released_forgotten,
            (ERRED, FORGOTTEN): self._erred_forgotten,
            (RELEASED, ERRED): self._to_erred,
            (WAITING, ERRED): self._to_erred,
            (READY, ERRED): self._to_erred,
            (NO_WORKER, ERRED): self._to_erred,
            (PROCESSING, ERRED): self._to_erred,
        }
        # The same, by start then target: ``_transition`` looks up without building a pair.
        self._transitions_from: dict[str, dict[str, TransitionCode]] = {}
        for (start, finish), code in self._transitions.items():
            self._transitions_from.setdefault(start, {})[finish] = code

    @property
    def tasks_created(self) -> int:
        """How many tasks the state ever made (ids are handed out in sequence, never reused);
        those not in ``tasks`` were forgotten."""
        return self._next_task_id

    def task_by_id(self, task_id: int) -> TaskState | None:
        return self._tasks_by_id.get(task_id)

    def count_prefixes(self, on: bool) -> None:
        """Keep ``prefix_counts`` up to date from now on, starting from one pass over the
        tasks (forgotten tasks: those forgotten since), or stop keeping it (None)."""
        if not on:
            self.prefix_counts = None
            return
        counts: dict[str, dict[str, int]] = {}
        for ts in self.tasks.values():
            row = counts.get(ts.prefix)
            if row is None:
                row = counts[ts.prefix] = dict.fromkeys(STATES, 0)
            row[ts.state] += 1
        self.prefix_counts = counts

    # ------------------------------------------------------------------ moves
    def _move(self, ts: TaskState, finish: str, out: Outbox) -> None:
        """The only writer of ``ts.state``: check the edge, record it, report it if asked."""
        start = ts.state
        if finish not in NEXT[start]:
            raise InvalidTransition(f"{ts!r}: {start} -> {finish} is not an edge of EDGES")
        ts.state = finish
        self._log_move((ts.key, start, finish, self._stimulus_id, self._now))
        if self.observe_transitions:
            out.transitions.append((ts.key, start, finish, self._stimulus_id))
        counts = self.prefix_counts
        if counts is not None:
            row = counts[ts.prefix]  # made with the task (``_new_task``) or by the recount
            row[start] -= 1
            row[finish] += 1

    def story(self, *keys: Key) -> list[StoryEntry]:
        """The recorded moves of these keys, oldest first: ``(key, start, finish,
        stimulus_id, now)`` (``distributed.Scheduler.story``, for task keys)."""
        wanted = set(keys)
        return [entry for entry in self.transition_log if entry[0] in wanted]

    def finished_just_now(self, key: Key, finish: str, stimulus_id: str, now: float) -> bool:
        """Did the event applied at ``now`` with ``stimulus_id`` (as in the log: the made-up
        one when it had none) move ``key`` from processing to ``finish``? A stale or
        duplicate result moves nothing, and Dask's task stream records nothing for it. The
        event's moves are the newest entries of the log with its ``now``; when it moved more
        tasks than the log holds (the result that releases all 25,000 inputs of a merge),
        its own move is gone and the task's state tells."""
        log = self.transition_log
        for entry in reversed(log):
            if entry[4] != now:
                return False
            if (
                entry[0] == key
                and entry[1] == PROCESSING
                and entry[2] == finish
                and entry[3] == stimulus_id
            ):
                return True
        ts = self.tasks.get(key)
        return len(log) == log.maxlen and ts is not None and ts.state == finish

    # ------------------------------------------------------------------ recommendations
    def _run(self, recs: Recommendations, out: Outbox) -> None:
        while recs:
            ts, finish = recs.popitem()
            self._transition(ts, finish, recs, out)

    def _transition(self, ts: TaskState, finish: str, recs: Recommendations, out: Outbox) -> None:
        start = ts.state
        if start in (finish, FORGOTTEN):
            return
        # (``_needed`` inlined: this runs for every recommendation.)
        if finish in (RELEASED, FORGOTTEN) and (ts.who_wants or ts.waiters) and start != ERRED:
            return  # stale recommendation: the task became needed again
        if finish == FORGOTTEN and start in (RELEASED, ERRED) and (ts.who_wants or ts.dependents):
            return
        if finish == WAITING and start == RELEASED and not (ts.who_wants or ts.waiters):
            # Stale: whoever needed it let go after recommending it (a dependent erred or was
            # released later in the same step). Computing it would run it for nobody.
            if not ts.dependents:
                recs[ts] = FORGOTTEN
            return
        codes = self._transitions_from.get(start, NO_TRANSITIONS)
        transition = codes.get(finish)
        if transition is None and start != RELEASED:
            # Go through released; settling there decides whether to wait again or forget.
            transition = codes.get(RELEASED)
        if transition is None:
            raise InvalidTransition(f"{ts!r}: {start} -> {finish}")
        transition(ts, recs, out)

    @staticmethod
    def _needed(ts: TaskState) -> bool:
        return bool(ts.who_wants or ts.waiters)

    def _release_if_unneeded(self, ts: TaskState, recs: Recommendations) -> None:
        if ts.who_wants or ts.waiters:
            return
        if not ts.dependents:
            recs[ts] = FORGOTTEN
        elif ts.state not in (RELEASED, ERRED):
            recs[ts] = RELEASED

    def _settle_released(self, ts: TaskState, recs: Recommendations) -> None:
        """``ts`` has just become released: wait again if still needed, else let go of its
        inputs, and be forgotten if nothing refers to it any more."""
        if ts.who_wants or ts.waiters:
            recs[ts] = WAITING
            return
        self._detach_from_inputs(ts, recs)
        if not ts.dependents:
            recs[ts] = FORGOTTEN

    def _detach_from_inputs(self, ts: TaskState, recs: Recommendations) -> None:
        for dts in ts.dependencies:
            if ts in dts.waiters:
                dts.waiters = group_discard(dts.waiters, ts)
                self._release_if_unneeded(dts, recs)
        ts.waiting_on = NOTHING

    # ------------------------------------------------------------------ transitions
    def _released_waiting(self, ts: TaskState, recs: Recommendations, out: Outbox) -> None:
        if ts.run_spec is None:
            # Scattered data that is gone cannot be recomputed: cancel everything needing it.
            self._cancel_closure([ts], recs, out, reason="lost-data")
            return
        for dts in ts.dependencies:
            if dts.state == ERRED:
                ts.exception_blame = dts.exception_blame
                self._to_erred(ts, recs, out)
                return
        self._move(ts, WAITING, out)
        # A set of its own only if it waits for something (root tasks never do).
        waiting = ts.waiting_on if isinstance(ts.waiting_on, set) else set()
        for dts in ts.dependencies:
            dts.waiters = group_add(dts.waiters, ts)
            if dts.state != MEMORY:
                waiting.add(dts)
                if dts.state == RELEASED and recs.get(dts) != ERRED:
                    # An input about to err (KilledWorker when its worker died) is released
                    # only on the way to erred: keep that; erring reaches ``ts`` too.
                    recs[dts] = WAITING
        if waiting:
            ts.waiting_on = waiting
        else:
            recs[ts] = READY

    def _waiting_ready(self, ts: TaskState, recs: Recommendations, out: Outbox) -> None:
        if ts.waiting_on:
            return
        if ts.state == NO_WORKER:
            self.no_worker.discard(ts)
            self.unplaceable.discard(ts)
        self._move(ts, READY, out)
        if ts.actor:
            self._place_actor(ts, out)
            return
        out.policy.append(self._task_ready_event(ts))

    def _place_actor(self, ts: TaskState, out: Outbox) -> None:
        """Start a ready actor on the running worker with the fewest actors (Dask's
        ``worker_objective`` for actors), ignoring where its inputs are; with none running,
        keep it ready in ``actors_pending`` (an actor is never ``no-worker``)."""
        candidates = [ws for ws in self.workers.values() if ws.status == "running"]
        names = ts.worker_restrictions
        if names is not None:
            allowed = [
                ws
                for ws in candidates
                if ws.address in names or ws.host in names or str(ws.name) in names
            ]
            if allowed or not ts.loose_restrictions:
                candidates = allowed
        needs = ts.resource_restrictions
        if needs:
            candidates = [
                ws
                for ws in candidates
                if all(ws.resources.get(name, 0) >= amount for name, amount in needs.items())
            ]
        if not candidates:
            self.actors_pending.add(ts)
            return

        def objective(ws: WorkerState) -> tuple[int, float, int, int]:
            fetch = sum([dts.nbytes for dts in ts.dependencies if ws not in dts.who_has])
            return (len(ws.actors), len(ws.processing) / max(ws.nthreads, 1), fetch, ws.id)

        self.actors_pending.discard(ts)
        self._start_processing(ts, min(candidates, key=objective), out)

    def _place_pending_actors(self, out: Outbox) -> None:
        """A worker joined or runs again: place the actors that were waiting for one."""
        for ts in sorted(self.actors_pending, key=lambda t: t.priority):
            self._place_actor(ts, out)

    def _task_ready_event(self, ts: TaskState) -> policy.TaskReady:
        # (List comprehensions, not generators: twice as fast for a few items.)
        inputs = tuple(
            [
                policy.TaskInput(dts.nbytes, tuple([ws.id for ws in dts.who_has]))
                for dts in ts.dependencies
            ]
        )
        allowed: frozenset[int] | None = None
        if ts.worker_restrictions is not None:
            names = ts.worker_restrictions
            allowed = frozenset(
                ws.id
                for ws in self.workers.values()
                if ws.address in names or ws.host in names or str(ws.name) in names
            )
        resources = tuple(ts.resource_restrictions.items()) if ts.resource_restrictions else ()
        queueable = not (self.unqueueable and ts in self.unqueueable)
        return policy.TaskReady(
            ts.id,
            ts.priority,
            inputs,
            allowed,
            ts.loose_restrictions,
            resources,
            ts.prefix,
            queueable,
        )

    def _waiting_released(self, ts: TaskState, recs: Recommendations, out: Outbox) -> None:
        self._move(ts, RELEASED, out)
        self._settle_released(ts, recs)

    def _ready_released(self, ts: TaskState, recs: Recommendations, out: Outbox) -> None:
        self.no_worker.discard(ts)
        self.unplaceable.discard(ts)
        if ts.actor:
            self.actors_pending.discard(ts)  # the policy never heard of it
        else:
            out.policy.append(policy.TaskCancelled(ts.id))
        self._move(ts, RELEASED, out)
        self._settle_released(ts, recs)

    def _processing_released(self, ts: TaskState, recs: Recommendations, out: Outbox) -> None:
        ws = self._stop_processing(ts, out)
        out.free_keys(ws.address, ts.key, self._stimulus_id)
        self._move(ts, RELEASED, out)
        self._settle_released(ts, recs)

    def _memory_released(self, ts: TaskState, recs: Recommendations, out: Outbox) -> None:
        self._free_replicas(ts, out)
        self._move(ts, RELEASED, out)
        self._settle_released(ts, recs)

    def _free_replicas(self, ts: TaskState, out: Outbox) -> None:
        """Every holder of ``ts`` frees it (``free-keys``); the task keeps no replica."""
        for ws in ts.who_has:
            ws.has_what.discard(ts)
            if ts.actor:
                ws.actors.discard(ts)
            out.free_keys(ws.address, ts.key, self._stimulus_id)
            if self._replica_removed_events:
                out.policy.append(policy.ReplicaRemoved(ts.id, ws.id))
        ts.who_has = NOTHING

    def _erred_released(self, ts: TaskState, recs: Recommendations, out: Outbox) -> None:
        self._forget_error(ts, out)
        self._move(ts, RELEASED, out)
        self._settle_released(ts, recs)

    def _erred_forgotten(self, ts: TaskState, recs: Recommendations, out: Outbox) -> None:
        self._forget_error(ts, out)
        self._forget(ts, recs, out)

    def _released_forgotten(self, ts: TaskState, recs: Recommendations, out: Outbox) -> None:
        self._forget(ts, recs, out)

    def _forget(self, ts: TaskState, recs: Recommendations, out: Outbox) -> None:
        out.policy.append(policy.TaskForgotten(ts.id))
        for dts in ts.dependencies:
            dts.dependents = group_discard(dts.dependents, ts)
            dts.waiters = group_discard(dts.waiters, ts)
            self._release_if_unneeded(dts, recs)
        ts.dependencies = NOTHING
        ts.waiting_on = NOTHING
        self._move(ts, FORGOTTEN, out)
        if self.unqueueable:
            self.unqueueable.discard(ts)
        del self.tasks[ts.key]
        del self._tasks_by_id[ts.id]

    def _forget_error(self, ts: TaskState, out: Outbox) -> None:
        for address in ts.erred_on:
            if address in self.workers:
                out.free_keys(address, ts.key, self._stimulus_id)
        ts.erred_on = NOWHERE
        ts.exception = ts.traceback = ts.exception_blame = None
        ts.exception_text = ""

    def _to_erred(self, ts: TaskState, recs: Recommendations, out: Outbox) -> None:
        """Err ``ts`` with the error of ``ts.exception_blame`` (set by the caller)."""
        blame = ts.exception_blame
        if blame is None:
            raise InvalidTransition(f"{ts!r}: {ts.state} -> erred with no exception_blame")
        start = ts.state
        if start == PROCESSING:
            self._stop_processing(ts, out)
        elif start in (READY, NO_WORKER):
            self.no_worker.discard(ts)
            self.unplaceable.discard(ts)
            if ts.actor:
                self.actors_pending.discard(ts)
            else:
                out.policy.append(policy.TaskCancelled(ts.id))
        elif start == MEMORY:  # an actor whose worker was lost (``_lose_data``)
            self._free_replicas(ts, out)
        self._move(ts, ERRED, out)
        self._detach_from_inputs(ts, recs)
        for dts in ts.dependents:
            if dts.state in ACTIVE or (dts.state == RELEASED and self._needed(dts)):
                dts.exception_blame = blame
                recs[dts] = ERRED
        self._report_erred(ts, out)
        if not ts.who_wants and not ts.dependents:
            recs[ts] = FORGOTTEN

    def _lose_data(self, ts: TaskState, recs: Recommendations, out: Outbox) -> None:
        """The last replica of ``ts`` is gone: recompute it if it is still needed; an actor
        is not recomputed but errs (Dask's memory -> erred), and its dependents with it."""
        if ts.actor:
            ts.exception = ACTOR_LOST
            ts.traceback = None
            ts.exception_text = f"RuntimeError('{ACTOR_LOST_TEXT}')"
            ts.exception_blame = ts
            self._to_erred(ts, recs, out)
            return
        if ts.run_spec is None:
            self._move(ts, RELEASED, out)
            self._cancel_closure([ts], recs, out, reason="lost-data")
            self._settle_released(ts, recs)
            return
        for cs in ts.who_wants:
            out.send_client(cs.id, {"op": "lost-data", "key": ts.key})
        for dts in ts.dependents:
            if dts.state in RUNNABLE:
                recs[dts] = WAITING  # restart: its input must be computed again
            elif dts.state == WAITING:
                waiting = dts.waiting_on
                if not isinstance(waiting, set):
                    waiting = dts.waiting_on = set()
                waiting.add(ts)
        self._move(ts, RELEASED, out)
        self._settle_released(ts, recs)

    # ------------------------------------------------------------------ running tasks
    def _start_processing(self, ts: TaskState, ws: WorkerState, out: Outbox) -> None:
        self._move(ts, PROCESSING, out)
        ts.processing_on = ws
        ws.processing.add(ts)
        if ts.actor:
            ws.actors.add(ts)
        ts.run_id = self._next_run_id
        self._next_run_id += 1
        who_has = {}
        nbytes = {}
        for dts in ts.dependencies:
            who_has[dts.key] = tuple([w.address for w in dts.who_has])
            nbytes[dts.key] = dts.nbytes
        out.send_worker(
            ws.address,
            {
                "op": "compute-task",
                "key": ts.key,
                "run_id": ts.run_id,
                "priority": ts.priority,
                "stimulus_id": self._stimulus_id,
                "who_has": who_has,
                "nbytes": nbytes,
                "run_spec": ts.run_spec,
                "resource_restrictions": ts.resource_restrictions,
                "actor": ts.actor,
                "annotations": ts.annotations,
                "span_id": None,
            },
        )

    def _stop_processing(
        self,
        ts: TaskState,
        out: Outbox,
        duration: float | None = None,
        nbytes: int | None = None,
    ) -> WorkerState:
        ws = ts.processing_on
        if ws is None:
            raise InvariantError(f"{ts!r} is stopped but runs on no worker")
        ws.processing.discard(ts)
        ts.processing_on = None
        if ts.actor:
            ws.actors.discard(ts)  # (back in if it went to memory here: _processing_memory)
        elif not ts.long_running:
            out.policy.append(policy.TaskDone(ts.id, ws.id, duration, nbytes))
        ts.long_running = False
        steal = self.steals.pop(ts, None) if self.steals else None
        if steal is not None:
            # The task left its worker while a steal was in flight: the steal is void, and
            # the victim's late steal-response will not match anything.
            out.policy.append(policy.StealResult(ts.id, ws.id, steal[1], stolen=False))
        return ws

    # ------------------------------------------------------------------ replicas
    def _add_replica(self, ts: TaskState, ws: WorkerState) -> None:
        holders = ts.who_has
        if not isinstance(holders, set):
            holders = ts.who_has = set()
        holders.add(ws)
        ws.has_what.add(ts)

    def _replica_arrived(self, ts: TaskState, ws: WorkerState, out: Outbox) -> None:
        """``ws`` holds ``ts``'s result, not as the result of an assignment (which the
        policy hears of as ``TaskDone(nbytes=...)``)."""
        if self._replica_added_events and ws not in ts.who_has:
            out.policy.append(policy.ReplicaAdded(ts.id, ws.id, ts.nbytes))
        self._add_replica(ts, ws)

    # ------------------------------------------------------------------ interest
    def _cancel_closure(
        self, roots: Iterable[TaskState], recs: Recommendations, out: Outbox, reason: str
    ) -> list[Key]:
        """Drop every client's interest in ``roots`` and everything depending on them."""
        cancelled: list[Key] = []
        stack = list(roots)
        seen: set[TaskState] = set()
        while stack:
            ts = stack.pop()
            if ts in seen:
                continue
            seen.add(ts)
            stack.extend(ts.dependents)
            if ts.who_wants:
                cancelled.append(ts.key)
                for cs in ts.who_wants:
                    cs.wants.discard(ts)
                ts.who_wants = NOBODY
            self._release_if_unneeded(ts, recs)
        if cancelled and reason == "lost-data":
            msg: CancelledKeys = {"op": "cancelled-keys", "keys": cancelled, "reason": reason}
            for cs in self.clients.values():
                out.send_client(cs.id, msg)
        return cancelled

    def _offer_no_worker_tasks(
        self, recs: Recommendations, *, placeable: bool, unplaceable: bool
    ) -> None:
        """Offer no-worker tasks to the policy again: those parked by ``NoWorker``
        (``placeable``), those parked by ``Unplaceable`` (``unplaceable``: a worker was
        added), or both. A task already recommended elsewhere keeps that."""
        for ts in self.no_worker if placeable else self.unplaceable:
            if (unplaceable or ts not in self.unplaceable) and ts not in recs:
                recs[ts] = READY

    def _client(self, client_id: str) -> ClientState:
        cs = self.clients.get(client_id)
        if cs is None:
            cs = self.clients[client_id] = ClientState(client_id)
        return cs

    def _want(self, cs: ClientState, ts: TaskState) -> None:
        if isinstance(ts.who_wants, set):
            ts.who_wants.add(cs)
        else:
            ts.who_wants = {cs}
        cs.wants.add(ts)

    def _new_task(self, key: Key, run_spec: object, annotations: Any) -> TaskState:
        ts = TaskState(key, self._next_task_id, run_spec, annotations)
        # One string per prefix, not one per task (~50 bytes a task beyond the 100k keys
        # whose results key_split's cache keeps); freed with its tasks.
        ts.prefix = sys.intern(key_split(key))
        self._next_task_id += 1
        self.tasks[key] = ts
        self._tasks_by_id[ts.id] = ts
        counts = self.prefix_counts
        if counts is not None:
            row = counts.get(ts.prefix)
            if row is None:
                row = counts[ts.prefix] = dict.fromkeys(STATES, 0)
            row[RELEASED] += 1
        return ts

    # ------------------------------------------------------------------ telling clients
    def _report_erred(self, ts: TaskState, out: Outbox) -> None:
        blame = ts.exception_blame
        if blame is None:
            raise InvariantError(f"{ts!r} is reported erred but has no exception_blame")
        msg: TaskErred = {
            "op": "task-erred",
            "key": ts.key,
            "exception": blame.exception,
            "traceback": blame.traceback,
        }
        for cs in ts.who_wants:
            out.send_client(cs.id, msg)
        self._drop_fire_and_forget(ts)

    def _report_memory(self, ts: TaskState, out: Outbox) -> None:
        if ts.who_wants:
            msg: KeyInMemory = {"op": "key-in-memory", "key": ts.key}
            if ts.type is not None:
                msg["type"] = ts.type
            for cs in ts.who_wants:
                out.send_client(cs.id, msg)
            self._drop_fire_and_forget(ts)

    def _report_state(self, cs: ClientState, ts: TaskState, out: Outbox) -> None:
        if ts.state == MEMORY:
            msg: KeyInMemory = {"op": "key-in-memory", "key": ts.key}
            if ts.type is not None:
                msg["type"] = ts.type
            out.send_client(cs.id, msg)
        elif ts.state == ERRED and ts.exception_blame is not None:
            blame = ts.exception_blame
            out.send_client(
                cs.id,
                {
                    "op": "task-erred",
                    "key": ts.key,
                    "exception": blame.exception,
                    "traceback": blame.traceback,
                },
            )

    def _drop_fire_and_forget(self, ts: TaskState) -> None:
        """fire-and-forget keys are wanted only until they finish; the caller re-checks
        whether the task is still needed."""
        for cs in ts.who_wants:
            if cs.id == FIRE_AND_FORGET:
                unwant(ts, cs)
                cs.wants.discard(ts)
                break
