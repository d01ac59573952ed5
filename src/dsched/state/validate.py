"""``validate()``: every invariant of the records, checked on demand.

Theory of operation
-------------------
The records keep both sides of every relation (a task's dependencies and their
dependents, its holders and their ``has_what``, the worker it runs on and that worker's
``processing``, a client's wants and the task's ``who_wants``), reference counts
(``waiters``, ``waiting_on``) and indexes (``_tasks_by_id``, ``no_worker``, ...) that
must agree with each other and with each task's state. ``validate()`` recomputes what it
can and compares; the first disagreement raises ``InvariantError`` naming the invariant
and the task, worker or client, with explicit checks rather than ``assert`` so that
``python -O`` checks the same. It is O(size of the records): the unit tests run it after
every step, ``--validate`` after every event, the ``dsched_info`` RPC on demand.
"""

from __future__ import annotations

from dsched.state.edges import (
    ACTIVE,
    ERRED,
    FORGOTTEN,
    MEMORY,
    NEXT,
    NO_WORKER,
    PROCESSING,
    READY,
    RUNNABLE,
    WAITING,
)
from dsched.state.engine import Engine
from dsched.state.errors import InvariantError
from dsched.state.records import Key, TaskState


class Validation(Engine):
    def validate(self) -> None:
        """Check every invariant; raise ``InvariantError`` naming the first broken one."""
        for key, ts in self.tasks.items():
            self._validate_task(key, ts)
        if len(self._tasks_by_id) != len(self.tasks):
            raise InvariantError(
                f"task index: {len(self._tasks_by_id)} ids for {len(self.tasks)} tasks"
            )
        for ts in self.unplaceable:
            if self.tasks.get(ts.key) is not ts:
                raise InvariantError(f"unplaceable tasks are known: {ts!r} is forgotten")
        for ts in self.unqueueable:
            if self.tasks.get(ts.key) is not ts:
                raise InvariantError(f"unqueueable tasks are known: {ts!r} is forgotten")
        if not 0 < self.bandwidth < float("inf"):
            raise InvariantError(f"bandwidth is positive and finite: {self.bandwidth!r}")
        self._validate_workers()
        self._validate_steals()
        self._validate_clients()
        self._validate_prefix_counts()

    def _validate_prefix_counts(self) -> None:
        """While kept, ``prefix_counts`` agrees with a recount of the known tasks."""
        counts = self.prefix_counts
        if counts is None:
            return
        recount: dict[tuple[str, str], int] = {}
        for ts in self.tasks.values():
            recount[ts.prefix, ts.state] = recount.get((ts.prefix, ts.state), 0) + 1
        for prefix, row in counts.items():
            for state, n in row.items():
                if state != FORGOTTEN and recount.pop((prefix, state), 0) != n:
                    raise InvariantError(f"prefix counts match the tasks: {prefix!r} {state}")
        if recount:
            raise InvariantError(f"every known task's prefix is counted: {next(iter(recount))}")

    def _validate_task(self, key: Key, ts: TaskState) -> None:
        if ts.key != key:
            raise InvariantError(f"a task is filed under its key: {ts!r} under {key!r}")
        if self._tasks_by_id.get(ts.id) is not ts:
            raise InvariantError(f"a task is filed under its id: {ts!r} (id {ts.id})")
        if ts.state not in NEXT or ts.state == FORGOTTEN:
            raise InvariantError(f"a known task is in a live state: {ts!r}")
        if not (ts.who_wants or ts.dependents):
            raise InvariantError(f"a task is referenced by a client or dependent: {ts!r}")
        for dts in ts.dependencies:
            if ts not in dts.dependents:
                raise InvariantError(f"dependencies are mirrored: {ts!r} not among {dts!r}'s")
            if dts.state == FORGOTTEN or self.tasks.get(dts.key) is not dts:
                raise InvariantError(f"dependencies are known: {ts!r} needs forgotten {dts!r}")
        for dts in ts.dependents:
            if ts not in dts.dependencies:
                raise InvariantError(f"dependents are mirrored: {ts!r} not among {dts!r}'s")
        expected_waiters = {d for d in ts.dependents if d.state in ACTIVE}
        if set(ts.waiters) != expected_waiters or len(ts.waiters) != len(expected_waiters):
            raise InvariantError(
                f"waiters are the active dependents: {ts!r} has {ts.waiters}, "
                f"expected {expected_waiters}"
            )
        if ts.state == WAITING:
            expected = {d for d in ts.dependencies if d.state != MEMORY}
            if ts.waiting_on != expected or not expected:
                raise InvariantError(
                    f"a waiting task waits on its inputs not in memory: {ts!r} waits on "
                    f"{ts.waiting_on}, expected {expected}"
                )
        elif ts.waiting_on:
            raise InvariantError(f"only a waiting task waits on inputs: {ts!r}")
        if ts.state in RUNNABLE and not all(d.state == MEMORY for d in ts.dependencies):
            raise InvariantError(f"a runnable task has every input in memory: {ts!r}")
        if ts.state in ACTIVE:
            if not self._needed(ts):
                raise InvariantError(f"an active task is needed: {ts!r} runs for nobody")
            if ts.run_spec is None:
                raise InvariantError(f"an active task can be computed: {ts!r} has no run_spec")
        if (ts.state == MEMORY) != bool(ts.who_has):
            raise InvariantError(f"a task has replicas iff it is in memory: {ts!r}")
        if ts.state == MEMORY and not self._needed(ts):
            raise InvariantError(f"data in memory is needed: {ts!r} holds data nobody needs")
        for ws in ts.who_has:
            if ts not in ws.has_what or self.workers.get(ws.address) is not ws:
                raise InvariantError(f"replicas are mirrored on known workers: {ts!r} on {ws!r}")
        processing_on = ts.processing_on
        if (ts.state == PROCESSING) != (processing_on is not None):
            raise InvariantError(f"a task runs on a worker iff it is processing: {ts!r}")
        if processing_on is not None:
            if ts not in processing_on.processing:
                raise InvariantError(
                    f"processing is mirrored: {ts!r} not in {processing_on!r}.processing"
                )
            if self.workers.get(processing_on.address) is not processing_on:
                raise InvariantError(f"a task runs on a known worker: {ts!r} on {processing_on!r}")
        if (ts.state == NO_WORKER) != (ts in self.no_worker):
            raise InvariantError(f"no_worker holds exactly the no-worker tasks: {ts!r}")
        if ts in self.unplaceable and (ts.state != NO_WORKER or ts.unplaceable_reason is None):
            raise InvariantError(f"an unplaceable task is no-worker, with a reason: {ts!r}")
        if ts.state == ERRED:
            blame = ts.exception_blame
            if blame is None or blame.state != ERRED:
                raise InvariantError(f"an erred task blames an erred task: {ts!r} ({blame!r})")
            if blame is not ts and blame.key not in self.tasks:
                raise InvariantError(f"an erred task blames a known task: {ts!r} ({blame!r})")
        for cs in ts.who_wants:
            if ts not in cs.wants or self.clients.get(cs.id) is not cs:
                raise InvariantError(f"wants are mirrored on known clients: {ts!r} by {cs!r}")
        if ts.actor or ts in self.actors_pending:
            self._validate_actor(ts)

    def _validate_actor(self, ts: TaskState) -> None:
        """Dask's validate_task_state for actors, and dsched's ``actors_pending``."""
        if not ts.actor:
            raise InvariantError(f"actors_pending holds actors: {ts!r}")
        if ts.state == NO_WORKER or ts in self.no_worker:
            raise InvariantError(f"an actor is never no-worker: {ts!r}")
        if (ts in self.actors_pending) != (ts.state == READY):
            raise InvariantError(f"a ready actor waits for a running worker: {ts!r}")
        if ts.state == MEMORY and sum(ts in ws.actors for ws in ts.who_has) != 1:
            raise InvariantError(f"an actor in memory lives on one of its holders: {ts!r}")
        if ts.state == PROCESSING and (
            ts.processing_on is None or ts not in ts.processing_on.actors
        ):
            raise InvariantError(f"a processing actor is among its worker's actors: {ts!r}")

    def _validate_workers(self) -> None:
        for address, ws in self.workers.items():
            if ws.address != address or self._workers_by_id.get(ws.id) is not ws:
                raise InvariantError(f"a worker is filed under its address and id: {ws!r}")
            for ts in ws.processing:
                if ts.processing_on is not ws or self.tasks.get(ts.key) is not ts:
                    raise InvariantError(
                        f"a worker processes known tasks running there: {ws!r} has {ts!r}"
                    )
            for ts in ws.has_what:
                if ws not in ts.who_has or self.tasks.get(ts.key) is not ts:
                    raise InvariantError(f"a worker holds known tasks: {ws!r} has {ts!r}")
            for ts in ws.actors:
                here = ts.processing_on is ws if ts.state == PROCESSING else ws in ts.who_has
                if not ts.actor or ts.state not in (MEMORY, PROCESSING) or not here:
                    raise InvariantError(
                        f"a worker's actors are actors processing or in memory there: "
                        f"{ws!r} has {ts!r}"
                    )
        if len(self._workers_by_id) != len(self.workers):
            raise InvariantError(
                f"worker index: {len(self._workers_by_id)} ids for {len(self.workers)} workers"
            )

    def _validate_steals(self) -> None:
        steal_ids = set()
        for ts, (stimulus_id, thief_id) in self.steals.items():
            if self.tasks.get(ts.key) is not ts:
                raise InvariantError(f"a steal is of a known task: {ts!r}")
            victim = ts.processing_on
            if ts.state != PROCESSING or victim is None:
                raise InvariantError(f"a steal is of a processing task: {ts!r}")
            if victim.id == thief_id:
                raise InvariantError(f"a steal is to another worker: {ts!r} to {thief_id}")
            if not stimulus_id.startswith("steal-") or stimulus_id in steal_ids:
                raise InvariantError(
                    f"a steal has its own steal-N id: {ts!r} has {stimulus_id!r}"
                )
            steal_ids.add(stimulus_id)

    def _validate_clients(self) -> None:
        for client_id, progress in self.graphs_in_progress.items():
            holder = progress.holder
            if client_id not in self.clients or self.clients.get(holder.id) is not holder:
                raise InvariantError(
                    f"a graph in progress has a known client and holder: {client_id!r}"
                )
        for client_id, cs in self.clients.items():
            if cs.id != client_id:
                raise InvariantError(f"a client is filed under its id: {cs!r} as {client_id!r}")
            for ts in cs.wants:
                if cs not in ts.who_wants or self.tasks.get(ts.key) is not ts:
                    raise InvariantError(f"a client wants known tasks: {cs!r} wants {ts!r}")
