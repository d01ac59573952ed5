"""Event handlers for clients and their graphs: connect, leave, submit, want, release,
cancel, scatter, retry.

Theory of operation
-------------------
A client's interest is the root of all work: ``GraphReceived`` adds tasks (new keys only;
a key already known is reused, whatever its state) and makes the client want its output
keys, ``ClientDesiresKeys`` / ``ClientReleasesKeys`` / ``CancelKeys`` /
``ClientDisconnected`` add and drop wants. Each handler only changes interest and
recommends: a wanted released task is recommended ``waiting``, a task nobody needs any
more ``released`` or ``forgotten`` (``Engine._release_if_unneeded``), and the engine
carries that out. Two handlers move tasks themselves, through ``Engine._move``:
``DataPlaced`` (scattered data: ``released -> memory``) and ``RetryKeys`` (a whole erred
chain ``erred -> released`` before any of it settles, so that none of it sees an erred
input and errs again).

Priorities: ``(-user priority, generation, order)``; a graph more than ``fifo_timeout``
after the previous one starts a new generation, and a graph submitted from a task runs
before its parent's generation.
"""

from __future__ import annotations

from collections.abc import Hashable
from typing import Any

from dsched.policy import protocol as policy
from dsched.state import events as ev
from dsched.state.edges import ERRED, FORGOTTEN, MEMORY, RELEASED, WAITING
from dsched.state.engine import FIRE_AND_FORGET, Engine, Recommendations
from dsched.state.messages import CancelledKeys
from dsched.state.outbox import Outbox
from dsched.state.records import ClientState, Key, TaskState, group_add, unwant
from dsched.state.slicing import GraphInProgress, intake_holder

# Up to this many inputs a task keeps them in a tuple (48 + 8 bytes an input, against 216
# for a set); past it in a frozenset, for membership tests (a P2P barrier's thousands).
SMALL_DEPENDENCIES = 8


class ClientEvents(Engine):
    def _client_connected(self, event: ev.ClientConnected, out: Outbox) -> None:
        self._client(event.client)

    def _client_disconnected(self, event: ev.ClientDisconnected, out: Outbox) -> None:
        self._drop_graph_in_progress(event.client, out)
        cs = self.clients.pop(event.client, None)
        if cs is None:
            return
        recs: Recommendations = {}
        for ts in cs.wants:
            unwant(ts, cs)
            self._release_if_unneeded(ts, recs)
        cs.wants.clear()
        self._run(recs, out)

    def _graph_received(self, event: ev.GraphReceived, out: Outbox) -> None:
        """A whole graph, or one part of a big one (``dsched.state.slicing``)."""
        cs = self.clients.get(event.client)
        if cs is None:
            out.log("info", f"dropping a graph from {event.client}: the client has left")
            return
        progress = self.graphs_in_progress.get(cs.id)
        if event.part == 0 and progress is not None:
            # The parts of an earlier graph stopped coming (a restart overtook it).
            self._drop_graph_in_progress(cs.id, out)
            progress = None
        elif event.part > 0 and progress is None:
            out.log("info", f"dropping part {event.part} of an abandoned graph from {cs.id}")
            return
        partial = event.hold is not None
        tasks = self.tasks
        in_graph = {spec.key for spec in event.tasks}
        new_specs = [spec for spec in event.tasks if spec.key not in tasks]
        lost = [
            dep
            for spec in new_specs
            for dep in spec.dependencies
            if dep not in in_graph and dep not in tasks
        ]
        needed = event.hold if event.hold is not None else event.keys
        lost += [key for key in needed if key not in in_graph and key not in tasks]
        if lost:
            out.send_client(
                cs.id,
                {"op": "cancelled-keys", "keys": list(event.keys), "reason": "lost dependencies"},
            )
            out.log("info", f"graph from {cs.id} needs unknown keys, e.g. {lost[0]!r}")
            if progress is not None:
                self._drop_graph_in_progress(cs.id, out)
            return
        generation = self._generation_for(event) if progress is None else progress.generation
        order = event.order
        for spec in new_specs:
            ts = self._new_task(spec.key, spec.run_spec, spec.annotations)
            annotations = spec.annotations
            ts.priority = (
                -annotations.get("priority", event.user_priority),
                generation,
                order.get(spec.key, 0),
            )
            if annotations:  # (most tasks have none)
                self._apply_restrictions(ts, annotations)
        for spec in new_specs:
            ts = tasks[spec.key]
            keys = spec.dependencies
            if keys:
                inputs = [tasks[dep] for dep in (dict.fromkeys(keys) if len(keys) > 1 else keys)]
                ts.dependencies = (
                    tuple(inputs) if len(inputs) <= SMALL_DEPENDENCIES else frozenset(inputs)
                )
                for dts in inputs:
                    dts.dependents = group_add(dts.dependents, ts)
            out.policy.append(
                policy.TaskAdded(
                    ts.id, ts.priority, tuple([dts.id for dts in ts.dependencies]), ts.prefix
                )
            )
        recs: Recommendations = {}
        wanted = [tasks[key] for key in needed]
        if partial:
            if progress is None:
                holder = self._client(intake_holder(cs.id))
                progress = self.graphs_in_progress[cs.id] = GraphInProgress(holder, generation)
            for ts in wanted:
                self._want(progress.holder, ts)
        else:
            for ts in wanted:
                self._want(cs, ts)
            if event.actors:
                self._flag_actors(event)
        for spec in new_specs:
            ts = tasks[spec.key]
            if not ts.who_wants and not ts.dependents:  # not culled by the intake: drop it
                recs[ts] = FORGOTTEN
        for ts in sorted(wanted, key=lambda t: t.priority, reverse=True):
            if ts.state == RELEASED:
                recs[ts] = WAITING
            elif not partial:
                self._report_state(cs, ts, out)
        self._run(recs, out)
        if progress is None:
            return
        if partial:
            # This part's tasks now wait on these: the holder can let go of them.
            self._let_go(progress.holder, [tasks[k] for k in event.release if k in tasks], out)
        else:
            self._drop_graph_in_progress(cs.id, out)

    def _let_go(self, holder: ClientState, held: list[TaskState], out: Outbox) -> None:
        recs: Recommendations = {}
        for ts in held:
            if ts in holder.wants:
                holder.wants.discard(ts)
                unwant(ts, holder)
                self._release_if_unneeded(ts, recs)
        self._run(recs, out)

    def _drop_graph_in_progress(self, client: str, out: Outbox) -> None:
        """The holder of ``client``'s graph in progress lets go of everything and leaves."""
        progress = self.graphs_in_progress.pop(client, None)
        if progress is not None:
            self._let_go(progress.holder, list(progress.holder.wants), out)
            del self.clients[progress.holder.id]

    def _flag_actors(self, event: ev.GraphReceived) -> None:
        """``actors``: True flags every requested key, a list those keys; anything else is
        ignored. Dask sets the flag on known tasks too, before any of them is placed; a task
        already placed (ready, no-worker, processing, memory) keeps what it is, since its
        worker was not told it is an actor (Dask would then hold an inconsistent state)."""
        actors = event.actors
        keys = event.keys if actors is True else actors
        if not isinstance(keys, list | tuple):
            return
        for key in keys:
            ts = self.tasks.get(key) if isinstance(key, Hashable) else None
            if ts is not None and ts.state in (RELEASED, WAITING, ERRED):
                ts.actor = True

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
        recs: Recommendations = {}
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
        recs: Recommendations = {}
        for key in event.keys:
            ts = self.tasks.get(key)
            if ts is None or ts not in cs.wants:
                continue
            cs.wants.discard(ts)
            unwant(ts, cs)
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
        recs: Recommendations = {}
        cancelled = self._cancel_closure(roots, recs, out, reason="cancel")
        keys = list(dict.fromkeys([*event.keys, *cancelled]))
        msg: CancelledKeys = {
            "op": "cancelled-keys",
            "keys": keys,
            "reason": event.reason,
            "msg": event.msg,
        }
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
            if ts.state != MEMORY:
                self._move(ts, MEMORY, out)
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
        recs: Recommendations = {}
        for ts in seen:
            self._forget_error(ts, out)
            for cs in ts.who_wants:
                out.send_client(cs.id, {"op": "task-retried", "key": ts.key})
            self._move(ts, RELEASED, out)
        for ts in seen:
            self._settle_released(ts, recs)
        out.reply = tuple(roots)
        self._run(recs, out)
