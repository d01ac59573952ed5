"""Event handlers for workers and the tasks they run: join, leave, status, results,
errors, replicas, secede, reschedule, bandwidth.

Theory of operation
-------------------
A worker's message is trusted only as far as the records agree with it: a result counts
only from the worker the task is processing on and for its current ``run_id`` (anything
else is stale: the task starts over, or the worker is told to free the key); a replica
counts only for a task in memory. ``TaskFinished`` moves ``processing -> memory``
and wakes the dependents whose last input it was; ``TaskErred`` errs the task (and,
through the engine, everything depending on it) unless it has retries left.

A worker that leaves takes its replicas and its running tasks with it: a task whose last
replica was there is lost (``Engine._lose_data``: recomputed if still needed), a task it
was running starts over, unless it has now been running on more than ``allowed_failures``
workers that died (an expected loss does not count), in which case it errs with
``KilledWorker``. Workers joining or starting to run offer the no-worker tasks to the
policy again.
"""

from __future__ import annotations

from dsched.policy import protocol as policy
from dsched.state import events as ev
from dsched.state.edges import ERRED, MEMORY, PROCESSING, READY, RELEASED, WAITING
from dsched.state.engine import Engine, Recommendations
from dsched.state.outbox import Outbox
from dsched.state.records import NOTHING, TaskState, WorkerState, group_discard


class WorkerEvents(Engine):
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
        if running and self.actors_pending:
            self._place_pending_actors(out)
        if running or self.unplaceable:
            # Only a new worker can make an unplaceable task placeable (a paused one too: the
            # policy then parks the task as NoWorker, waiting for that worker to run).
            recs: Recommendations = {}
            self._offer_no_worker_tasks(recs, placeable=running, unplaceable=True)
            self._run(recs, out)

    def _worker_disconnected(self, event: ev.WorkerDisconnected, out: Outbox) -> None:
        ws = self.workers.pop(event.address, None)
        if ws is None:
            return
        del self._workers_by_id[ws.id]
        out.policy.append(policy.WorkerRemoved(ws.id))
        out.close_workers.append(ws.address)
        recs: Recommendations = {}
        for ts in list(ws.processing):
            if not event.expected:
                ts.suspicious += 1
            if ts.suspicious > self.allowed_failures:
                self._stop_processing(ts, out)
                # Erred from released: it no longer runs anywhere.
                self._move(ts, RELEASED, out)
                ts.exception = self._killed_worker(ts.key, ws.address, self.allowed_failures)
                ts.traceback = None
                ts.exception_text = f"KilledWorker: {ts.key!r} on {ws.address}"
                ts.exception_blame = ts
                recs[ts] = ERRED
            else:
                recs[ts] = WAITING
        for ts in ws.has_what:
            ts.who_has.discard(ws)
            # An actor lives on one worker (others may hold only proxies to it): lost with it.
            if ts.state == MEMORY and (not ts.who_has or ts in ws.actors):
                self._lose_data(ts, recs, out)
        ws.has_what.clear()
        for other in self.workers.values():
            out.send_worker(
                other.address,
                {"op": "remove-worker", "worker": ws.address, "stimulus_id": self._stimulus_id},
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
            if self.actors_pending:
                self._place_pending_actors(out)
            recs: Recommendations = {}
            self._offer_no_worker_tasks(recs, placeable=True, unplaceable=False)
            self._run(recs, out)

    def _task_finished(self, event: ev.TaskFinished, out: Outbox) -> None:
        ws = self.workers.get(event.worker)
        if ws is None:
            return
        ts = self.tasks.get(event.key)
        recs: Recommendations = {}
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
        recs: Recommendations,
        out: Outbox,
    ) -> None:
        seceded = ts.long_running
        self._stop_processing(ts, out, event.duration, event.nbytes)
        self._move(ts, MEMORY, out)
        ts.nbytes = event.nbytes
        ts.type = event.type
        if seceded or ts.actor:
            # Its TaskDone went out when it seceded, without a result size (an actor's never
            # does: the policy does not place actors).
            self._replica_arrived(ts, ws, out)
            if ts.actor:
                ws.actors.add(ts)  # the actor lives here now
        else:
            # (``_add_replica`` inlined, as the calls below: hot path)
            holders = ts.who_has
            if not isinstance(holders, set):
                holders = ts.who_has = set()
            holders.add(ws)
            ws.has_what.add(ts)
        if ts.who_wants:
            self._report_memory(ts, out)
        for dts in ts.dependents:
            if dts.state == WAITING:
                dts.waiting_on.discard(ts)
                if not dts.waiting_on:
                    dts.waiting_on = NOTHING  # (frees the set: 216 bytes)
                    recs[dts] = READY
        for dts in ts.dependencies:
            dts.waiters = group_discard(dts.waiters, ts)
            if not (dts.who_wants or dts.waiters):
                self._release_if_unneeded(dts, recs)
        if not (ts.who_wants or ts.waiters):
            self._release_if_unneeded(ts, recs)

    def _task_erred(self, event: ev.TaskErred, out: Outbox) -> None:
        ws = self.workers.get(event.worker)
        ts = self.tasks.get(event.key)
        if ws is None or ts is None or ts.state != PROCESSING or ts.processing_on is not ws:
            return
        recs: Recommendations = {}
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
        home = ts.actor and ts in ws.actors  # the actor's own worker dropped it: lost
        if home:
            ws.actors.discard(ts)
        if ts.state == MEMORY and (home or not ts.who_has):
            recs: Recommendations = {}
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
