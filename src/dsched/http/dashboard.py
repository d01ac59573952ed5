"""The live dashboard: static pages, one shared snapshot and task-stream deltas, on the
scheduler's loop (the routes of Dask's Bokeh dashboard, without Bokeh).

Theory of operation
-------------------
The pages (``dashboard/status.html`` for ``/status``, ``dashboard/individual.html`` for
every ``/individual-*`` route, which picks its one view from its own URL) are static
files; ``dashboard/dashboard.js`` polls two routes, both relative to the page so the
dashboard works under ``--dashboard-prefix`` or behind a proxy that strips one:

* ``dashboard/snapshot.json``: ``SnapshotCache`` (``dashboard_data.py``), built at most
  once a second whatever the number of viewers.
* ``dashboard/task-stream.json?since=<cursor>``: the bars after the viewer's cursor
  (``TaskStreamFeed``, brought up to date at most once a second).

Nothing runs for a dashboard nobody is looking at: a request to any dashboard route
starts what the views need, if it is not running: the per-prefix counts and the results
for the task stream (``DashboardObserver.start``, then ``TaskFinished`` observed) and
``LoopMonitor``. The monitor samples the scheduler's CPU (process CPU time over wall time)
and its event-loop lag (how late a timer due every ``PROBE_INTERVAL`` fires); once no
dashboard request came for ``IDLE_STOP`` seconds (every open page polls once a second) it
stops itself and the observer (``Dashboard.deactivate``), so a closed dashboard costs
nothing per task. The next request starts both again: the counts from one recount of the
tasks, the task stream from where its cursor was (the results while nobody looked are
simply not there). What a page costs while open is measured in
``benchmarks/results/dashboard``.

``/individual-plots.json`` lists the views under Dask's display names (Dask's rule: the
route without its slash, dashes as spaces, title case), for dask-labextension; it is
``{}`` with ``--no-dashboard``, as Dask's is without Bokeh.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import psutil  # type: ignore[import-untyped]  # no types-psutil installed
from tornado import web

from dsched.http.dashboard_data import (
    DashboardObserver,
    SchedulerSamples,
    SnapshotCache,
    TaskStreamFeed,
    build_snapshot,
)

if TYPE_CHECKING:
    from dsched.server.scheduler import Scheduler

STATIC = Path(__file__).parent / "dashboard"
PROBE_INTERVAL = 0.1  # seconds between loop-lag probes
SAMPLE_INTERVAL = 1.0  # seconds between CPU / lag samples
IDLE_STOP = 60.0  # seconds after the last request: the monitor and the observer stop

# Dask's individual-plot routes that dsched draws (distributed/dashboard/scheduler.py).
# The view id dashboard.js draws is the route without "individual-".
INDIVIDUAL_ROUTES = (
    "individual-task-stream",
    "individual-progress",
    "individual-workers-memory",
    "individual-cluster-memory",
    "individual-nprocessing",
    "individual-occupancy",
    "individual-cpu",
    "individual-workers-transfer-bytes",
    "individual-workers",
    "individual-exceptions",
    "individual-scheduler-system",
)


def display_name(route: str) -> str:
    """Dask's ``IndividualPlots`` naming: 'individual-task-stream' -> 'Individual Task Stream'."""
    return route.strip("/").replace("-", " ").title()


def individual_plots() -> dict[str, str]:
    return {display_name(route): f"/{route}" for route in INDIVIDUAL_ROUTES}


class LoopMonitor:
    """Scheduler CPU and event-loop lag, one sample a second into ``samples``, while the
    dashboard is in use; ``on_idle`` is called when it stops itself, ``idle_stop`` seconds
    after the last ``touch``."""

    def __init__(
        self,
        samples: SchedulerSamples,
        on_idle: Callable[[], None] = lambda: None,
        idle_stop: float = IDLE_STOP,
    ) -> None:
        self.samples = samples
        self.on_idle = on_idle
        self.idle_stop = idle_stop
        self.last_request = 0.0
        self._handle: asyncio.TimerHandle | None = None
        self._process = psutil.Process()
        self._window_start = 0.0
        self._cpu_start = 0.0
        self._max_lag = 0.0
        self._due = 0.0

    @property
    def running(self) -> bool:
        return self._handle is not None

    def touch(self) -> None:
        self.last_request = time.monotonic()
        if self._handle is None:
            loop = asyncio.get_running_loop()
            self._window_start, self._cpu_start = time.monotonic(), time.process_time()
            self._max_lag = 0.0
            self._arm(loop)

    def _arm(self, loop: asyncio.AbstractEventLoop) -> None:
        self._due = loop.time() + PROBE_INTERVAL
        self._handle = loop.call_at(self._due, self._probe, loop)

    def _probe(self, loop: asyncio.AbstractEventLoop) -> None:
        self._max_lag = max(self._max_lag, loop.time() - self._due)
        now = time.monotonic()
        elapsed = now - self._window_start
        if elapsed >= SAMPLE_INTERVAL:
            cpu = time.process_time()
            self.samples.add(time.time(), (cpu - self._cpu_start) / elapsed, self._max_lag)
            self.samples.rss = int(self._process.memory_info().rss)
            self._window_start, self._cpu_start, self._max_lag = now, cpu, 0.0
        if now - self.last_request > self.idle_stop:
            self._handle = None
            self.on_idle()
            return
        self._arm(loop)

    def stop(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None


class Dashboard:
    """The dashboard's shared state for one scheduler (made by ``HttpServer.start``)."""

    def __init__(self, scheduler: Scheduler) -> None:
        self.scheduler = scheduler
        self.observer = DashboardObserver()
        scheduler.core.add_extension(self.observer)
        self.feed = TaskStreamFeed()
        self.samples = SchedulerSamples()
        self.monitor = LoopMonitor(self.samples, self.deactivate)
        self.cache = SnapshotCache(self._build)

    def activate(self) -> None:
        """A dashboard request came: start what the views need (if stopped), keep sampling."""
        if self.observer.start():
            self._observe()
        self.monitor.touch()

    def deactivate(self) -> None:
        """Nobody looked for ``IDLE_STOP`` seconds: stop the per-task work."""
        if self.observer.stop():
            self._observe()

    def _observe(self) -> None:
        self.scheduler.core.set_observations(
            self.observer, self.observer.observations, transitions=False
        )

    def _build(self, now: float) -> dict[str, Any]:
        scheduler = self.scheduler
        heartbeats = {
            address: (record.metrics, record.last_seen)
            for address, record in scheduler.reactor.workers.items()
        }
        return build_snapshot(
            scheduler.state,
            heartbeats,
            self.observer,
            self.samples,
            now,
            address=scheduler.address,
            cursor=self.observer.index,  # (results ever seen: the feed moves only when read)
        )

    def snapshot(self) -> bytes:
        self.activate()
        return self.cache.get(time.time())

    def stop(self) -> None:
        self.monitor.stop()
        self.deactivate()


class DashboardHandler(web.RequestHandler):
    def initialize(self, dashboard: Dashboard | None, **kwargs: Any) -> None:
        self.dashboard = dashboard

    def set_default_headers(self) -> None:
        # Live data: never from a cache (a proxy's or the browser's).
        self.set_header("Cache-Control", "no-store")


class PageHandler(DashboardHandler):
    """A static page, read once; opening it starts the dashboard's data."""

    _pages: dict[str, bytes] = {}

    def initialize(self, dashboard: Dashboard | None, **kwargs: Any) -> None:
        super().initialize(dashboard)
        self.page = str(kwargs["page"])

    def get(self) -> None:
        body = self._pages.get(self.page)
        if body is None:
            body = self._pages[self.page] = (STATIC / self.page).read_bytes()
        if self.dashboard is not None:
            self.dashboard.activate()
        self.set_header("Content-Type", "text/html; charset=UTF-8")
        self.write(body)


class SnapshotHandler(DashboardHandler):
    def get(self) -> None:
        assert self.dashboard is not None
        self.set_header("Content-Type", "application/json")
        self.write(self.dashboard.snapshot())


class TaskStreamHandler(DashboardHandler):
    def get(self) -> None:
        dashboard = self.dashboard
        assert dashboard is not None
        since = self.get_query_argument("since", None)
        cursor: int | None = None
        if since not in (None, ""):
            try:
                cursor = int(since)
            except ValueError:
                self.set_status(400)
                self.write({"Error": f"'since' must be an integer cursor, got {since!r}"})
                return
        dashboard.activate()
        dashboard.feed.refresh(dashboard.observer, time.time())
        self.set_header("Content-Type", "application/json")
        self.write(dashboard.feed.since(cursor))


class IndividualPlotsHandler(DashboardHandler):
    def get(self) -> None:
        self.write(individual_plots() if self.dashboard is not None else {})


class StaticHandler(web.StaticFileHandler):
    def set_extra_headers(self, path: str) -> None:
        self.set_header("Cache-Control", "no-cache")


def page_routes(dashboard: Dashboard) -> list[tuple[str, type[web.RequestHandler], dict[str, Any]]]:
    """The dashboard's own routes (left out with ``--no-dashboard``), relative to the prefix."""
    routes: list[tuple[str, type[web.RequestHandler], dict[str, Any]]] = [
        ("status", PageHandler, {"dashboard": dashboard, "page": "status.html"}),
        ("dashboard/snapshot.json", SnapshotHandler, {"dashboard": dashboard}),
        ("dashboard/task-stream.json", TaskStreamHandler, {"dashboard": dashboard}),
        ("dashboard/static/(.*)", StaticHandler, {"path": str(STATIC)}),
    ]
    routes += [
        (route, PageHandler, {"dashboard": dashboard, "page": "individual.html"})
        for route in INDIVIDUAL_ROUTES
    ]
    return routes
