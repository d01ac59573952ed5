"""The scheduler's task state machine.

Theory of operation
-------------------
``SchedulerState.handle(event, now) -> Outbox`` is the only entry point. An event (a peer's
message, or the policy's decisions) changes the records below and appends to the outbox the
messages that follow from it. Nothing here reads a clock, does I/O or logs: time comes in as
``now``, log lines go out in the outbox.

Records: a ``TaskState`` per key, a ``WorkerState`` per worker address, a ``ClientState`` per
client id (pseudo-clients such as ``fire-and-forget`` are created on first use).

Task states::

    released --> waiting --> ready --> processing --> memory
        ^           |          |  \\         |            |
        |           |          |   no-worker |            |
        +-----------+----------+------------+------------+--> released --> forgotten
    waiting / ready / no-worker / processing / released --> erred --> released | forgotten

* ``waiting``: needed, some input not in memory (``waiting_on``).
* ``ready``: every input in memory; offered to the policy (``TaskReady``).
* ``no-worker``: the policy found no running worker that may run it (``NoWorker``); offered
  again when a worker is added or starts running, or when one is removed (so that the policy
  can tell it has become unplaceable). A task no worker of the cluster can ever run
  (``Unplaceable``) is also in ``unplaceable``: offered again only when a worker is added,
  and logged once (a warning per batch and reason) rather than at every offer.
* ``processing``: sent to a worker with a fresh ``run_id``; only a result carrying that
  ``run_id`` from that worker counts.

Optional policy events (``wants``, see ``policy.protocol``): ``ReplicaAdded`` /
``ReplicaRemoved`` where a replica appears or goes other than by an assignment's result or a
worker leaving, ``BandwidthMeasured`` when the estimate fed by ``BandwidthReported``
(heartbeats, Dask's rule) moves by more than ``BANDWIDTH_CHANGE``. Each costs one attribute
test when not wanted.

Interest (reference counting): a task is *needed* while a client wants it (``who_wants``)
or a dependent in waiting/ready/no-worker/processing needs it (``waiters``). A task that is
not needed is released (its data freed on every holder at once); a task that is not needed
and has no dependents left is forgotten. Released tasks keep their run_spec so lost data can
be recomputed.

Transitions are driven by *recommendations* ``{task: target}`` processed until none are
left. A recommendation is a request, re-checked when it is carried out: a task recommended
for release that has become needed again stays. Pairs not in the table route through
``released``, whose settling step decides what comes next (wait again if still needed,
forget if nothing refers to it).

``validate()`` checks every invariant; tests call it after every step.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from dask.utils import key_split

from dsched.policy import protocol as policy
from dsched.state import events as ev
from dsched.state.outbox import Outbox

Key = Any

RELEASED = "released"
WAITING = "waiting"
READY = "ready"
NO_WORKER = "no-worker"
PROCESSING = "processing"
MEMORY = "memory"
ERRED = "erred"
FORGOTTEN = "forgotten"

# States in which a task needs its inputs (it is one of their ``waiters``).
ACTIVE = frozenset({WAITING, READY, NO_WORKER, PROCESSING})
# States that expect every input in memory.
RUNNABLE = frozenset({READY, NO_WORKER, PROCESSING})
# A victim's answer to steal-request: it gave the task up / it never had it (distributed's
# stealing.py _WORKER_STATE_CONFIRM / _WORKER_STATE_UNDEFINED); any other state means it
# had already started the task, which stays.
STEAL_CONFIRM_STATES = frozenset({"ready", "constrained", "waiting"})
STEAL_UNDEFINED_STATES = frozenset({"released", None})

FIRE_AND_FORGET = "fire-and-forget"


class InvalidTransition(Exception):
    """A bug in the state machine: a transition was asked for that has no meaning."""


# Shared empty values of TaskState.who_wants / erred_on (never mutated: replaced by a set).
NOBODY: frozenset[ClientState] = frozenset()
NOWHERE: frozenset[str] = frozenset()


def _unwant(ts: TaskState, cs: ClientState) -> None:
    """``cs`` no longer wants ``ts``: drop it, and the set with it once empty."""
    wants = ts.who_wants
    if isinstance(wants, set):
        wants.discard(cs)
        if not wants:
            ts.who_wants = NOBODY


class TaskState:
    __slots__ = (
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
        self.dependencies: set[TaskState] = set()
        self.dependents: set[TaskState] = set()
        self.waiting_on: set[TaskState] = set()
        self.waiters: set[TaskState] = set()
        # Most tasks are wanted by no client and never err anywhere: those share one empty
        # frozenset instead of two empty sets (432 bytes a task); see _want/_unwant.
        self.who_wants: set[ClientState] | frozenset[ClientState] = NOBODY
        self.who_has: set[WorkerState] = set()
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

    def __repr__(self) -> str:
        return f"<TaskState {self.key!r} {self.state}>"


class WorkerState:
    __slots__ = (
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


KilledWorkerFactory = Callable[[Key, str, int], object]


class SchedulerState:
    def __init__(
        self,
        *,
        killed_worker: KilledWorkerFactory,
        allowed_failures: int = 3,
        wants: frozenset[type] = frozenset(),
        bandwidth: float = 100e6,
    ) -> None:
        """``wants``: the optional policy events to send (``policy.protocol.wanted_events``);
        ``bandwidth``: the configured ``distributed.scheduler.bandwidth``, the estimate until
        workers report theirs."""
        self.tasks: dict[Key, TaskState] = {}
        self.workers: dict[str, WorkerState] = {}
        self.clients: dict[str, ClientState] = {}
        self.no_worker: set[TaskState] = set()
        # The no-worker tasks no worker of the cluster can run (offered only to new workers).
        self.unplaceable: set[TaskState] = set()
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
        self._handlers: dict[type, Callable[[Any, Outbox], None]] = {
            ev.ClientConnected: self._client_connected,
            ev.ClientDisconnected: self._client_disconnected,
            ev.GraphReceived: self._graph_received,
            ev.GraphFailed: self._graph_failed,
            ev.ClientDesiresKeys: self._client_desires_keys,
            ev.ClientReleasesKeys: self._client_releases_keys,
            ev.CancelKeys: self._cancel_keys,
            ev.ReportKey: self._report_key,
            ev.DataPlaced: self._data_placed,
            ev.RetryKeys: self._retry_keys,
            ev.WorkerConnected: self._worker_connected,
            ev.WorkerDisconnected: self._worker_disconnected,
            ev.WorkerStatusChanged: self._worker_status_changed,
            ev.TaskFinished: self._task_finished,
            ev.TaskErred: self._task_erred,
            ev.ReleaseWorkerData: self._release_worker_data,
            ev.AddKeys: self._add_keys,
            ev.RequestRefreshWhoHas: self._request_refresh_who_has,
            ev.LongRunning: self._long_running,
            ev.Reschedule: self._reschedule,
            ev.PolicyDecisions: self._policy_decisions,
            ev.StealResponse: self._steal_response,
            ev.BandwidthReported: self._bandwidth_reported,
            ev.Restart: self._restart,
            ev.RetireWorkers: self._retire_workers,
        }
        self._transitions: dict[
            tuple[str, str], Callable[[TaskState, dict[TaskState, str], Outbox], None]
        ] = {
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

    # ------------------------------------------------------------------ entry point
    def handle(self, event: ev.Event, now: float, out: Outbox | None = None) -> Outbox:
        """Apply one event; its effects are appended to ``out`` (a new Outbox if None).

        The reactor passes the outbox it is collecting for the current tick, which saves
        building and merging one per message; ``out.reply`` is then this event's reply.
        """
        if out is None:
            out = Outbox()
        else:
            out.reply = None
        self._now = now
        self._stimulus_id = f"{type(event).__name__}-{now}"
        self._handlers[type(event)](event, out)
        return out

    def task_by_id(self, task_id: int) -> TaskState | None:
        return self._tasks_by_id.get(task_id)

    # ------------------------------------------------------------------ transitions engine
    def _run(self, recs: dict[TaskState, str], out: Outbox) -> None:
        while recs:
            ts, finish = recs.popitem()
            self._transition(ts, finish, recs, out)

    def _transition(
        self, ts: TaskState, finish: str, recs: dict[TaskState, str], out: Outbox
    ) -> None:
        start = ts.state
        if start in (finish, FORGOTTEN):
            return
        if finish in (RELEASED, FORGOTTEN) and self._needed(ts) and start != ERRED:
            return  # stale recommendation: the task became needed again
        if finish == FORGOTTEN and start in (RELEASED, ERRED) and (ts.who_wants or ts.dependents):
            return
        if finish == WAITING and start == RELEASED and not self._needed(ts):
            # Stale: whoever needed it let go after recommending it (a dependent erred or was
            # released later in the same step). Computing it would run it for nobody.
            if not ts.dependents:
                recs[ts] = FORGOTTEN
            return
        transition = self._transitions.get((start, finish))
        if transition is not None:
            transition(ts, recs, out)
        elif (start, RELEASED) in self._transitions and start != RELEASED:
            # Go through released; settling there decides whether to wait again or forget.
            self._transitions[start, RELEASED](ts, recs, out)
        else:
            raise InvalidTransition(f"{ts!r}: {start} -> {finish}")

    @staticmethod
    def _needed(ts: TaskState) -> bool:
        return bool(ts.who_wants or ts.waiters)

    def _release_if_unneeded(self, ts: TaskState, recs: dict[TaskState, str]) -> None:
        if ts.who_wants or ts.waiters:
            return
        if not ts.dependents:
            recs[ts] = FORGOTTEN
        elif ts.state not in (RELEASED, ERRED):
            recs[ts] = RELEASED

    def _settle_released(self, ts: TaskState, recs: dict[TaskState, str]) -> None:
        """``ts`` has just become released: wait again if still needed, else let go of its
        inputs, and be forgotten if nothing refers to it any more."""
        if ts.who_wants or ts.waiters:
            recs[ts] = WAITING
            return
        self._detach_from_inputs(ts, recs)
        if not ts.dependents:
            recs[ts] = FORGOTTEN

    def _detach_from_inputs(self, ts: TaskState, recs: dict[TaskState, str]) -> None:
        for dts in ts.dependencies:
            if ts in dts.waiters:
                dts.waiters.discard(ts)
                self._release_if_unneeded(dts, recs)
        ts.waiting_on.clear()

    # ------------------------------------------------------------------ transitions
    def _released_waiting(self, ts: TaskState, recs: dict[TaskState, str], out: Outbox) -> None:
        if ts.run_spec is None:
            # Scattered data that is gone cannot be recomputed: cancel everything needing it.
            self._cancel_closure([ts], recs, out, reason="lost-data")
            return
        for dts in ts.dependencies:
            if dts.state == ERRED:
                ts.exception_blame = dts.exception_blame
                self._to_erred(ts, recs, out)
                return
        ts.state = WAITING
        for dts in ts.dependencies:
            dts.waiters.add(ts)
            if dts.state != MEMORY:
                ts.waiting_on.add(dts)
                if dts.state == RELEASED and recs.get(dts) != ERRED:
                    # An input about to err (KilledWorker when its worker died) is released
                    # only on the way to erred: keep that; erring reaches ``ts`` too.
                    recs[dts] = WAITING
        if not ts.waiting_on:
            recs[ts] = READY

    def _waiting_ready(self, ts: TaskState, recs: dict[TaskState, str], out: Outbox) -> None:
        if ts.waiting_on:
            return
        if ts.state == NO_WORKER:
            self.no_worker.discard(ts)
            self.unplaceable.discard(ts)
        ts.state = READY
        out.policy.append(self._task_ready_event(ts))

    def _task_ready_event(self, ts: TaskState) -> policy.TaskReady:
        inputs = tuple(
            policy.TaskInput(dts.nbytes, tuple(ws.id for ws in dts.who_has))
            for dts in ts.dependencies
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
        return policy.TaskReady(
            ts.id, ts.priority, inputs, allowed, ts.loose_restrictions, resources, ts.prefix
        )

    def _waiting_released(self, ts: TaskState, recs: dict[TaskState, str], out: Outbox) -> None:
        ts.state = RELEASED
        self._settle_released(ts, recs)

    def _ready_released(self, ts: TaskState, recs: dict[TaskState, str], out: Outbox) -> None:
        self.no_worker.discard(ts)
        self.unplaceable.discard(ts)
        out.policy.append(policy.TaskCancelled(ts.id))
        ts.state = RELEASED
        self._settle_released(ts, recs)

    def _processing_released(self, ts: TaskState, recs: dict[TaskState, str], out: Outbox) -> None:
        ws = self._stop_processing(ts, out)
        out.free_keys(ws.address, ts.key, self._stimulus_id)
        ts.state = RELEASED
        self._settle_released(ts, recs)

    def _memory_released(self, ts: TaskState, recs: dict[TaskState, str], out: Outbox) -> None:
        for ws in ts.who_has:
            ws.has_what.discard(ts)
            out.free_keys(ws.address, ts.key, self._stimulus_id)
            if self._replica_removed_events:
                out.policy.append(policy.ReplicaRemoved(ts.id, ws.id))
        ts.who_has.clear()
        ts.state = RELEASED
        self._settle_released(ts, recs)

    def _erred_released(self, ts: TaskState, recs: dict[TaskState, str], out: Outbox) -> None:
        self._forget_error(ts, out)
        ts.state = RELEASED
        self._settle_released(ts, recs)

    def _erred_forgotten(self, ts: TaskState, recs: dict[TaskState, str], out: Outbox) -> None:
        self._forget_error(ts, out)
        self._forget(ts, recs, out)

    def _released_forgotten(self, ts: TaskState, recs: dict[TaskState, str], out: Outbox) -> None:
        self._forget(ts, recs, out)

    def _forget(self, ts: TaskState, recs: dict[TaskState, str], out: Outbox) -> None:
        out.policy.append(policy.TaskForgotten(ts.id))
        for dts in ts.dependencies:
            dts.dependents.discard(ts)
            dts.waiters.discard(ts)
            self._release_if_unneeded(dts, recs)
        ts.dependencies.clear()
        ts.waiting_on.clear()
        ts.state = FORGOTTEN
        del self.tasks[ts.key]
        del self._tasks_by_id[ts.id]

    def _forget_error(self, ts: TaskState, out: Outbox) -> None:
        for address in ts.erred_on:
            if address in self.workers:
                out.free_keys(address, ts.key, self._stimulus_id)
        ts.erred_on = NOWHERE
        ts.exception = ts.traceback = ts.exception_blame = None
        ts.exception_text = ""

    def _to_erred(self, ts: TaskState, recs: dict[TaskState, str], out: Outbox) -> None:
        """Err ``ts`` with the error of ``ts.exception_blame`` (set by the caller)."""
        start = ts.state
        if start == PROCESSING:
            self._stop_processing(ts, out)
        elif start in (READY, NO_WORKER):
            self.no_worker.discard(ts)
            self.unplaceable.discard(ts)
            out.policy.append(policy.TaskCancelled(ts.id))
        ts.state = ERRED
        self._detach_from_inputs(ts, recs)
        blame = ts.exception_blame
        assert blame is not None
        for dts in ts.dependents:
            if dts.state in ACTIVE or (dts.state == RELEASED and self._needed(dts)):
                dts.exception_blame = blame
                recs[dts] = ERRED
        self._report_erred(ts, out)
        if not ts.who_wants and not ts.dependents:
            recs[ts] = FORGOTTEN

    # ------------------------------------------------------------------ helpers
    def _report_erred(self, ts: TaskState, out: Outbox) -> None:
        blame = ts.exception_blame
        assert blame is not None
        msg = {
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
            msg: dict[str, Any] = {"op": "key-in-memory", "key": ts.key}
            if ts.type is not None:
                msg["type"] = ts.type
            for cs in ts.who_wants:
                out.send_client(cs.id, msg)
            self._drop_fire_and_forget(ts)

    def _drop_fire_and_forget(self, ts: TaskState) -> None:
        """fire-and-forget keys are wanted only until they finish; the caller re-checks
        whether the task is still needed."""
        for cs in ts.who_wants:
            if cs.id == FIRE_AND_FORGET:
                _unwant(ts, cs)
                cs.wants.discard(ts)
                break

    def _start_processing(self, ts: TaskState, ws: WorkerState, out: Outbox) -> None:
        ts.state = PROCESSING
        ts.processing_on = ws
        ws.processing.add(ts)
        ts.run_id = self._next_run_id
        self._next_run_id += 1
        who_has = {}
        nbytes = {}
        for dts in ts.dependencies:
            who_has[dts.key] = tuple(w.address for w in dts.who_has)
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
                "actor": False,
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
        assert ws is not None
        ws.processing.discard(ts)
        ts.processing_on = None
        if not ts.long_running:
            out.policy.append(policy.TaskDone(ts.id, ws.id, duration, nbytes))
        ts.long_running = False
        steal = self.steals.pop(ts, None)
        if steal is not None:
            # The task left its worker while a steal was in flight: the steal is void, and
            # the victim's late steal-response will not match anything.
            out.policy.append(policy.StealResult(ts.id, ws.id, steal[1], stolen=False))
        return ws

    def _add_replica(self, ts: TaskState, ws: WorkerState) -> None:
        ts.who_has.add(ws)
        ws.has_what.add(ts)

    def _replica_arrived(self, ts: TaskState, ws: WorkerState, out: Outbox) -> None:
        """``ws`` holds ``ts``'s result, not as the result of an assignment (which the
        policy hears of as ``TaskDone(nbytes=...)``)."""
        if self._replica_added_events and ws not in ts.who_has:
            out.policy.append(policy.ReplicaAdded(ts.id, ws.id, ts.nbytes))
        self._add_replica(ts, ws)

    def _lose_data(self, ts: TaskState, recs: dict[TaskState, str], out: Outbox) -> None:
        """The last replica of ``ts`` is gone: recompute it if it is still needed."""
        if ts.run_spec is None:
            ts.state = RELEASED
            self._cancel_closure([ts], recs, out, reason="lost-data")
            self._settle_released(ts, recs)
            return
        for cs in ts.who_wants:
            out.send_client(cs.id, {"op": "lost-data", "key": ts.key})
        for dts in ts.dependents:
            if dts.state in RUNNABLE:
                recs[dts] = WAITING  # restart: its input must be computed again
            elif dts.state == WAITING:
                dts.waiting_on.add(ts)
        ts.state = RELEASED
        self._settle_released(ts, recs)

    def _cancel_closure(
        self, roots: Iterable[TaskState], recs: dict[TaskState, str], out: Outbox, reason: str
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
            msg = {"op": "cancelled-keys", "keys": cancelled, "reason": reason}
            for cs in self.clients.values():
                out.send_client(cs.id, msg)
        return cancelled

    def _offer_no_worker_tasks(
        self, recs: dict[TaskState, str], *, placeable: bool, unplaceable: bool
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

    def _report_state(self, cs: ClientState, ts: TaskState, out: Outbox) -> None:
        if ts.state == MEMORY:
            msg: dict[str, Any] = {"op": "key-in-memory", "key": ts.key}
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

    # ------------------------------------------------------------------ client events
    def _client_connected(self, event: ev.ClientConnected, out: Outbox) -> None:
        self._client(event.client)

    def _client_disconnected(self, event: ev.ClientDisconnected, out: Outbox) -> None:
        cs = self.clients.pop(event.client, None)
        if cs is None:
            return
        recs: dict[TaskState, str] = {}
        for ts in cs.wants:
            _unwant(ts, cs)
            self._release_if_unneeded(ts, recs)
        cs.wants.clear()
        self._run(recs, out)

    def _graph_received(self, event: ev.GraphReceived, out: Outbox) -> None:
        cs = self.clients.get(event.client)
        if cs is None:
            out.log("info", f"dropping a graph from {event.client}: the client has left")
            return
        tasks = self.tasks
        in_graph = {spec.key for spec in event.tasks}
        new_specs = [spec for spec in event.tasks if spec.key not in tasks]
        lost = [
            dep
            for spec in new_specs
            for dep in spec.dependencies
            if dep not in in_graph and dep not in tasks
        ]
        lost += [key for key in event.keys if key not in in_graph and key not in tasks]
        if lost:
            out.send_client(
                cs.id,
                {"op": "cancelled-keys", "keys": list(event.keys), "reason": "lost dependencies"},
            )
            out.log("info", f"graph from {cs.id} needs unknown keys, e.g. {lost[0]!r}")
            return
        generation = self._generation_for(event)
        order = event.order
        for spec in new_specs:
            ts = self._new_task(spec.key, spec.run_spec, spec.annotations)
            annotations = spec.annotations
            ts.priority = (
                -annotations.get("priority", event.user_priority),
                generation,
                order.get(spec.key, 0),
            )
            self._apply_restrictions(ts, annotations)
        for spec in new_specs:
            ts = tasks[spec.key]
            for dep in spec.dependencies:
                dts = tasks[dep]
                ts.dependencies.add(dts)
                dts.dependents.add(ts)
            out.policy.append(
                policy.TaskAdded(
                    ts.id, ts.priority, tuple(dts.id for dts in ts.dependencies), ts.prefix
                )
            )
        recs: dict[TaskState, str] = {}
        wanted = [tasks[key] for key in event.keys]
        for ts in wanted:
            self._want(cs, ts)
        for spec in new_specs:
            ts = tasks[spec.key]
            if not ts.who_wants and not ts.dependents:  # not culled by the intake: drop it
                recs[ts] = FORGOTTEN
        for ts in sorted(wanted, key=lambda t: t.priority, reverse=True):
            if ts.state == RELEASED:
                recs[ts] = WAITING
            else:
                self._report_state(cs, ts, out)
        self._run(recs, out)

    def _generation_for(self, event: ev.GraphReceived) -> float:
        """Older graphs run first; tasks submitted from a task run before their parent."""
        if event.submitting_task is not None:
            parent = self.tasks.get(event.submitting_task)
            if parent is not None:
                return parent.priority[0] - 0.01
            return self.generation
        if self._last_graph_time + event.fifo_timeout < self._now:
            self.generation += 1
            self._last_graph_time = self._now
        return self.generation

    def _new_task(self, key: Key, run_spec: object, annotations: Any) -> TaskState:
        ts = TaskState(key, self._next_task_id, run_spec, annotations)
        ts.prefix = key_split(key)
        self._next_task_id += 1
        self.tasks[key] = ts
        self._tasks_by_id[ts.id] = ts
        return ts

    @staticmethod
    def _apply_restrictions(ts: TaskState, annotations: Any) -> None:
        workers = annotations.get("workers")
        if workers is not None:
            if isinstance(workers, str | int):
                workers = [workers]
            ts.worker_restrictions = frozenset(str(w) for w in workers)
            ts.loose_restrictions = bool(annotations.get("allow_other_workers", False))
        resources = annotations.get("resources")
        if resources:
            ts.resource_restrictions = dict(resources)
        retries = annotations.get("retries")
        if retries:
            ts.retries = int(retries)

    def _graph_failed(self, event: ev.GraphFailed, out: Outbox) -> None:
        for key in event.keys:
            out.send_client(
                event.client,
                {
                    "op": "task-erred",
                    "key": key,
                    "exception": event.exception,
                    "traceback": event.traceback,
                },
            )

    def _client_desires_keys(self, event: ev.ClientDesiresKeys, out: Outbox) -> None:
        cs = self._client(event.client)
        recs: dict[TaskState, str] = {}
        for key in event.keys:
            ts = self.tasks.get(key)
            if ts is None:
                out.log("warning", f"client {cs.id} desires unknown key {key!r}")
                continue
            self._want(cs, ts)
            self._report_state(cs, ts, out)
            if ts.state in (MEMORY, ERRED) and cs.id == FIRE_AND_FORGET:
                self._drop_fire_and_forget(ts)
                self._release_if_unneeded(ts, recs)
            elif ts.state == RELEASED:
                recs[ts] = WAITING
        self._run(recs, out)

    def _client_releases_keys(self, event: ev.ClientReleasesKeys, out: Outbox) -> None:
        cs = self.clients.get(event.client)
        if cs is None:
            return
        recs: dict[TaskState, str] = {}
        for key in event.keys:
            ts = self.tasks.get(key)
            if ts is None or ts not in cs.wants:
                continue
            cs.wants.discard(ts)
            _unwant(ts, cs)
            self._release_if_unneeded(ts, recs)
        self._run(recs, out)

    def _cancel_keys(self, event: ev.CancelKeys, out: Outbox) -> None:
        cs = self.clients.get(event.client)
        roots = []
        for key in event.keys:
            ts = self.tasks.get(key)
            if ts is None or not ts.who_wants:
                continue
            if event.force or ts.who_wants == {cs}:
                roots.append(ts)
        recs: dict[TaskState, str] = {}
        cancelled = self._cancel_closure(roots, recs, out, reason="cancel")
        keys = list(dict.fromkeys([*event.keys, *cancelled]))
        msg = {"op": "cancelled-keys", "keys": keys, "reason": event.reason, "msg": event.msg}
        for client in self.clients.values():
            out.send_client(client.id, msg)
        self._run(recs, out)

    def _report_key(self, event: ev.ReportKey, out: Outbox) -> None:
        ts = self.tasks.get(event.key)
        if ts is None:
            out.send_client(
                event.client,
                {"op": "cancelled-keys", "keys": [event.key], "reason": "already forgotten"},
            )
        elif event.client in self.clients:
            self._report_state(self.clients[event.client], ts, out)

    def _data_placed(self, event: ev.DataPlaced, out: Outbox) -> None:
        cs = None if event.client is None else self._client(event.client)
        for key, addresses in event.who_has.items():
            holders = [self.workers[a] for a in addresses if a in self.workers]
            if not holders:
                out.log("warning", f"data for {key!r} placed on unknown workers {addresses}")
                continue
            ts = self.tasks.get(key)
            if cs is None:
                if ts is not None and ts.state == MEMORY:
                    for ws in holders:
                        self._replica_arrived(ts, ws, out)
                else:
                    out.log("info", f"data for {key!r} placed with no client to hold it: ignored")
                continue
            if ts is None:
                ts = self._new_task(key, None, {})
                out.policy.append(policy.TaskAdded(ts.id, ts.priority, (), ts.prefix))
            elif ts.state not in (RELEASED, MEMORY):
                out.log("warning", f"ignoring data placed for {key!r}: it is {ts.state}")
                continue
            ts.state = MEMORY
            ts.nbytes = int(event.nbytes.get(key, 0))
            for ws in holders:
                self._replica_arrived(ts, ws, out)
            self._want(cs, ts)
            out.send_client(cs.id, {"op": "key-in-memory", "key": key})

    def _retry_keys(self, event: ev.RetryKeys, out: Outbox) -> None:
        stack = [self.tasks[key] for key in event.keys if key in self.tasks]
        seen: set[TaskState] = set()
        roots: list[Key] = []
        while stack:
            ts = stack.pop()
            if ts in seen or ts.state != ERRED:
                continue
            seen.add(ts)
            erred_inputs = [dts for dts in ts.dependencies if dts.state == ERRED]
            if erred_inputs:
                stack.extend(erred_inputs)
            else:
                roots.append(ts.key)
        # Tasks that erred only because of a task being retried are retried with it (as
        # Dask's erred -> released does), whichever client wants them.
        frontier = list(seen)
        while frontier:
            for dts in frontier.pop().dependents:
                if dts.state == ERRED and dts not in seen and dts.exception_blame in seen:
                    seen.add(dts)
                    frontier.append(dts)
        # Reset the whole erred chain before anything settles, so that no task sees an erred
        # input and errs again.
        recs: dict[TaskState, str] = {}
        for ts in seen:
            self._forget_error(ts, out)
            for cs in ts.who_wants:
                out.send_client(cs.id, {"op": "task-retried", "key": ts.key})
            ts.state = RELEASED
        for ts in seen:
            self._settle_released(ts, recs)
        out.reply = tuple(roots)
        self._run(recs, out)

    # ------------------------------------------------------------------ worker events
    def _worker_connected(self, event: ev.WorkerConnected, out: Outbox) -> None:
        if event.address in self.workers:
            out.log("warning", f"worker {event.address} registered twice; keeping the first")
            return
        ws = WorkerState(self._next_worker_id, event)
        self._next_worker_id += 1
        self.workers[ws.address] = ws
        self._workers_by_id[ws.id] = ws
        running = ws.status == "running"
        out.policy.append(
            policy.WorkerAdded(ws.id, ws.nthreads, tuple(ws.resources.items()), running)
        )
        if running or self.unplaceable:
            # Only a new worker can make an unplaceable task placeable (a paused one too: the
            # policy then parks the task as NoWorker, waiting for that worker to run).
            recs: dict[TaskState, str] = {}
            self._offer_no_worker_tasks(recs, placeable=running, unplaceable=True)
            self._run(recs, out)

    def _worker_disconnected(self, event: ev.WorkerDisconnected, out: Outbox) -> None:
        ws = self.workers.pop(event.address, None)
        if ws is None:
            return
        del self._workers_by_id[ws.id]
        out.policy.append(policy.WorkerRemoved(ws.id))
        out.close_workers.append(ws.address)
        recs: dict[TaskState, str] = {}
        for ts in list(ws.processing):
            if not event.expected:
                ts.suspicious += 1
            if ts.suspicious > self.allowed_failures:
                self._stop_processing(ts, out)
                ts.state = RELEASED  # erred from released: it no longer runs anywhere
                ts.exception = self._killed_worker(ts.key, ws.address, self.allowed_failures)
                ts.traceback = None
                ts.exception_text = f"KilledWorker: {ts.key!r} on {ws.address}"
                ts.exception_blame = ts
                recs[ts] = ERRED
            else:
                recs[ts] = WAITING
        for ts in ws.has_what:
            ts.who_has.discard(ws)
            if not ts.who_has and ts.state == MEMORY:
                self._lose_data(ts, recs, out)
        ws.has_what.clear()
        for other in self.workers.values():
            out.send_worker(
                other.address,
                {"op": "remove-worker", "worker": ws.address, "stimulus_id": event.stimulus_id},
            )
        if len(self.no_worker) > len(self.unplaceable):
            # A task parked until this worker ran again may have no worker left that could
            # ever run it: the policy tells (Unplaceable, logged) instead of a silent wait.
            self._offer_no_worker_tasks(recs, placeable=True, unplaceable=False)
        self._run(recs, out)

    def _worker_status_changed(self, event: ev.WorkerStatusChanged, out: Outbox) -> None:
        ws = self.workers.get(event.address)
        if ws is None or ws.status == event.status:
            return
        was_running = ws.status == "running"
        ws.status = event.status
        running = ws.status == "running"
        if running != was_running:
            out.policy.append(policy.WorkerStatus(ws.id, running))
        if running:
            recs: dict[TaskState, str] = {}
            self._offer_no_worker_tasks(recs, placeable=True, unplaceable=False)
            self._run(recs, out)

    def _task_finished(self, event: ev.TaskFinished, out: Outbox) -> None:
        ws = self.workers.get(event.worker)
        if ws is None:
            return
        ts = self.tasks.get(event.key)
        recs: dict[TaskState, str] = {}
        if ts is None:
            out.free_keys(ws.address, event.key, self._stimulus_id)
        elif ts.state == PROCESSING and ts.processing_on is ws:
            if ts.run_id == event.run_id:
                self._processing_memory(ts, ws, event, recs, out)
            else:
                recs[ts] = WAITING  # the worker's view of this task is stale: start over
        elif ts.state == MEMORY:
            self._replica_arrived(ts, ws, out)  # computed a second time, e.g. after a steal race
        else:
            out.free_keys(ws.address, event.key, self._stimulus_id)
        self._run(recs, out)

    def _processing_memory(
        self,
        ts: TaskState,
        ws: WorkerState,
        event: ev.TaskFinished,
        recs: dict[TaskState, str],
        out: Outbox,
    ) -> None:
        seceded = ts.long_running
        self._stop_processing(ts, out, event.duration, event.nbytes)
        ts.state = MEMORY
        ts.nbytes = event.nbytes
        ts.type = event.type
        if seceded:
            # Its TaskDone went out when it seceded, without a result size.
            self._replica_arrived(ts, ws, out)
        else:
            self._add_replica(ts, ws)
        self._report_memory(ts, out)
        for dts in ts.dependents:
            if dts.state == WAITING:
                dts.waiting_on.discard(ts)
                if not dts.waiting_on:
                    recs[dts] = READY
        for dts in ts.dependencies:
            dts.waiters.discard(ts)
            self._release_if_unneeded(dts, recs)
        self._release_if_unneeded(ts, recs)

    def _task_erred(self, event: ev.TaskErred, out: Outbox) -> None:
        ws = self.workers.get(event.worker)
        ts = self.tasks.get(event.key)
        if ws is None or ts is None or ts.state != PROCESSING or ts.processing_on is not ws:
            return
        recs: dict[TaskState, str] = {}
        if ts.run_id != event.run_id:
            recs[ts] = WAITING
        elif ts.retries > 0:
            ts.retries -= 1
            recs[ts] = WAITING
        else:
            ts.exception = event.exception
            ts.traceback = event.traceback
            ts.exception_text = event.exception_text
            ts.exception_blame = ts
            if isinstance(ts.erred_on, set):
                ts.erred_on.add(ws.address)
            else:
                ts.erred_on = {ws.address}
            self._to_erred(ts, recs, out)
        self._run(recs, out)

    def _release_worker_data(self, event: ev.ReleaseWorkerData, out: Outbox) -> None:
        ws = self.workers.get(event.worker)
        ts = self.tasks.get(event.key)
        if ws is None or ts is None or ts not in ws.has_what:
            return
        ws.has_what.discard(ts)
        ts.who_has.discard(ws)
        if self._replica_removed_events:
            out.policy.append(policy.ReplicaRemoved(ts.id, ws.id))
        if ts.state == MEMORY and not ts.who_has:
            recs: dict[TaskState, str] = {}
            self._lose_data(ts, recs, out)
            self._run(recs, out)

    def _add_keys(self, event: ev.AddKeys, out: Outbox) -> None:
        ws = self.workers.get(event.worker)
        if ws is None:
            return
        redundant = []
        for key in event.keys:
            ts = self.tasks.get(key)
            if ts is not None and ts.state == MEMORY:
                self._replica_arrived(ts, ws, out)
            else:
                redundant.append(key)
        if redundant:
            out.send_worker(
                ws.address,
                {"op": "remove-replicas", "keys": redundant, "stimulus_id": self._stimulus_id},
            )

    def _request_refresh_who_has(self, event: ev.RequestRefreshWhoHas, out: Outbox) -> None:
        if event.worker not in self.workers:
            return
        who_has = {}
        for key in event.keys:
            ts = self.tasks.get(key)
            if ts is None:
                out.free_keys(event.worker, key, self._stimulus_id)
            else:
                who_has[key] = [ws.address for ws in ts.who_has]
        out.send_worker(
            event.worker,
            {"op": "refresh-who-has", "who_has": who_has, "stimulus_id": self._stimulus_id},
        )

    def _long_running(self, event: ev.LongRunning, out: Outbox) -> None:
        ts = self.tasks.get(event.key)
        ws = self.workers.get(event.worker)
        if ts is None or ws is None or ts.processing_on is not ws or ts.long_running:
            return
        # A seceded task no longer occupies a thread: the policy may give that thread work.
        ts.long_running = True
        out.policy.append(policy.TaskDone(ts.id, ws.id))

    def _reschedule(self, event: ev.Reschedule, out: Outbox) -> None:
        ts = self.tasks.get(event.key)
        ws = self.workers.get(event.worker)
        if ts is None or ws is None or ts.processing_on is not ws:
            return
        recs = {ts: WAITING}
        self._run(recs, out)

    def _policy_decisions(self, event: ev.PolicyDecisions, out: Outbox) -> None:
        recs: dict[TaskState, str] = {}
        newly_unplaceable: dict[str, list[TaskState]] = {}
        for decision in event.decisions:
            ts = self._tasks_by_id.get(decision.task)
            if isinstance(decision, policy.Steal):
                self._request_steal(decision, ts, out)
            elif isinstance(decision, policy.Assignment):
                ws = self._workers_by_id.get(decision.worker)
                if ts is None or ts.state != READY or ws is None or ws.status != "running":
                    # Stale: give the policy its load back and offer the task again.
                    out.policy.append(policy.TaskDone(decision.task, decision.worker))
                    if ts is not None and ts.state == READY:
                        out.policy.append(self._task_ready_event(ts))
                    continue
                if ts.unplaceable_reason is not None:
                    ts.unplaceable_reason = None  # if it becomes unplaceable again, say so
                self._start_processing(ts, ws, out)
            elif ts is not None and ts.state == READY:
                ts.state = NO_WORKER
                self.no_worker.add(ts)
                if isinstance(decision, policy.Unplaceable):
                    self.unplaceable.add(ts)
                    if ts.unplaceable_reason != decision.reason:
                        ts.unplaceable_reason = decision.reason
                        newly_unplaceable.setdefault(decision.reason, []).append(ts)
        for reason, tasks in newly_unplaceable.items():
            out.log("warning", self._unplaceable_message(reason, tasks))
        self._run(recs, out)

    @staticmethod
    def _unplaceable_message(reason: str, tasks: list[TaskState]) -> str:
        example = tasks[0]
        restrictions = []
        if example.worker_restrictions is not None:
            restrictions.append(f"workers={sorted(example.worker_restrictions)}")
        if example.resource_restrictions:
            restrictions.append(f"resources={example.resource_restrictions}")
        count = f"{len(tasks)} task" + ("s" if len(tasks) > 1 else "")
        return (
            f"{count} can never run on the current workers: {reason} (e.g. {example.key!r}"
            f"{' with ' + ', '.join(restrictions) if restrictions else ''}); "
            "waiting for a suitable worker to join"
        )

    def _bandwidth_reported(self, event: ev.BandwidthReported, out: Outbox) -> None:
        """Dask's ``heartbeat_worker`` rule: blend each heartbeat's estimate in with weight
        1 / number of workers. The policy hears of noticeable changes only."""
        value = event.bytes_per_second
        if event.worker not in self.workers or not 0 < value < float("inf"):
            return
        fraction = 1 / len(self.workers)
        self.bandwidth = self.bandwidth * (1 - fraction) + value * fraction
        sent = self._bandwidth_sent
        if self._bandwidth_events and abs(self.bandwidth - sent) > policy.BANDWIDTH_CHANGE * sent:
            self._bandwidth_sent = self.bandwidth
            out.policy.append(policy.BandwidthMeasured(self.bandwidth))

    # ------------------------------------------------------------------ work stealing
    def _request_steal(self, steal: policy.Steal, ts: TaskState | None, out: Outbox) -> None:
        victim = ts.processing_on if ts is not None else None
        thief = self._workers_by_id.get(steal.worker)
        if (
            ts is None
            or victim is None
            or ts.long_running
            or ts in self.steals
            or thief is None
            or thief is victim
            or thief.status != "running"
        ):
            victim_id = victim.id if victim is not None else -1
            out.policy.append(policy.StealResult(steal.task, victim_id, steal.worker, False))
            return
        stimulus_id = f"steal-{self._next_steal_id}"
        self._next_steal_id += 1
        self.steals[ts] = (stimulus_id, thief.id)
        out.send_worker(
            victim.address, {"op": "steal-request", "key": ts.key, "stimulus_id": stimulus_id}
        )

    def _steal_response(self, event: ev.StealResponse, out: Outbox) -> None:
        ts = self.tasks.get(event.key)
        steal = self.steals.get(ts) if ts is not None else None
        if ts is None or steal is None or steal[0] != event.stimulus_id:
            return  # stale: the steal was voided when the task left its worker
        victim = ts.processing_on
        assert victim is not None
        if victim.address != event.worker:
            return  # only the victim answers a steal-request
        del self.steals[ts]
        thief = self._workers_by_id.get(steal[1])
        if event.state in STEAL_CONFIRM_STATES and thief is not None and thief.status == "running":
            self._stop_processing(ts, out)
            self._start_processing(ts, thief, out)
            out.policy.append(policy.StealResult(ts.id, victim.id, thief.id, stolen=True))
            return
        out.policy.append(policy.StealResult(ts.id, victim.id, steal[1], stolen=False))
        if event.state in STEAL_CONFIRM_STATES or event.state in STEAL_UNDEFINED_STATES:
            # The victim let go of the task (or never had it) and the thief cannot take it:
            # start over, which offers the task to the policy again.
            recs: dict[TaskState, str] = {ts: WAITING}
            self._run(recs, out)

    # ------------------------------------------------------------------ cluster-wide
    def _restart(self, event: ev.Restart, out: Outbox) -> None:
        """Every client (pseudo-clients too) releases every key; clients reset their futures.
        With no interest left every task is released (running ones freed on their workers)
        and forgotten."""
        recs: dict[TaskState, str] = {}
        for cs in self.clients.values():
            for ts in cs.wants:
                _unwant(ts, cs)
                self._release_if_unneeded(ts, recs)
            cs.wants.clear()
        self._run(recs, out)
        for cs in self.clients.values():
            out.send_client(cs.id, {"op": "restart"})

    def _retire_workers(self, event: ev.RetireWorkers, out: Outbox) -> None:
        retiring = {self.workers[a] for a in event.addresses if a in self.workers}
        for ws in retiring:
            if ws.status != "closing_gracefully":
                if ws.status == "running":
                    out.policy.append(policy.WorkerStatus(ws.id, False))
                ws.status = "closing_gracefully"
                out.send_worker(
                    ws.address,
                    {
                        "op": "worker-status-change",
                        "status": "closing_gracefully",
                        "stimulus_id": event.stimulus_id,
                    },
                )
        recipients = sorted(
            (ws for ws in self.workers.values() if ws.status == "running"),
            key=lambda ws: (len(ws.has_what), ws.id),
        )
        if not recipients:
            out.log("warning", "no running worker left to take the retiring workers' data")
            return
        # Round-robin over the least loaded recipients; one acquire-replicas per recipient.
        requests: dict[WorkerState, tuple[dict[Key, list[str]], dict[Key, int]]] = {}
        for i, ts in enumerate(self._unique_tasks_on(retiring)):
            target = recipients[i % len(recipients)]
            who_has, nbytes = requests.setdefault(target, ({}, {}))
            who_has[ts.key] = [ws.address for ws in ts.who_has]
            nbytes[ts.key] = ts.nbytes
        for target, (who_has, nbytes) in requests.items():
            out.send_worker(
                target.address,
                {
                    "op": "acquire-replicas",
                    "who_has": who_has,
                    "nbytes": nbytes,
                    "stimulus_id": event.stimulus_id,
                },
            )

    @staticmethod
    def _unique_tasks_on(workers: set[WorkerState]) -> list[TaskState]:
        seen: set[TaskState] = set()
        unique = []
        for ws in workers:
            for ts in ws.has_what:
                if ts not in seen and ts.who_has <= workers:
                    seen.add(ts)
                    unique.append(ts)
        return unique

    def unique_keys_on(self, addresses: Iterable[str]) -> list[Key]:
        """Keys in memory only on these workers (what retiring them would lose)."""
        workers = {self.workers[a] for a in addresses if a in self.workers}
        return [ts.key for ts in self._unique_tasks_on(workers)]

    # ------------------------------------------------------------------ invariants
    def validate(self) -> None:
        """Check every invariant; raise AssertionError naming the first broken one."""
        for key, ts in self.tasks.items():
            assert ts.key == key, ts
            assert self._tasks_by_id[ts.id] is ts, ts
            assert ts.state != FORGOTTEN, ts
            assert ts.who_wants or ts.dependents, f"{ts} is referenced by nothing"
            for dts in ts.dependencies:
                assert ts in dts.dependents, (ts, dts)
                assert dts.state != FORGOTTEN and self.tasks.get(dts.key) is dts, (ts, dts)
            for dts in ts.dependents:
                assert ts in dts.dependencies, (ts, dts)
            expected_waiters = {d for d in ts.dependents if d.state in ACTIVE}
            assert ts.waiters == expected_waiters, (ts, ts.waiters, expected_waiters)
            if ts.state == WAITING:
                expected = {d for d in ts.dependencies if d.state != MEMORY}
                assert ts.waiting_on == expected and expected, (ts, ts.waiting_on)
            else:
                assert not ts.waiting_on, ts
            if ts.state in RUNNABLE:
                assert all(d.state == MEMORY for d in ts.dependencies), ts
            if ts.state in ACTIVE:
                assert self._needed(ts), f"{ts} runs for nobody"
                assert ts.run_spec is not None, ts
            assert (ts.state == MEMORY) == bool(ts.who_has), ts
            if ts.state == MEMORY:
                assert self._needed(ts), f"{ts} holds data nobody needs"
            for ws in ts.who_has:
                assert ts in ws.has_what and self.workers.get(ws.address) is ws, (ts, ws)
            assert (ts.state == PROCESSING) == (ts.processing_on is not None), ts
            if ts.processing_on is not None:
                assert ts in ts.processing_on.processing, ts
                assert self.workers.get(ts.processing_on.address) is ts.processing_on, ts
            assert (ts.state == NO_WORKER) == (ts in self.no_worker), ts
            if ts in self.unplaceable:
                assert ts.state == NO_WORKER and ts.unplaceable_reason is not None, ts
            if ts.state == ERRED:
                blame = ts.exception_blame
                assert blame is not None and blame.state == ERRED, ts
                assert blame is ts or blame.key in self.tasks, ts
            for cs in ts.who_wants:
                assert ts in cs.wants and self.clients.get(cs.id) is cs, (ts, cs)
        assert len(self._tasks_by_id) == len(self.tasks)
        for ts in self.unplaceable:
            assert self.tasks.get(ts.key) is ts, f"{ts} is unplaceable but forgotten"
        assert 0 < self.bandwidth < float("inf"), self.bandwidth
        for address, ws in self.workers.items():
            assert ws.address == address and self._workers_by_id[ws.id] is ws, ws
            for ts in ws.processing:
                assert ts.processing_on is ws and self.tasks.get(ts.key) is ts, (ws, ts)
            for ts in ws.has_what:
                assert ws in ts.who_has and self.tasks.get(ts.key) is ts, (ws, ts)
        assert len(self._workers_by_id) == len(self.workers)
        steal_ids = set()
        for ts, (stimulus_id, thief_id) in self.steals.items():
            assert self.tasks.get(ts.key) is ts, ts
            assert ts.state == PROCESSING and ts.processing_on is not None, ts
            assert ts.processing_on.id != thief_id, (ts, thief_id)
            assert stimulus_id.startswith("steal-") and stimulus_id not in steal_ids, ts
            steal_ids.add(stimulus_id)
        for client_id, cs in self.clients.items():
            assert cs.id == client_id, cs
            for ts in cs.wants:
                assert cs in ts.who_wants and self.tasks.get(ts.key) is ts, (cs, ts)
