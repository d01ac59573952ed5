"""P2P shuffles and rechunks: the scheduler side of ``distributed.shuffle``.

Theory of operation
-------------------
With a Client and pyarrow installed, dask picks the P2P method for dataframe shuffles
(``set_index``, ``sort_values``, ``shuffle``, hash ``merge``/``join``, ...) and for large
array rechunks. Such a graph has transfer tasks (each hands its input partition to the
worker-side shuffle run and returns the run id), one *barrier* task
``shuffle-barrier-<id>`` carrying the ``ShuffleSpec``, and output ("unpack") tasks that
depend only on the barrier. The data moves worker to worker; the scheduler coordinates,
with the semantics of ``distributed/shuffle/_scheduler_plugin.py`` (2026.8.0), rebuilt
here on dsched's state with distributed's own pure classes (``ShuffleSpec``,
``ShuffleRunSpec``, ``SchedulerShuffleState``, ``barrier_key``, ``id_from_key``):

* **Specs.** Intake keeps each barrier's spec (``GraphReceived.shuffle_specs``); this
  extension holds it while the barrier task exists, and observes transitions only then.
* **Runs.** The first transfer task on a worker calls ``shuffle_get_or_create``: the run is
  created from the spec (``create_new_run``; run ids come from distributed's process-wide
  counter, so they only grow), with every output partition assigned a worker
  (``pick_worker`` over the barrier's allowed workers or all workers, rotated by one per
  shuffle; a hash join's second shuffle reuses the first one's assignment for the output
  tasks they share) and the barrier's dependents exempt from root-task queuing
  (``DisallowQueuing``). Replies are Dask's: ``{"status": "OK", "run_spec": ...}`` or an
  *error dict* (``status: "error"``) that the worker raises.
* **Barrier.** ``shuffle_barrier`` (run by the barrier task) broadcasts
  ``shuffle_inputs_done`` to every participant and answers once all have, retrying
  connection errors every 0.1 s; a participant that left, or three rounds without
  progress, fail it. Inconsistent run ids restart the shuffle instead. The request is
  parked meanwhile: the broadcasts are ``Rpc`` effects, the retry a timer.
* **Pinning.** An output task that runs on a worker other than its partition's calls
  ``shuffle_restrict_task`` and raises ``Reschedule``; the task is then restricted to that
  worker (``SetWorkerRestrictions``), its own restriction saved here (Dask keeps it in
  ``annotations["shuffle_original_restrictions"]``; dsched shares annotation dicts between
  tasks, so it is kept here instead) and restored when the shuffle ends.
* **Ending.** When the barrier is released, errs or is forgotten, the participants get
  ``shuffle-fail`` (which is also how a *successful* shuffle ends: workers close the run
  and delete its files), restrictions are restored and the run is archived under the
  stimulus id. A participant leaving fails its shuffles the same way and restarts them
  (``RecomputeTasks`` over the barrier's dependents, the barrier and its dependencies), as
  does losing the worker that held the barrier's result (Dask's ``remove_worker`` restarts
  what that stimulus archived). ``restart`` forgets everything.
* **Downscaling.** ``participating_workers()`` are kept out of ``workers_to_close``.

Dashboard-only parts of Dask's plugin (shuffle heartbeats) are not kept.
"""

from __future__ import annotations

import itertools
import pickle
from collections import deque
from collections.abc import Hashable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, cast

import cloudpickle  # type: ignore[import-untyped]  # cloudpickle ships no type information
from distributed.shuffle._core import (
    SchedulerShuffleState,
    ShuffleId,
    ShuffleSpec,
    barrier_key,
    id_from_key,
)
from distributed.shuffle._exceptions import P2PConsistencyError, P2PIllegalStateError

from dsched.ext.protocol import (
    Effect,
    Effects,
    Extension,
    Fail,
    Log,
    Observe,
    Reply,
    Request,
    Rpc,
    SetTimer,
    Stimulus,
    ToWorker,
    Transition,
)
from dsched.ext.pubsub import PubSub
from dsched.ext.requests import dask_args, dask_signature
from dsched.state import events as ev
from dsched.state.records import Key, TaskState
from dsched.wire.codec import Frame, Pickled

# The events observed always; transitions only while a barrier's spec is kept.
OBSERVED: frozenset[type] = frozenset({ev.GraphReceived, ev.WorkerDisconnected, ev.Restart})
# Dask's barrier sleeps this long between broadcast rounds that hit connection errors.
BARRIER_RETRY_S = 0.1
BARRIER_MAX_ROUNDS_WITHOUT_PROGRESS = 3
# Worker-loss stimulus ids remembered for the barrier releases they cause (delivered with
# the flush's transitions, after the loss itself was observed).
RECENT_LOSSES = 64
ENDING_STATES = frozenset({"released", "erred", "forgotten"})


# Stubs with the signatures of Dask's handlers (ShuffleSchedulerPlugin's methods).
@dask_signature("ShuffleSchedulerPlugin.get_or_create")
def _get_or_create_args(shuffle_id: str, key: Key, worker: str) -> tuple[str, Key, str]:
    return shuffle_id, key, worker


@dask_signature("ShuffleSchedulerPlugin.get")
def _get_args(id: str, worker: str) -> tuple[str, str]:
    return id, worker


@dask_signature("ShuffleSchedulerPlugin.barrier")
def _barrier_args(id: str, run_id: int, consistent: bool) -> tuple[str, int, bool]:
    return id, run_id, consistent


@dask_signature("ShuffleSchedulerPlugin.restrict_task")
def _restrict_task_args(
    id: str,
    run_id: int,
    key: Key,
    worker: str,
) -> tuple[str, int, Key, str]:
    return id, run_id, key, worker


def error_dict(exc: BaseException) -> dict[str, Any]:
    """``distributed.core.error_message(exc)``: an answer (not an RPC failure) that the
    worker turns back into ``exc`` with ``clean_exception`` and raises."""
    return {
        "status": "error",
        "exception": pickle.dumps(exc, protocol=4),
        "traceback": None,
        "exception_text": repr(exc),
        "traceback_text": "",
    }


def to_pickle(obj: object) -> Pickled:
    """Dask's ``ToPickle``: pickled as distributed's pickler does (cloudpickle, protocol 5,
    buffers out of band); the worker receives the object itself."""
    buffers: list[Frame] = []
    data = cloudpickle.dumps(obj, protocol=5, buffer_callback=lambda b: buffers.append(b.raw()))
    return Pickled.from_bytes(data, buffers)


@dataclass(slots=True)
class _BarrierBroadcast:
    """A parked ``shuffle_barrier``: one broadcast round of ``shuffle_inputs_done`` at a time."""

    request: int
    shuffle: SchedulerShuffleState[Any]
    round: int = 0
    waiting: set[str] = field(default_factory=set)  # this round's unanswered workers
    failed: list[str] = field(default_factory=list)  # this round's connection errors
    sent: int = 0  # how many workers this round went to
    rounds_without_progress: int = 0


class P2PShuffles(Extension):
    name = "p2p"
    rpc_ops: ClassVar = {
        "shuffle_get_or_create": "rpc_get_or_create",
        "shuffle_get": "rpc_get",
        "shuffle_barrier": "rpc_barrier",
        "shuffle_restrict_task": "rpc_restrict_task",
    }
    observes = OBSERVED

    def __init__(self, pubsub: PubSub | None = None) -> None:
        self.pubsub = pubsub
        self.specs: dict[Key, ShuffleSpec[Any]] = {}  # barrier key -> spec, while the task exists
        self.active: dict[str, SchedulerShuffleState[Any]] = {}
        self.runs: dict[str, set[SchedulerShuffleState[Any]]] = {}  # every run, until forgotten
        self.archived_by_stimulus: dict[str, set[SchedulerShuffleState[Any]]] = {}
        self.shift_counter = itertools.count()
        # Output task -> its restriction before a shuffle pinned it.
        self.original_restrictions: dict[Key, frozenset[str] | None] = {}
        self.pinned_by: dict[str, set[Key]] = {}  # shuffle id -> the outputs it pinned
        self.barriers: dict[int, _BarrierBroadcast] = {}  # request id -> its broadcast
        self.recent_losses: deque[str] = deque(maxlen=RECENT_LOSSES)

    def participating_workers(self) -> set[str]:
        """Workers taking part in a running shuffle (``valid_workers_downscaling``)."""
        workers: set[str] = set()
        for shuffle in self.active.values():
            workers |= shuffle.participating_workers
        return workers

    # ------------------------------------------------------------------ observations
    def on_event(self, event: ev.Event, now: float) -> Effects:
        if isinstance(event, ev.GraphReceived):
            return self._graph_received(event)
        if isinstance(event, ev.WorkerDisconnected):
            return self._worker_left(event, now)
        if isinstance(event, ev.Restart):
            self.specs.clear()
            self.active.clear()
            self.runs.clear()
            self.archived_by_stimulus.clear()
            self.original_restrictions.clear()
            self.pinned_by.clear()
            return [Observe(OBSERVED, transitions=False)]
        return ()

    def _graph_received(self, event: ev.GraphReceived) -> Effects:
        had_specs = bool(self.specs)
        tasks = self.state.tasks
        for key, spec in event.shuffle_specs.items():
            # A barrier that already existed keeps its spec, as it keeps its run_spec.
            if key in tasks and key not in self.specs:
                self.specs[key] = spec
        if self.specs and not had_specs:
            return [Observe(OBSERVED, transitions=True)]
        return ()

    def _worker_left(self, event: ev.WorkerDisconnected, now: float) -> Effects:
        """Dask's ``remove_worker`` hook: fail and archive every shuffle the worker took
        part in, then restart what this stimulus archived."""
        stimulus_id = event.stimulus_id or f"{type(event).__name__}-{now}"
        self.recent_losses.append(stimulus_id)
        effects: list[Effect] = []
        for shuffle_id, shuffle in list(self.active.items()):
            if event.address in shuffle.participating_workers:
                message = f"Worker {event.address} left during active {shuffle}"
                effects += self._fail_on_workers(shuffle, str(P2PConsistencyError(message)))
                effects += self._clean(shuffle_id, stimulus_id)
        for shuffle in list(self.archived_by_stimulus.get(stimulus_id, ())):
            effects += self._restart(shuffle.id, stimulus_id)
        return effects

    def on_transitions(self, transitions: Sequence[Transition], now: float) -> Effects:
        effects: list[Effect] = []
        for key, _start, finish, stimulus_id in transitions:
            if finish not in ENDING_STATES:
                continue
            if finish == "erred" and self.active:
                effects += self._report_failure(key, stimulus_id, now)
            shuffle_id = id_from_key(key)
            if not shuffle_id:
                continue
            if (shuffle := self.active.get(shuffle_id)) is not None:
                effects += self._fail_on_workers(shuffle, f"{shuffle} forgotten")
                effects += self._clean(shuffle_id, stimulus_id)
                if stimulus_id in self.recent_losses:
                    # The barrier's result was lost with a worker (Dask restarts what the
                    # worker's removal archived).
                    effects += self._restart(shuffle_id, stimulus_id)
            if finish == "forgotten":
                self._forget(key, shuffle_id)
        if not self.specs and transitions:
            effects.append(Observe(OBSERVED, transitions=False))
        return effects

    def _report_failure(self, key: Key, stimulus_id: str, now: float) -> Effects:
        """A P2P task that is the root cause of an error: the ``p2p-failed`` event, once
        per shuffle (Dask's ``log_event("p2p", ...)``)."""
        ts = self.state.tasks.get(key)
        if ts is None or ts.exception_blame is not ts:
            return ()
        for shuffle in self.active.values():
            if shuffle._failed:
                continue
            barrier = self.state.tasks.get(barrier_key(shuffle.id))
            if barrier is None:
                continue
            if ts is barrier or ts in barrier.dependents or ts in barrier.dependencies:
                shuffle._failed = True
                if self.pubsub is None:
                    return ()
                msg = {"action": "p2p-failed", "shuffle": shuffle.id, "stimulus": stimulus_id}
                return self.pubsub.publish("p2p", msg, now)
        return ()

    def _forget(self, key: Key, shuffle_id: str) -> None:
        self.specs.pop(key, None)
        for shuffle in self.runs.pop(shuffle_id, ()):
            if shuffle._archived_by:
                archived = self.archived_by_stimulus.get(shuffle._archived_by)
                if archived is not None:
                    archived.discard(shuffle)
                    if not archived:
                        del self.archived_by_stimulus[shuffle._archived_by]

    # ------------------------------------------------------------------ ending and restarting
    @staticmethod
    def _fail_on_workers(shuffle: SchedulerShuffleState[Any], message: str) -> list[Effect]:
        msg = {
            "op": "shuffle-fail",
            "shuffle_id": shuffle.id,
            "run_id": shuffle.run_id,
            "message": message,
        }
        return [ToWorker(worker, dict(msg)) for worker in sorted(shuffle.participating_workers)]

    def _clean(self, shuffle_id: str, stimulus_id: str) -> list[Effect]:
        shuffle = self.active.pop(shuffle_id)
        if not shuffle._archived_by:
            shuffle._archived_by = stimulus_id
            self.archived_by_stimulus.setdefault(stimulus_id, set()).add(shuffle)
        restore: dict[Key, frozenset[str] | None] = {}
        for key in self.pinned_by.pop(shuffle_id, ()):
            if key in self.original_restrictions:
                restore[key] = self.original_restrictions.pop(key)
        effects: list[Effect] = [
            Log("warning", f"Shuffle {shuffle_id} deactivated due to stimulus '{stimulus_id}'")
        ]
        if restore:
            effects.append(Stimulus(ev.SetWorkerRestrictions(restore, stimulus_id)))
        return effects

    def _restart(self, shuffle_id: str, stimulus_id: str) -> list[Effect]:
        """Dask's ``_restart_shuffle``: the barrier's dependents, the barrier and its
        dependencies are computed again; not if a dependent erred (the error stands)."""
        barrier = self.state.tasks.get(barrier_key(ShuffleId(shuffle_id)))
        if barrier is None:
            return []
        if any(dts.state == "erred" for dts in barrier.dependents):
            return []
        if barrier.state == "erred" or any(d.state == "erred" for d in barrier.dependencies):
            error = P2PIllegalStateError(
                f"Expected {barrier!r} and its dependents to be 'erred' if the barrier or "
                "one of its dependencies is"
            )
            return [Log("error", f"internal error: shuffle {shuffle_id} not restarted: {error}")]
        keys = [
            *_keys(barrier.dependents),
            barrier.key,
            *_keys(barrier.dependencies),
        ]
        return [
            Stimulus(ev.RecomputeTasks(keys, stimulus_id)),
            Log("warning", f"Shuffle {shuffle_id} restarted due to stimulus '{stimulus_id}'"),
        ]

    # ------------------------------------------------------------------ RPCs
    def rpc_get_or_create(self, request: Request, now: float) -> Effects:
        shuffle_id, key, worker = dask_args(_get_or_create_args, request.args)
        effects: list[Effect] = []
        try:
            try:
                run_spec = self._get(shuffle_id, worker)
            except KeyError:
                run_spec = self._create(shuffle_id, key, worker, effects)
        except P2PConsistencyError as exc:
            return [*effects, Reply(request.id, error_dict(exc))]
        return [*effects, Reply(request.id, {"status": "OK", "run_spec": to_pickle(run_spec)})]

    def rpc_get(self, request: Request, now: float) -> Effects:
        shuffle_id, worker = dask_args(_get_args, request.args)
        try:
            try:
                run_spec = self._get(shuffle_id, worker)
            except KeyError as exc:
                missing = f"No active shuffle with id={shuffle_id!r} found"
                raise P2PConsistencyError(missing) from exc
        except P2PConsistencyError as exc:
            return [Reply(request.id, error_dict(exc))]
        return [Reply(request.id, {"status": "OK", "run_spec": to_pickle(run_spec)})]

    def _get(self, shuffle_id: str, worker: str) -> Any:
        if worker not in self.state.workers:
            raise P2PConsistencyError(f"Scheduler is unaware of this worker {worker!r}")
        shuffle = self.active[shuffle_id]
        shuffle.participating_workers.add(worker)
        return shuffle.run_spec

    def _create(self, shuffle_id: str, key: Key, worker: str, effects: list[Effect]) -> Any:
        tasks = self.state.tasks
        bkey = barrier_key(ShuffleId(shuffle_id))
        barrier = tasks.get(bkey)
        spec = self.specs.get(bkey)
        if barrier is None or spec is None:
            raise P2PConsistencyError(
                f"Barrier task with key {bkey!r} does not exist. This may be caused by "
                "task fusion during graph generation. Please let us know that you ran "
                "into this by leaving a comment at distributed#7816."
            )
        ts = tasks.get(key)
        if ts is None or ts.state != "processing":
            raise P2PConsistencyError(
                f"Expected {ts!r} to be processing, is {ts.state if ts else 'forgotten'}."
            )
        worker_for = self._assign_outputs(spec, barrier)
        effects.append(Stimulus(ev.DisallowQueuing(_keys(barrier.dependents))))
        shuffle = spec.create_new_run(worker_for=worker_for, span_id=None)
        self.active[shuffle_id] = shuffle
        self.runs.setdefault(shuffle_id, set()).add(shuffle)
        shuffle.participating_workers.add(worker)
        effects.append(
            Log(
                "warning",
                f"Shuffle {shuffle_id} initialized by task {key!r} executed on worker {worker}",
            )
        )
        return shuffle.run_spec

    def _assign_outputs(self, spec: ShuffleSpec[Any], barrier: TaskState) -> dict[Any, str]:
        """Dask's ``_calculate_worker_for``: a worker per output partition, aligned with
        another active shuffle sharing output tasks (the two sides of a hash join)."""
        workers = self._candidate_workers(barrier)
        shift = next(self.shift_counter) % len(workers)
        workers = workers[shift:] + workers[:shift]
        existing: dict[Any, str] = {}
        seen = {barrier}
        for dependent in barrier.dependents:
            for other in dependent.dependencies:
                if other in seen:
                    continue
                seen.add(other)
                other_id = id_from_key(other.key)
                if not other_id or (shuffle := self.active.get(other_id)) is None:
                    continue
                current = shuffle.run_spec.worker_for
                for shared in existing.keys() & current.keys():
                    if existing[shared] != current[shared]:
                        raise P2PIllegalStateError(
                            f"Failed to initialize shuffle {spec.id} because it cannot align "
                            f"output partition mappings between existing shuffles {seen}. "
                            f"Mismatch encountered for output partition {shared!r}: "
                            f"{existing[shared]} != {current[shared]}."
                        )
                existing.update(current)
        return {
            partition: existing.get(partition) or spec.pick_worker(partition, workers)
            for partition in spec.output_partitions
        }

    def _candidate_workers(self, barrier: TaskState) -> list[str]:
        workers = self.state.workers
        names = barrier.worker_restrictions
        if not names:
            return list(workers)
        allowed = [
            ws.address
            for ws in workers.values()
            if ws.address in names or ws.host in names or str(ws.name) in names
        ]
        return allowed or sorted(names)

    def rpc_restrict_task(self, request: Request, now: float) -> Effects:
        shuffle_id, run_id, key, worker = dask_args(_restrict_task_args, request.args)
        shuffle = self.active[shuffle_id]  # KeyError: raised to the worker, as in Dask
        if shuffle.run_id > run_id:
            error = P2PConsistencyError(f"Request stale, expected run_id={run_id} for {shuffle}")
            return [Reply(request.id, error_dict(error))]
        if shuffle.run_id < run_id:
            error = P2PConsistencyError(f"Request invalid, expected run_id={run_id} for {shuffle}")
            return [Reply(request.id, error_dict(error))]
        ts = self.state.tasks[key]
        self.pinned_by.setdefault(shuffle_id, set()).add(key)
        effects: list[Effect] = []
        if key not in self.original_restrictions:
            # Already pinned by the other side of a hash join: keep the first original.
            self.original_restrictions[key] = ts.worker_restrictions
            restriction = ev.SetWorkerRestrictions({key: frozenset({worker})}, request.op)
            effects.append(Stimulus(restriction))
        return [*effects, Reply(request.id, {"status": "OK"})]

    # ------------------------------------------------------------------ the barrier
    def rpc_barrier(self, request: Request, now: float) -> Effects:
        shuffle_id, run_id, consistent = dask_args(_barrier_args, request.args)
        shuffle = self.active[shuffle_id]  # KeyError: raised to the worker, as in Dask
        if shuffle.run_id != run_id:
            return [Fail(request.id, ValueError(f"run_id={run_id} does not match {shuffle}"))]
        if not consistent:
            return [
                Log(
                    "warning",
                    f"Shuffle {shuffle_id} restarted due to data inconsistency during barrier",
                ),
                *self._restart(shuffle_id, f"p2p-barrier-inconsistent-{now}"),
                Reply(request.id, None),
            ]
        broadcast = _BarrierBroadcast(request.id, shuffle)
        self.barriers[request.id] = broadcast
        return self._broadcast(broadcast, sorted(shuffle.participating_workers))

    def _broadcast(self, broadcast: _BarrierBroadcast, workers: list[str]) -> Effects:
        if not workers:
            del self.barriers[broadcast.request]
            return [Reply(broadcast.request, None)]
        broadcast.round += 1
        broadcast.waiting = set(workers)
        broadcast.failed = []
        broadcast.sent = len(workers)
        shuffle = broadcast.shuffle
        msg = {"op": "shuffle_inputs_done", "shuffle_id": shuffle.id, "run_id": shuffle.run_id}
        return [
            Rpc(worker, dict(msg), ("barrier", broadcast.request, broadcast.round, worker))
            for worker in workers
        ]

    def on_rpc_reply(
        self, token: Hashable, reply: Any, error: BaseException | None, now: float
    ) -> Effects:
        # Our own ("barrier", request, round, worker) tokens.
        _, request, round_, worker = cast(tuple[str, int, int, str], token)
        broadcast = self.barriers.get(request)
        if broadcast is None or broadcast.round != round_ or worker not in broadcast.waiting:
            return ()
        broadcast.waiting.discard(worker)
        if isinstance(error, OSError):
            broadcast.failed.append(worker)
        elif error is not None or (isinstance(reply, dict) and "error" in str(reply.get("status"))):
            text = repr(error) if error is not None else str(reply.get("exception_text"))
            del self.barriers[request]
            problem = RuntimeError(f"Unexpected error encountered during P2P barrier: {text}")
            return [Fail(request, problem)]
        if broadcast.waiting:
            return ()
        return self._round_done(broadcast, now)

    def _round_done(self, broadcast: _BarrierBroadcast, now: float) -> Effects:
        failed = broadcast.failed
        if not failed:
            del self.barriers[broadcast.request]
            return [Reply(broadcast.request, None)]
        shuffle = broadcast.shuffle
        retrying = f"Failure during broadcast of {shuffle.id}, retrying."
        effects: list[Effect] = [Log("warning", retrying)]
        problem: Exception | None = None
        if any(worker not in self.state.workers for worker in failed):
            if not shuffle.archived:
                problem = P2PIllegalStateError(
                    "Expected shuffle to be archived if participating worker is not known by "
                    "scheduler"
                )
            else:
                problem = RuntimeError(f"Worker {failed} left during shuffle {shuffle}")
        elif len(failed) == broadcast.sent:
            broadcast.rounds_without_progress += 1
            if broadcast.rounds_without_progress >= BARRIER_MAX_ROUNDS_WITHOUT_PROGRESS:
                problem = RuntimeError(
                    f"Broadcast not making progress for {shuffle}. Aborting. This is possibly "
                    "due to overloaded workers. Increasing config "
                    "`distributed.comm.timeouts.connect` timeout may help."
                )
        if problem is not None:
            del self.barriers[broadcast.request]
            return [*effects, Fail(broadcast.request, problem)]
        return [*effects, SetTimer(("barrier-retry", broadcast.request), now + BARRIER_RETRY_S)]

    def on_timer(self, token: Hashable, now: float) -> Effects:
        request = cast(tuple[str, int], token)[1]  # our own ("barrier-retry", request) tokens
        broadcast = self.barriers.get(request)
        if broadcast is None:
            return ()
        return self._broadcast(broadcast, list(broadcast.failed))

    def on_request_dropped(self, request: int, now: float) -> Effects:
        self.barriers.pop(request, None)
        return ()


def _keys(tasks: Iterable[TaskState]) -> list[Key]:
    # Sorted by priority so that the order is the graph's, not a set's.
    return [ts.key for ts in sorted(tasks, key=lambda ts: ts.priority)]
