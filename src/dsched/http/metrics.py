"""``/metrics``: Dask's scheduler metrics in the Prometheus text format.

A ``CollectorRegistry`` per scheduler (never prometheus_client's global one) holds one
collector, which reads the state when scraped: nothing is counted per task. The totals
Dask keeps as counters (workers and client connections added and removed) come from
``ConnectionCounts``, an extension observing only connect and disconnect events.

Names, types and labels are Dask's (distributed/http/scheduler/prometheus/core.py), under
``distributed.dashboard.prometheus.namespace`` (default ``dask``). What dsched does not
track (task prefixes' durations, suspicious counts, GIL contention, tick durations) is
not exported.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterator
from typing import TYPE_CHECKING, ClassVar

import dask
from prometheus_client import (
    CollectorRegistry,
    GCCollector,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from dsched.ext.protocol import NO_EFFECTS, Effects, Extension
from dsched.state import events as ev

if TYPE_CHECKING:
    from dsched.server.scheduler import Scheduler

# Dask's ALL_TASK_STATES but forgotten, in Dask's names (dsched's "ready" is Dask's "queued").
TASK_STATES = ("released", "waiting", "no-worker", "queued", "processing", "memory", "erred")
_DASK_STATE = {"ready": "queued"}
FIRE_AND_FORGET = "fire-and-forget"


class ConnectionCounts(Extension):
    """Dask's ``_workers_added_total`` and ``_client_connections_added_total`` (and the
    removed ones): four integers, bumped on connect and disconnect events only."""

    name = "http-connection-counts"
    observes: ClassVar = frozenset(
        {ev.ClientConnected, ev.ClientDisconnected, ev.WorkerConnected, ev.WorkerDisconnected}
    )

    def __init__(self) -> None:
        self.clients_added = self.clients_removed = 0
        self.workers_added = self.workers_removed = 0
        self._clients: set[str] = set()
        self._workers: set[str] = set()

    def on_event(self, event: ev.Event, now: float) -> Effects:
        if isinstance(event, ev.ClientConnected):
            if event.client not in self._clients:
                self._clients.add(event.client)
                self.clients_added += 1
        elif isinstance(event, ev.ClientDisconnected):
            if event.client in self._clients:
                self._clients.discard(event.client)
                self.clients_removed += 1
        elif isinstance(event, ev.WorkerConnected):
            if event.address not in self._workers:
                self._workers.add(event.address)
                self.workers_added += 1
        elif isinstance(event, ev.WorkerDisconnected) and event.address in self._workers:
            self._workers.discard(event.address)
            self.workers_removed += 1
        return NO_EFFECTS


def worker_states(scheduler: Scheduler) -> dict[str, int]:
    """Dask's ``dask_scheduler_workers{state}``. idle: running with fewer tasks processing
    than threads; saturated: running with more tasks processing than threads (Dask decides
    both from occupancy, which dsched does not estimate)."""
    counts = dict.fromkeys(("idle", "partially_saturated", "saturated", "paused", "retiring"), 0)
    for ws in scheduler.state.workers.values():
        if ws.status == "running":
            n = len(ws.processing)
            if n < ws.nthreads:
                state = "idle"
            else:
                state = "saturated" if n > ws.nthreads else "partially_saturated"
        elif ws.status == "paused":
            state = "paused"
        else:
            state = "retiring"
        counts[state] += 1
    return counts


def task_states(scheduler: Scheduler) -> Counter[str]:
    counts: Counter[str] = Counter()
    for ts in scheduler.state.tasks.values():
        counts[ts.state] += 1
    return Counter({_DASK_STATE.get(state, state): n for state, n in counts.items()})


def tasks_created(scheduler: Scheduler) -> int:
    """How many tasks the state ever made (``SchedulerState.tasks_created``). Dask's counter
    drops the tasks of task groups it forgot whole; this one is a true total."""
    return scheduler.state.tasks_created


class SchedulerCollector(Collector):
    def __init__(self, scheduler: Scheduler, counts: ConnectionCounts, namespace: str) -> None:
        self.scheduler = scheduler
        self.counts = counts
        self.namespace = namespace

    def name(self, name: str) -> str:
        return f"{self.namespace}_scheduler_{name}" if self.namespace else f"scheduler_{name}"

    def collect(self) -> Iterator[Metric]:
        from dsched.http.api import adaptive_target

        scheduler, counts, name = self.scheduler, self.counts, self.name
        clients = [c for c in scheduler.reactor.clients if c != FIRE_AND_FORGET]
        yield GaugeMetricFamily(name("clients"), "Number of clients connected", len(clients))
        yield CounterMetricFamily(
            name("client_connections_added"),
            "Total number of client connections added",
            value=counts.clients_added,
        )
        yield CounterMetricFamily(
            name("client_connections_removed"),
            "Total number of client connections removed",
            value=counts.clients_removed,
        )
        yield GaugeMetricFamily(
            name("desired_workers"),
            "Number of workers scheduler needs for task graph",
            value=adaptive_target(scheduler),
        )
        workers = GaugeMetricFamily(
            name("workers"), "Number of workers known by scheduler", labels=["state"]
        )
        for state, n in worker_states(scheduler).items():
            workers.add_metric([state], n)
        yield workers
        yield CounterMetricFamily(
            name("workers_added"), "Total number of workers added", value=counts.workers_added
        )
        yield CounterMetricFamily(
            name("workers_removed"),
            "Total number of workers removed",
            value=counts.workers_removed,
        )
        yield CounterMetricFamily(name("last_time"), "SystemMonitor last time", value=time.time())
        by_state = task_states(scheduler)
        yield CounterMetricFamily(
            name("tasks_forgotten"),
            "Total number of processed tasks no longer in memory and already "
            "removed from the scheduler job queue",
            value=max(tasks_created(scheduler) - len(scheduler.state.tasks), 0),
        )
        tasks = GaugeMetricFamily(
            name("tasks"), "Number of tasks known by scheduler", labels=["state"]
        )
        for state in TASK_STATES:
            tasks.add_metric([state], by_state.get(state, 0))
        yield tasks


def make_registry(scheduler: Scheduler, counts: ConnectionCounts) -> CollectorRegistry:
    namespace = str(dask.config.get("distributed.dashboard.prometheus.namespace", "dask"))
    registry = CollectorRegistry(auto_describe=False)
    registry.register(SchedulerCollector(scheduler, counts, namespace))
    # What Dask's /metrics also shows, from prometheus_client's default registry there.
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    GCCollector(registry=registry)
    return registry


def render(registry: CollectorRegistry) -> bytes:
    return generate_latest(registry)
