"""An in-memory scheduler for tests: the core (state machine + policy + extensions), no
network.

It drives the same ``dsched.core.Core`` the server runs, one tick per step. Every step
runs ``validate()``. Messages the state machine sends are recorded per peer, so
tests assert on what was *sent*, and ``run_until_idle`` plays the workers by completing
every compute-task it sees (optionally with an error).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping
from typing import Any

from dsched.core import Core, Flush
from dsched.ext.protocol import Extension
from dsched.policy.locality import LocalityPolicy
from dsched.policy.protocol import Policy, PolicyEvent, wanted_events
from dsched.state import events as ev
from dsched.state.machine import SchedulerState
from dsched.state.outbox import Message, Outbox


def killed_worker(key: Any, address: str, allowed_failures: int) -> object:
    return ("KilledWorker", key, address, allowed_failures)


class Harness:
    def __init__(
        self,
        policy: Policy | None = None,
        allowed_failures: int = 3,
        bandwidth: float = 100e6,
        extensions: Iterable[Extension] = (),
    ) -> None:
        self.policy: Policy = policy if policy is not None else LocalityPolicy()
        self.state = SchedulerState(
            killed_worker=killed_worker,
            allowed_failures=allowed_failures,
            wants=wanted_events(self.policy),
            bandwidth=bandwidth,
        )
        self._policy_events: list[PolicyEvent] = []
        self.core = Core(
            self.state,
            self.policy,
            list(extensions),
            validate=True,
            policy_observer=lambda events, decisions, now: self._policy_events.extend(events),
        )
        self.last_flush: Flush | None = None
        self.now = 1000.0
        self.to_workers: dict[str, list[Message]] = defaultdict(list)
        self.to_clients: dict[str, list[Message]] = defaultdict(list)
        self.logs: list[tuple[str, str]] = []  # what the reactor would log, in order

    # -------------------------------------------------------------- driving
    def step(self, event: ev.Event) -> Outbox:
        """One tick: apply ``event``, flush; returns everything the tick sent."""
        self.now += 0.001
        reply = self.core.handle(event, self.now)
        out = self.tick()
        out.reply = reply
        return out

    def tick(self) -> Outbox:
        """Flush the core (after ``core.request`` / ``core.stream`` calls, say), record what
        it sent, and return it; the whole ``Flush`` is in ``last_flush``."""
        flush = self.last_flush = self.core.flush(self.now)
        total = flush.out
        # The policy consumed the tick's events; the returned record shows them all.
        total.policy, self._policy_events = self._policy_events, []
        for address, msgs in total.to_workers.items():
            self.to_workers[address].extend(msgs)
        for client, msgs in total.to_clients.items():
            self.to_clients[client].extend(msgs)
        self.logs.extend(total.logs)
        return total

    def add_worker(self, address: str, nthreads: int = 1, **kwargs: Any) -> Outbox:
        return self.step(ev.WorkerConnected(address, nthreads, **kwargs))

    def add_client(self, client: str = "c") -> Outbox:
        return self.step(ev.ClientConnected(client))

    def submit(
        self,
        graph: Mapping[Any, Iterable[Any]],
        keys: Iterable[Any],
        client: str = "c",
        annotations: Mapping[Any, Mapping[str, Any]] | None = None,
        order: Mapping[Any, int] | None = None,
    ) -> Outbox:
        """Send a graph ``{key: dependencies}``; run_specs are placeholder strings."""
        annotations = annotations or {}
        tasks = [
            ev.NewTask(key, tuple(deps), f"run-{key}", dict(annotations.get(key, {})))
            for key, deps in graph.items()
        ]
        order = order if order is not None else {key: i for i, key in enumerate(graph)}
        return self.step(ev.GraphReceived(client, tasks, list(keys), order))

    # -------------------------------------------------------------- playing the workers
    def processing(self) -> dict[Any, str]:
        """{key: worker address} of every task the scheduler believes is running."""
        return {
            ts.key: ts.processing_on.address
            for ts in self.state.tasks.values()
            if ts.processing_on is not None
        }

    def finish(self, key: Any, nbytes: int = 8, worker: str | None = None) -> Outbox:
        ts = self.state.tasks[key]
        address = worker or ts.processing_on.address
        return self.step(ev.TaskFinished(address, key, ts.run_id, nbytes, type=b"int"))

    def fail(self, key: Any, exception: object = "boom") -> Outbox:
        ts = self.state.tasks[key]
        return self.step(ev.TaskErred(ts.processing_on.address, key, ts.run_id, exception, "tb"))

    def run_until_idle(self, fail: Iterable[Any] = (), limit: int = 100_000) -> None:
        fail = set(fail)
        for _ in range(limit):
            running = self.processing()
            if not running:
                return
            key = min(running, key=lambda k: self.state.tasks[k].priority)
            if key in fail:
                self.fail(key)
            else:
                self.finish(key)
        raise AssertionError("the graph did not finish")

    # -------------------------------------------------------------- inspecting
    def client_ops(self, client: str = "c") -> list[tuple[str, Any]]:
        return [(m["op"], m.get("key", m.get("keys"))) for m in self.to_clients[client]]

    def worker_ops(self, address: str, op: str) -> list[Message]:
        return [m for m in self.to_workers[address] if m["op"] == op]

    def freed_on(self, address: str) -> list[Any]:
        return [key for m in self.worker_ops(address, "free-keys") for key in m["keys"]]
