"""Cluster-wide events: restart, worker retirement, resources and replica drops.

Theory of operation
-------------------
``Restart``: every client (pseudo-clients too) lets go of every key, so every task is
released (running ones freed on their workers) and forgotten; clients are told to reset.

``RetireWorkers`` is idempotent and repeated by the reactor until ``unique_keys_on`` is
empty: it marks the workers ``closing_gracefully`` (the policy stops placing tasks on
them) and asks the least loaded running workers, round-robin, to copy every key held only
by the retiring workers (one ``acquire-replicas`` per recipient). The copies come back as
``AddKeys``; the reactor then removes the workers as an expected loss.

``WorkerResourcesSet`` (``set_resources``) merges a worker's new resources in, tells the
policy (``WorkerResources``) and offers the no-worker tasks again. ``DropReplicas`` (the
active memory manager, ``replicate``, ``rebalance``) forgets replicas at once, never a
key's last one, and sends ``remove-replicas``; a worker that must keep one answers with
``add-keys``.

P2P shuffles (``dsched.ext.p2p``) drive three events: ``SetWorkerRestrictions`` (Dask's
``set_restrictions``: pin a shuffle's output task to the worker holding its partition, and
restore the task's own restriction afterwards), ``DisallowQueuing`` (output tasks never wait
in a root-task queue) and ``RecomputeTasks`` (restart a shuffle: its barrier, the barrier's
dependents and dependencies are thrown away and computed again where still needed).
"""

from __future__ import annotations

from collections.abc import Iterable

from dsched.policy import protocol as policy
from dsched.state import events as ev
from dsched.state.edges import MEMORY, NO_WORKER, PROCESSING, READY
from dsched.state.engine import Engine, Recommendations
from dsched.state.outbox import Outbox
from dsched.state.records import Key, TaskState, WorkerState, unwant


class ClusterEvents(Engine):
    def _restart(self, event: ev.Restart, out: Outbox) -> None:
        """Every client (pseudo-clients too) releases every key; clients reset their futures.
        With no interest left every task is released (running ones freed on their workers)
        and forgotten."""
        recs: Recommendations = {}
        for cs in self.clients.values():
            for ts in cs.wants:
                unwant(ts, cs)
                self._release_if_unneeded(ts, recs)
            cs.wants.clear()
        self._run(recs, out)
        # Graphs whose parts were still arriving are dropped (the server stops feeding them).
        for progress in self.graphs_in_progress.values():
            del self.clients[progress.holder.id]
        self.graphs_in_progress.clear()
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
                        "stimulus_id": self._stimulus_id,
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
        movable = [ts for ts in self._unique_tasks_on(retiring) if not ts.actor]  # never moved
        for i, ts in enumerate(movable):
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
                    "stimulus_id": self._stimulus_id,
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

    def _worker_resources_set(self, event: ev.WorkerResourcesSet, out: Outbox) -> None:
        """Dask's ``add_resources``: merged into the worker's resources; the policy hears
        of the new set, and tasks parked for want of a worker are offered again."""
        ws = self.workers.get(event.address)
        if ws is None:
            return
        ws.resources.update(event.resources)
        out.policy.append(policy.WorkerResources(ws.id, tuple(ws.resources.items())))
        recs: Recommendations = {}
        self._offer_no_worker_tasks(recs, placeable=True, unplaceable=True)
        self._run(recs, out)
        if self.actors_pending:
            self._place_pending_actors(out)  # an actor may have waited for these resources

    def _drop_replicas(self, event: ev.DropReplicas, out: Outbox) -> None:
        """Dask's ``request_remove_replicas``: forget the replicas now, never a last one,
        and tell the worker (which answers ``add-keys`` for one it must keep)."""
        ws = self.workers.get(event.worker)
        if ws is None:
            return
        dropped: list[Key] = []
        for key in event.keys:
            ts = self.tasks.get(key)
            if ts is None or ts.state != MEMORY or ws not in ts.who_has or len(ts.who_has) < 2:
                continue
            if ts.actor:
                continue  # an actor lives on one worker; other holders have handles to it
            ts.who_has.discard(ws)
            ws.has_what.discard(ts)
            if self._replica_removed_events:
                out.policy.append(policy.ReplicaRemoved(ts.id, ws.id))
            dropped.append(key)
        if dropped:
            out.send_worker(
                ws.address,
                {"op": "remove-replicas", "keys": dropped, "stimulus_id": self._stimulus_id},
            )

    def _set_worker_restrictions(self, event: ev.SetWorkerRestrictions, out: Outbox) -> None:
        recs: Recommendations = {}
        for key, names in event.restrictions.items():
            ts = self.tasks.get(key)
            if ts is None:
                continue
            ts.worker_restrictions = names
            if ts.state == NO_WORKER:
                recs[ts] = READY  # offered again under the new restriction
        self._run(recs, out)

    def _disallow_queuing(self, event: ev.DisallowQueuing, out: Outbox) -> None:
        for key in event.keys:
            ts = self.tasks.get(key)
            if ts is not None:
                self.unqueueable.add(ts)

    def _recompute_tasks(self, event: ev.RecomputeTasks, out: Outbox) -> None:
        """Each task's result or run is dropped as if lost (``_lose_data`` tells the clients
        and restarts running dependents; a released task that is still needed waits again).
        Callers list dependents before their dependencies, as Dask's restart does."""
        recs: Recommendations = {}
        for key in event.keys:
            ts = self.tasks.get(key)
            if ts is None or ts.actor:
                continue
            if ts.state == MEMORY:
                self._free_replicas(ts, out)
                self._lose_data(ts, recs, out)
            elif ts.state == PROCESSING:
                self._processing_released(ts, recs, out)
            elif ts.state in (READY, NO_WORKER):
                self._ready_released(ts, recs, out)
        self._run(recs, out)
