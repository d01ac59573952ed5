"""Cluster-wide events: restart and worker retirement.

Theory of operation
-------------------
``Restart``: every client (pseudo-clients too) lets go of every key, so every task is
released (running ones freed on their workers) and forgotten; clients are told to reset.

``RetireWorkers`` is idempotent and repeated by the reactor until ``unique_keys_on`` is
empty: it marks the workers ``closing_gracefully`` (the policy stops placing tasks on
them) and asks the least loaded running workers, round-robin, to copy every key held only
by the retiring workers (one ``acquire-replicas`` per recipient). The copies come back as
``AddKeys``; the reactor then removes the workers as an expected loss.
"""

from __future__ import annotations

from collections.abc import Iterable

from dsched.policy import protocol as policy
from dsched.state import events as ev
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
