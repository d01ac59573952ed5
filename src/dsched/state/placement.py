"""The policy's decisions: assignments, no-worker, unplaceable, and work stealing.

Theory of operation
-------------------
The policy answers ``TaskReady`` events with decisions (``PolicyDecisions``), which may be
stale by the time they arrive: an ``Assignment`` counts only for a task still ``ready`` and
a worker still running (otherwise the policy gets its load back, ``TaskDone``, and the task
is offered again). ``NoWorker`` and ``Unplaceable`` park a ready task in ``no-worker``; an
unplaceable one is logged once per reason and offered again only when a worker joins.

A ``Steal`` becomes Dask's handshake: ``steal-request`` to the victim (with a fresh
``steal-N`` stimulus id, remembered in ``steals``), whose ``steal-response`` says whether it
gave the task up. Only the answer to the steal in flight counts; a task that leaves its
worker in the meantime voids the steal (``Engine._stop_processing``). A confirmed steal
moves the task to the thief (``processing -> processing``, a new ``run_id``); a task the
victim let go of but the thief cannot take starts over.
"""

from __future__ import annotations

from dsched.policy import protocol as policy
from dsched.state import events as ev
from dsched.state.edges import NO_WORKER, READY, WAITING
from dsched.state.engine import Engine, Recommendations
from dsched.state.errors import InvariantError
from dsched.state.outbox import Outbox
from dsched.state.records import TaskState

# A victim's answer to steal-request: it gave the task up / it never had it (distributed's
# stealing.py _WORKER_STATE_CONFIRM / _WORKER_STATE_UNDEFINED); any other state means it
# had already started the task, which stays.
STEAL_CONFIRM_STATES = frozenset({"ready", "constrained", "waiting"})
STEAL_UNDEFINED_STATES = frozenset({"released", None})


class PlacementEvents(Engine):
    def _policy_decisions(self, event: ev.PolicyDecisions, out: Outbox) -> None:
        recs: Recommendations = {}
        newly_unplaceable: dict[str, list[TaskState]] = {}
        for decision in event.decisions:
            ts = self._tasks_by_id.get(decision.task)
            if isinstance(decision, policy.Assignment):  # the common case first
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
            elif isinstance(decision, policy.Steal):
                self._request_steal(decision, ts, out)
            elif ts is not None and ts.state == READY:
                self._move(ts, NO_WORKER, out)
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

    # ------------------------------------------------------------------ work stealing
    def _request_steal(self, steal: policy.Steal, ts: TaskState | None, out: Outbox) -> None:
        victim = ts.processing_on if ts is not None else None
        thief = self._workers_by_id.get(steal.worker)
        if (
            ts is None
            or victim is None
            or ts.long_running
            or ts.actor  # (the policy never places actors: a stale or foreign id)
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
        if victim is None:
            raise InvariantError(f"{ts!r} has a steal in flight but runs on no worker")
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
            recs: Recommendations = {ts: WAITING}
            self._run(recs, out)
