"""A discrete-event model of a Dask cluster that drives the real runtime and any policy.

Theory of operation
-------------------
The scheduler side is not modelled: it *is* ``SchedulerState`` (the runtime) plus the policy,
wired as the reactor wires them. Every event delivered to the scheduler is handled at once and
its outbox is merged into the tick's pending outbox; one *flush* per simulated instant runs
the policy on the accumulated policy events (the dirty flag), feeds the decisions back, and
sends each peer's messages. Messages travel ``latency`` seconds each way.

Workers are modelled as Dask workers behave, at the level the scheduler can see:

* ``compute-task``: fetch the inputs it lacks from a holder (each worker's inbound link
  carries one transfer at a time at ``bandwidth``; concurrent needs of one key share a
  fetch; a fetched replica is reported with ``add-keys``), then queue it by priority; run at
  most ``nthreads`` tasks at a time, each for its duration in the graph; report
  ``task-finished`` with the run_id of the latest ``compute-task``, the output size and the
  compute time. A ``compute-task`` for a key held in memory is answered at once.
* ``free-keys`` drops data and forgets queued tasks (a running one finishes unreported);
  ``remove-replicas`` drops data and answers ``release-worker-data``.
* ``steal-request`` answers ``steal-response`` with the local state (``waiting`` while
  fetching, ``ready`` while queued: both give the task up; ``executing``, ``memory``, or None
  for an unknown key).
* Bandwidth: each worker keeps Dask's estimate (``assumed_bandwidth`` at first, then a 0.95 /
  0.05 moving average of each fetch of more than 1 MB, timed from the start of the transfer
  to its arrival) and reports it in a heartbeat (``BandwidthReported``) every
  ``HEARTBEAT_INTERVAL`` while it has work; idle workers skip heartbeats so that a finished
  or deadlocked run runs out of events.

The runtime turns these into the optional policy events the policy asked for: fetched
replicas (``add-keys``) and ``release-worker-data`` into ``ReplicaAdded`` /
``ReplicaRemoved``, heartbeats into ``BandwidthMeasured``. A task the policy declares
``Unplaceable`` waits in ``no-worker`` as in a real scheduler; its warning is in
``SimResult.warnings``, and a run that cannot finish because of it says so.

Memory per worker is the sum of the output sizes it holds (results and replicas); the peak is
reported. Event order is total (time, then sequence number) and nothing is random except the
graph's seeded durations, so a run is deterministic.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from dsched.core import Core
from dsched.policy.protocol import (
    Decision,
    Policy,
    PolicyEvent,
    Steal,
    StealResult,
    wanted_events,
)
from dsched.sim.graphs import Key, SimGraph
from dsched.state import events as ev
from dsched.state.machine import SchedulerState
from dsched.state.messages import ComputeTask, WorkerMessage

CLIENT = "sim-client"
# Dask's heartbeat interval for clusters of up to 10 workers (seconds).
HEARTBEAT_INTERVAL = 0.5
# Dask workers fold only transfers larger than this into their bandwidth estimate.
BANDWIDTH_MIN_BYTES = 1_000_000


class SimulationError(Exception):
    """The simulated run could not finish (deadlock, time limit, or a model bug)."""


@dataclass(frozen=True, slots=True)
class ClusterSpec:
    n_workers: int = 2
    nthreads: int = 1
    bandwidth: float = 100e6  # bytes per second, per worker inbound link
    latency: float = 0.001  # seconds per message, each way
    # When each worker joins (default: all at time 0). Shorter than n_workers: the rest at 0.
    join_times: tuple[float, ...] = ()
    # Abstract resources per worker index, e.g. {0: {"GPU": 1}}.
    resources: tuple[tuple[int, tuple[tuple[str, float], ...]], ...] = ()
    # distributed.scheduler.bandwidth: what the scheduler and the workers assume before they
    # measure transfers. None: the true ``bandwidth`` (nothing to learn).
    assumed_bandwidth: float | None = None

    def address(self, index: int) -> str:
        return f"tcp://10.0.0.{index + 1}:8000"


@dataclass(frozen=True, slots=True)
class Execution:
    """One task run, for the Gantt chart."""

    worker: int
    thread: int
    key: Key
    start: float
    stop: float


@dataclass(slots=True)
class SimResult:
    policy: str
    graph: str
    makespan: float
    bytes_transferred: int
    transfers: int
    peak_memory: dict[str, int]
    executed: int
    steals_requested: int
    steals_succeeded: int
    executions: list[Execution] = field(default_factory=list)
    placement: dict[Key, str] = field(default_factory=dict)  # where each result was computed
    warnings: list[str] = field(default_factory=list)  # what the scheduler logged as warnings
    bandwidth_estimate: float = 0.0  # the runtime's estimate at the end of the run


class _WTask:
    __slots__ = ("key", "missing", "priority", "run_id", "state")

    def __init__(self, key: Key, run_id: int, priority: Any) -> None:
        self.key = key
        self.run_id = run_id
        self.priority = priority
        self.missing: set[Key] = set()
        self.state = "waiting"  # waiting (fetching) -> ready -> executing


class _Worker:
    def __init__(self, sim: Simulation, index: int, address: str, nthreads: int) -> None:
        self.sim = sim
        self.index = index
        self.address = address
        self.nthreads = nthreads
        self.free_threads = list(range(nthreads))
        self.data: dict[Key, int] = {}
        self.memory = 0
        self.peak = 0
        self.tasks: dict[Key, _WTask] = {}
        self.ready: list[tuple[Any, int, Key]] = []
        self.fetching: dict[Key, list[Key]] = {}
        self.link_free = 0.0
        self.cancelled: set[Key] = set()  # executing tasks the scheduler freed
        self.bandwidth = sim.assumed_bandwidth  # this worker's estimate, as a Dask worker's
        self.heartbeat_scheduled = False

    # ---------------------------------------------------------------- memory
    def _store(self, key: Key, nbytes: int) -> None:
        if key in self.data:
            return
        self.data[key] = nbytes
        self.memory += nbytes
        self.peak = max(self.peak, self.memory)

    def _drop(self, key: Key) -> None:
        nbytes = self.data.pop(key, None)
        if nbytes is not None:
            self.memory -= nbytes

    # ---------------------------------------------------------------- messages
    def receive(self, msg: WorkerMessage) -> None:
        # (Tests of msg["op"] itself, not of a copy: that is what narrows the record type.)
        if msg["op"] == "compute-task":
            self._compute(msg)
            self._schedule_heartbeat()
        elif msg["op"] == "free-keys":
            for key in msg["keys"]:
                self._free(key)
        elif msg["op"] == "remove-replicas":
            for key in msg["keys"]:
                if key in self.data and not self._needed_locally(key):
                    self._drop(key)
                    self.sim.to_scheduler(ev.ReleaseWorkerData(self.address, key))
        elif msg["op"] == "steal-request":
            self._steal(msg["key"], msg["stimulus_id"])
        # remove-worker, refresh-who-has, close: nothing to model

    def _needed_locally(self, key: Key) -> bool:
        return any(key in self.sim.graph.tasks[t].dependencies for t in self.tasks)

    def _compute(self, msg: ComputeTask) -> None:
        key = msg["key"]
        if key in self.data:
            self._report(key, msg["run_id"], 0.0)
            return
        existing = self.tasks.get(key)
        if existing is not None:
            existing.run_id = msg["run_id"]
            self.cancelled.discard(key)
            return
        task = _WTask(key, msg["run_id"], msg["priority"])
        self.tasks[key] = task
        # In graph order, not message order: the runtime lists inputs in set order, which
        # differs from run to run, and the order decides which fetch uses the link first.
        order = self.sim.graph.order
        who_has = msg["who_has"]
        for dep in sorted(who_has, key=lambda d: order.get(d, 0)):
            holders = who_has[dep]
            if dep in self.data:
                continue
            task.missing.add(dep)
            if dep in self.fetching:
                self.fetching[dep].append(key)
            else:
                self.fetching[dep] = [key]
                self._fetch(dep, holders)
        if not task.missing:
            self._make_ready(task)

    def _fetch(self, dep: Key, holders: Sequence[str]) -> None:
        sim = self.sim
        source = next((a for a in holders if dep in sim.workers[a].data), None)
        if source is None:
            source = next((w.address for w in sim.workers.values() if dep in w.data), None)
        if source is None:
            raise SimulationError(f"{self.address} needs {dep!r} but no worker holds it")
        nbytes = sim.workers[source].data[dep]
        start = max(sim.now, self.link_free)
        self.link_free = start + nbytes / sim.cluster.bandwidth
        sim.bytes_transferred += nbytes
        sim.transfers += 1
        sim.at(self.link_free + sim.cluster.latency, self._fetched, dep, nbytes, start)

    def _fetched(self, dep: Key, nbytes: int, start: float) -> None:
        if nbytes > BANDWIDTH_MIN_BYTES:
            # distributed.worker.Worker._update_metrics_received_data
            measured = nbytes / max(0.001, self.sim.now - start)
            self.bandwidth = self.bandwidth * 0.95 + measured * 0.05
        waiting = self.fetching.pop(dep, [])
        self._store(dep, nbytes)
        self.sim.to_scheduler(ev.AddKeys(self.address, [dep]))
        for key in waiting:
            task = self.tasks.get(key)
            if task is not None and task.state == "waiting":
                task.missing.discard(dep)
                if not task.missing:
                    self._make_ready(task)

    def _make_ready(self, task: _WTask) -> None:
        task.state = "ready"
        self.sim.sequence += 1
        heapq.heappush(self.ready, (task.priority, self.sim.sequence, task.key))
        self._run_next()

    def _run_next(self) -> None:
        while self.free_threads and self.ready:
            _, _, key = heapq.heappop(self.ready)
            task = self.tasks.get(key)
            if task is None or task.state != "ready":
                continue  # freed or stolen while queued
            task.state = "executing"
            thread = self.free_threads.pop(0)
            duration = self.sim.graph.tasks[key].duration
            self.sim.at(self.sim.now + duration, self._done, task, thread, self.sim.now)

    def _done(self, task: _WTask, thread: int, start: float) -> None:
        sim = self.sim
        self.free_threads.append(thread)
        self.free_threads.sort()
        sim.executions.append(Execution(self.index, thread, task.key, start, sim.now))
        if self.tasks.get(task.key) is task:
            del self.tasks[task.key]
            if task.key in self.cancelled:
                self.cancelled.discard(task.key)
            else:
                self._store(task.key, sim.graph.tasks[task.key].nbytes)
                self._report(task.key, task.run_id, sim.now - start)
        self._run_next()

    def _report(self, key: Key, run_id: int, duration: float) -> None:
        nbytes = self.data[key]
        self.sim.to_scheduler(ev.TaskFinished(self.address, key, run_id, nbytes, duration=duration))

    def _free(self, key: Key) -> None:
        task = self.tasks.get(key)
        if task is not None:
            if task.state == "executing":
                self.cancelled.add(key)
            else:
                del self.tasks[key]
        self._drop(key)

    def _schedule_heartbeat(self) -> None:
        if not self.heartbeat_scheduled:
            self.heartbeat_scheduled = True
            self.sim.at(self.sim.now + HEARTBEAT_INTERVAL, self._heartbeat)

    def _heartbeat(self) -> None:
        self.heartbeat_scheduled = False
        self.sim.to_scheduler(ev.BandwidthReported(self.address, self.bandwidth))
        if self.tasks or self.fetching:
            self._schedule_heartbeat()

    def _steal(self, key: Key, stimulus_id: str) -> None:
        task = self.tasks.get(key)
        state: str | None
        if task is not None and task.state in ("waiting", "ready"):
            state = task.state
            del self.tasks[key]  # the victim gives the task up
        elif task is not None:
            state = "executing"
        elif key in self.data:
            state = "memory"
        else:
            state = None
        self.sim.to_scheduler(ev.StealResponse(self.address, key, state, stimulus_id))


class Simulation:
    def __init__(
        self,
        graph: SimGraph,
        policy: Policy,
        cluster: ClusterSpec | None = None,
        *,
        policy_name: str = "",
        max_time: float = 1e6,
        validate: bool = False,
    ) -> None:
        self.graph = graph
        self.policy = policy
        self.policy_name = policy_name or type(policy).__name__
        self.cluster = cluster if cluster is not None else ClusterSpec()
        self.max_time = max_time
        self.validate = validate
        assumed = self.cluster.assumed_bandwidth
        self.assumed_bandwidth = self.cluster.bandwidth if assumed is None else assumed
        self.state = SchedulerState(
            killed_worker=lambda key, address, n: ("KilledWorker", key),
            wants=wanted_events(policy),
            bandwidth=self.assumed_bandwidth,
        )
        # The same core the server runs; the policy observer counts steals.
        self.core = Core(self.state, policy, validate=validate, policy_observer=self._count)
        self.warnings: list[str] = []
        self.now = 0.0
        self.sequence = 0
        self._events: list[tuple[float, int, Callable[..., None], tuple[Any, ...]]] = []
        self._flush_scheduled = False
        self.workers: dict[str, _Worker] = {}
        self.bytes_transferred = 0
        self.transfers = 0
        self.executions: list[Execution] = []
        self.steals_requested = 0
        self.steals_succeeded = 0
        self._wanted = set(graph.keys)
        self._done_at: float | None = None
        self._erred: list[Key] = []

    # ---------------------------------------------------------------- event queue
    def at(self, when: float, fn: Callable[..., None], *args: Any) -> None:
        self.sequence += 1
        heapq.heappush(self._events, (when, self.sequence, fn, args))

    def to_scheduler(self, event: ev.Event) -> None:
        self.at(self.now + self.cluster.latency, self._scheduler_receives, event)

    def _scheduler_receives(self, event: ev.Event) -> None:
        self.core.handle(event, self.now)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            # Same instant, after everything else already due now: one tick.
            self.at(self.now, self._flush)

    def _count(
        self, events: Sequence[PolicyEvent], decisions: Sequence[Decision], now: float
    ) -> None:
        self.steals_succeeded += sum(1 for e in events if isinstance(e, StealResult) and e.stolen)
        self.steals_requested += sum(1 for d in decisions if isinstance(d, Steal))

    def _flush(self) -> None:
        self._flush_scheduled = False
        out = self.core.flush(self.now).out
        self.warnings.extend(text for level, text in out.logs if level == "warning")
        for address, msgs in out.to_workers.items():
            worker = self.workers.get(address)
            if worker is not None:
                for msg in msgs:
                    self.at(self.now + self.cluster.latency, worker.receive, msg)
        for client_msgs in out.to_clients.values():
            for client_msg in client_msgs:
                if client_msg["op"] == "key-in-memory":
                    self._wanted.discard(client_msg["key"])
                elif client_msg["op"] == "task-erred":
                    self._erred.append(client_msg["key"])
        if not self._wanted and self._done_at is None:
            self._done_at = self.now + self.cluster.latency

    # ---------------------------------------------------------------- run
    def _join(self, index: int) -> None:
        cluster = self.cluster
        address = cluster.address(index)
        self.workers[address] = _Worker(self, index, address, cluster.nthreads)
        resources = dict(dict(cluster.resources).get(index, ()))
        self._scheduler_receives(
            ev.WorkerConnected(address, cluster.nthreads, name=f"w{index}", resources=resources)
        )

    def run(self) -> SimResult:
        graph = self.graph
        joins = list(self.cluster.join_times) + [0.0] * self.cluster.n_workers
        for index in range(self.cluster.n_workers):
            self.at(joins[index], self._join, index)
        self.at(0.0, self._scheduler_receives, ev.ClientConnected(CLIENT))
        tasks = [
            ev.NewTask(t.key, t.dependencies, f"run-{t.key}", t.annotations)
            for t in graph.tasks.values()
        ]
        self.at(
            0.0,
            self._scheduler_receives,
            ev.GraphReceived(CLIENT, tasks, list(graph.keys), graph.order),
        )
        while self._events and self._done_at is None:
            when, _, fn, args = heapq.heappop(self._events)
            if when > self.max_time:
                raise SimulationError(f"not finished after {self.max_time:g} simulated s")
            self.now = when
            fn(*args)
            if self._erred:
                raise SimulationError(f"tasks erred: {self._erred[:3]}")
        if self._done_at is None:
            states: dict[str, int] = {}
            for ts in self.state.tasks.values():
                states[ts.state] = states.get(ts.state, 0) + 1
            reasons = sorted({str(ts.unplaceable_reason) for ts in self.state.unplaceable})
            why = f"; {len(self.state.unplaceable)} can never run: {reasons}" if reasons else ""
            raise SimulationError(f"deadlock at t={self.now:.4f}: task states {states}{why}")
        placement = {e.key: self.cluster.address(e.worker) for e in self.executions}
        return SimResult(
            policy=self.policy_name,
            graph=graph.name,
            makespan=self._done_at,
            bytes_transferred=self.bytes_transferred,
            transfers=self.transfers,
            peak_memory={w.address: w.peak for w in self.workers.values()},
            executed=len(self.executions),
            steals_requested=self.steals_requested,
            steals_succeeded=self.steals_succeeded,
            executions=self.executions,
            placement=placement,
            warnings=self.warnings,
            bandwidth_estimate=self.state.bandwidth,
        )


def simulate(
    graph: SimGraph,
    policy: Policy,
    cluster: ClusterSpec | None = None,
    *,
    policy_name: str = "",
    validate: bool = False,
) -> SimResult:
    return Simulation(graph, policy, cluster, policy_name=policy_name, validate=validate).run()
