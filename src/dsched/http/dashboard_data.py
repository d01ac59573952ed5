"""What the dashboard pages show, computed from the scheduler: one shared snapshot, the
task stream as compact bars behind a cursor, and the per-prefix task counts.

Theory of operation
-------------------
Dask's Bokeh dashboard gives every open page its own server-side document, refreshed by
periodic callbacks on the scheduler's loop, so its cost grows with the viewers and (for
progress) with the tasks. Here every viewer reads the same data, no read walks the tasks,
and what is per task is as small as it can be, and only while a dashboard is in use.

* ``DashboardObserver`` (an extension) keeps the last ``MAX_EXCEPTIONS`` task errors with
  their tracebacks, like Dask's ``Scheduler.erred_tasks`` (it observes ``TaskErred`` from
  the start: one call per error, never per result). Between ``start`` (a dashboard request
  came) and ``stop`` (none came for a while, see ``dashboard.py``) it also
  - has the state machine count tasks per prefix and state (``Engine.count_prefixes``:
    one pass over the tasks to start, then two dict updates in ``_move`` per move; no
    transition is reported to Python code for it), so the progress view costs
    O(prefixes) to read and restarting after a stop costs one recount per viewer
    session, never per second;
  - observes ``TaskFinished`` / ``TaskErred`` and keeps the newest ``MAX_BARS`` results
    as tuples of references (key, worker, thread, the message's ``startstops``): one
    deque append per result, nothing copied or encoded. ``index`` counts the results ever
    kept. A result counts as Dask's ``TaskStreamPlugin`` counts it: the event moved its
    task from processing to memory or erred (read from the newest transition-log entries),
    and it has ``startstops``. (The task stream extension, which keeps Dask's full
    records for ``get_task_stream``, is a separate thing a client turns on; the dashboard
    does not, so its records cost nothing for a dashboard.)
* ``build_snapshot`` reads the workers, the heartbeats' metrics, the prefix counts and the
  scheduler's own CPU and loop-lag samples: O(workers + prefixes). ``SnapshotCache``
  builds it at most once per ``SNAPSHOT_INTERVAL`` and keeps the encoded bytes, so any
  number of viewers cost one build per second.
* ``TaskStreamFeed`` turns the observer's new results into bars, each JSON-encoded once
  and shared by all viewers, indexed like the results (``cursor`` = results ever seen),
  at most once per ``SNAPSHOT_INTERVAL`` whatever the number of viewers (``refresh``). A
  viewer asks for the bars after its cursor and gets at most the newest ``MAX_BARS``
  (Dask's task stream also draws the last 1,000 rectangles), so a slow or new viewer
  never makes the scheduler replay history; only the newest ``MAX_BARS`` results of each
  update are encoded at all (the observer keeps no more): at thousands of tasks a second,
  the rest cost one append each.

Names are Dask's: ``queued`` is dsched's ``ready``. Nothing here does I/O or reads a
clock: ``now`` is passed in; the shell (``dashboard.py``) measures CPU and loop lag.
"""

from __future__ import annotations

import json
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from itertools import islice
from typing import Any, ClassVar

from dask.utils import key_split

from dsched.ext.protocol import NO_EFFECTS, Effects, Extension
from dsched.state import events as ev
from dsched.state.edges import ERRED, MEMORY, READY
from dsched.state.machine import SchedulerState, stimulus_id_of

SNAPSHOT_INTERVAL = 1.0  # seconds: the snapshot is rebuilt at most this often
MAX_EXCEPTIONS = 100  # Dask's erred_tasks deque length
MAX_BARS = 1_000  # the newest bars: kept, and the most a reply holds
HISTORY = 300  # scheduler CPU / loop-lag samples kept (one a second: five minutes)
DASK_STATE_NAMES = {READY: "queued"}
# The progress columns, in Dask's names and the order of a task's life.
PROGRESS_STATES = ("released", "waiting", "queued", "no-worker", "processing", "memory", "erred")
# One task result as the observer keeps it: (key, worker, thread, startstops, erred).
Result = tuple[Any, str, Any, Any, bool]


class DashboardObserver(Extension):
    """What the dashboard follows in the state (see the module doc): task errors always,
    results and per-prefix counts between ``start`` and ``stop``."""

    name = "dashboard"
    observes: ClassVar = frozenset({ev.TaskErred})
    WATCHING: ClassVar = frozenset({ev.TaskErred, ev.TaskFinished})

    def __init__(self, max_exceptions: int = MAX_EXCEPTIONS, max_results: int = MAX_BARS) -> None:
        self.active = False
        self.exceptions: deque[dict[str, Any]] = deque(maxlen=max_exceptions)
        # The newest results as (key, worker, thread, startstops, erred); ``index`` counts
        # every result ever recorded (the task stream's cursor).
        self.results: deque[Result] = deque(maxlen=max_results)
        self.index = 0

    @property
    def observations(self) -> frozenset[type]:
        """What to observe now (the caller passes it to ``Core.set_observations``)."""
        return self.WATCHING if self.active else self.observes

    def start(self) -> bool:
        """Count the tasks once, then follow results and moves; True if this call started
        (the caller then changes the observations)."""
        if self.active:
            return False
        self.active = True
        self.state.count_prefixes(True)
        return True

    def stop(self) -> bool:
        """Stop following results and moves (nobody looks); True if this call stopped."""
        if not self.active:
            return False
        self.active = False
        self.state.count_prefixes(False)
        return True

    @property
    def counts(self) -> Mapping[str, Mapping[str, int]]:
        """``{prefix: {state: tasks}}`` (dsched's state names), while started."""
        return self.state.prefix_counts or {}

    def on_event(self, event: ev.Event, now: float) -> Effects:
        # Once per task result while started: references only, no copy.
        if type(event) is ev.TaskFinished:
            msg = event.msg
            if msg is None or not self.active:
                return NO_EFFECTS
            startstops = msg.get("startstops")
            if not startstops:
                return NO_EFFECTS
            if self._finished(event, MEMORY, now):
                self.results.append((event.key, event.worker, msg.get("thread"), startstops, False))
                self.index += 1
            return NO_EFFECTS
        if not isinstance(event, ev.TaskErred):
            return NO_EFFECTS
        ts = self.state.tasks.get(event.key)
        if ts is None or ts.state != ERRED:
            return NO_EFFECTS  # a retried failure
        self.exceptions.append(
            {
                "key": str(event.key),
                "prefix": ts.prefix,
                "worker": event.worker,
                "time": now,
                "exception": event.exception_text or ts.exception_text or "",
                "traceback": event.traceback_text or "",
            }
        )
        msg = event.msg
        if self.active and msg is not None:
            startstops = msg.get("startstops")
            if startstops and self._finished(event, ERRED, now):
                self.results.append((event.key, event.worker, msg.get("thread"), startstops, True))
                self.index += 1
        return NO_EFFECTS

    def _finished(self, event: ev.TaskFinished | ev.TaskErred, finish: str, now: float) -> bool:
        """Did the event just applied move its task from processing to ``finish``? (The
        same test as the task-stream extension's.)"""
        return self.state.finished_just_now(event.key, finish, stimulus_id_of(event, now), now)

    def progress(self) -> list[dict[str, Any]]:
        """Dask's progress rows: prefixes with a task not forgotten, the most tasks first."""
        rows: list[tuple[int, str, dict[str, int]]] = []
        for prefix, counts in self.counts.items():
            row = {DASK_STATE_NAMES.get(s, s): n for s, n in counts.items()}
            alive = sum(row[s] for s in PROGRESS_STATES)
            if alive:
                rows.append((alive, prefix, row))
        rows.sort(key=lambda item: (-item[0], item[1]))
        return [{"prefix": prefix, **row, "all": alive} for alive, prefix, row in rows]


def _number(value: Any) -> float | None:
    # An exact type test: cheaper than isinstance (1,000 workers x 6 fields a second), and
    # it leaves out bools.
    return float(value) if type(value) in (int, float) else None


@dataclass
class SchedulerSamples:
    """The scheduler process's CPU use (fraction of one core) and event-loop lag
    (seconds), one sample a second, newest last; filled by the shell's monitor."""

    times: deque[float] = field(default_factory=lambda: deque(maxlen=HISTORY))
    cpu: deque[float] = field(default_factory=lambda: deque(maxlen=HISTORY))
    lag: deque[float] = field(default_factory=lambda: deque(maxlen=HISTORY))
    rss: int = 0

    def add(self, now: float, cpu: float, lag: float) -> None:
        self.times.append(round(now, 3))
        self.cpu.append(round(cpu, 4))
        self.lag.append(round(lag, 6))


def worker_row(ws: Any, metrics: Mapping[str, Any], last_seen: float | None) -> dict[str, Any]:
    """One worker: what the state knows plus what its last heartbeat said. Managed memory
    is the worker's own ``managed_bytes``; a worker sending none (not a Dask worker) gets
    the sizes of the keys it holds, summed (the only per-key cost here, never for Dask's)."""
    managed = _number(metrics.get("managed_bytes"))
    if managed is None:
        managed = float(sum(max(ts.nbytes, 0) for ts in ws.has_what))
    process = _number(metrics.get("memory"))
    spilled = metrics.get("spilled_bytes")
    spilled_disk = _number(spilled.get("disk")) if isinstance(spilled, Mapping) else None
    transfer = metrics.get("transfer")
    transfer = transfer if isinstance(transfer, Mapping) else {}
    return {
        "address": ws.address,
        "name": str(ws.name),
        "host": ws.host,
        "status": ws.status,
        "nthreads": ws.nthreads,
        "memory_limit": ws.memory_limit or 0,
        "managed": int(managed),
        # Process memory that is not managed (Dask's "unmanaged"); unknown without it.
        "unmanaged": int(max(process - managed, 0)) if process is not None else 0,
        "spilled": int(spilled_disk or 0),
        "processing": len(ws.processing),
        "in_memory": len(ws.has_what),
        "cpu": _number(metrics.get("cpu")),
        "incoming_bytes": _number(transfer.get("incoming_bytes")) or 0,
        "outgoing_bytes": _number(transfer.get("outgoing_bytes")) or 0,
        "last_seen": last_seen,
    }


def build_snapshot(
    state: SchedulerState,
    heartbeats: Mapping[str, tuple[Mapping[str, Any], float]],
    progress: DashboardObserver,
    samples: SchedulerSamples,
    now: float,
    *,
    address: str = "",
    cursor: int = 0,
) -> dict[str, Any]:
    """Everything but the task stream, for every view: O(workers + prefixes).
    ``heartbeats``: address -> (the last heartbeat's metrics, when it came)."""
    workers = []
    for address_, ws in state.workers.items():
        metrics, last_seen = heartbeats.get(address_, ({}, None))
        workers.append(worker_row(ws, metrics, last_seen))
    memory = {
        name: sum(w[name] for w in workers)
        for name in ("managed", "unmanaged", "spilled", "memory_limit")
    }
    rows = progress.progress()
    return {
        "time": now,
        "scheduler": {
            "address": address,
            "rss": samples.rss,
            "cpu": samples.cpu[-1] if samples.cpu else None,
            "lag": samples.lag[-1] if samples.lag else None,
            "history": {
                "time": list(samples.times),
                "cpu": list(samples.cpu),
                "lag": list(samples.lag),
            },
        },
        "cluster": {
            "workers": len(workers),
            "threads": sum(w["nthreads"] for w in workers),
            "tasks": len(state.tasks),
            "processing": sum(w["processing"] for w in workers),
            "memory": memory,
        },
        "workers": workers,
        "progress": rows,
        "totals": {s: sum(row[s] for row in rows) for s in (*PROGRESS_STATES, "all")},
        "exceptions": list(progress.exceptions)[::-1],
        "task_stream_cursor": cursor,
    }


class SnapshotCache:
    """The encoded snapshot, rebuilt at most once per ``interval``, shared by all viewers."""

    def __init__(self, build: Any, interval: float = SNAPSHOT_INTERVAL) -> None:
        self._build = build  # now -> dict
        self.interval = interval
        self.built_at: float | None = None
        self.builds = 0
        self._encoded = b""

    def get(self, now: float) -> bytes:
        if self.built_at is None or not 0 <= now - self.built_at < self.interval:
            self._encoded = json.dumps(self._build(now), default=str).encode()
            self.built_at = now
            self.builds += 1
        return self._encoded


def bars_of(result: Result) -> Iterable[tuple[str, Any, str, str, float, float, str]]:
    """The bars of one result: one per ``startstops`` entry, as
    ``(worker, thread, prefix, action, start, stop, key)`` (transfers have the action
    ``transfer``, Dask colours them red; a failed computation ``error``)."""
    key, worker, thread, startstops, erred = result
    prefix = key_split(key)
    for startstop in startstops:
        action = str(startstop.get("action", "compute"))
        start, stop = startstop.get("start"), startstop.get("stop")
        if type(start) not in (int, float) or type(stop) not in (int, float):
            continue
        if erred and action == "compute":
            action = "error"
        yield str(worker), thread, prefix, action, start, stop, str(key)


class TaskStreamFeed:
    """The observer's results as encoded bars behind a cursor (see the module doc)."""

    def __init__(self, max_bars: int = MAX_BARS, interval: float = SNAPSHOT_INTERVAL) -> None:
        self.max_bars = max_bars
        self.interval = interval
        self.updated_at: float | None = None
        self.cursor = 0  # results seen (DashboardObserver.index when last updated)
        self.bars: deque[str] = deque(maxlen=max_bars)
        self.bar_cursors: deque[int] = deque(maxlen=max_bars)  # the result index of each bar
        # Workers, prefixes and actions repeat: their JSON strings are made once.
        self._strings: dict[str, str] = {}

    def _string(self, text: str) -> str:
        encoded = self._strings.get(text)
        if encoded is None:
            if len(self._strings) > 100_000:
                self._strings.clear()
            encoded = self._strings[text] = json.dumps(text)
        return encoded

    def refresh(self, observer: DashboardObserver, now: float) -> None:
        """``update`` at most once per ``interval``: however many viewers poll, at most
        ``max_bars`` bars an interval are encoded."""
        if self.updated_at is None or not 0 <= now - self.updated_at < self.interval:
            self.updated_at = now
            self.update(observer)

    def update(self, observer: DashboardObserver) -> None:
        new = observer.index - self.cursor
        if new <= 0:
            return
        # The newest results only (one has a bar or more): O(max_bars), however many tasks
        # finished since the last update.
        kept = observer.results
        results = list(islice(reversed(kept), min(new, len(kept), self.max_bars)))
        first = observer.index - len(results)
        string = self._string
        for offset, result in enumerate(reversed(results)):
            for worker, thread, prefix, action, start, stop, key in bars_of(result):
                thread_json = str(thread) if type(thread) is int else json.dumps(str(thread))
                self.bars.append(
                    f"[{string(worker)},{thread_json},{string(prefix)},{string(action)},"
                    f"{start:.4f},{stop:.4f},{json.dumps(key)}]"
                )
                self.bar_cursors.append(first + offset + 1)
        self.cursor = observer.index

    def since(self, cursor: int | None, limit: int | None = None) -> bytes:
        """``{"cursor": c, "bars": [...], "dropped": n}``: the bars of the records after
        ``cursor`` (all kept ones for None), the newest ``limit`` (default ``max_bars``) of
        them; ``dropped`` counts the kept bars left out (older ones were never kept)."""
        limit = self.max_bars if limit is None else limit
        bar_cursors = self.bar_cursors
        if cursor is None or cursor > self.cursor:
            first = 0  # a new viewer, or a scheduler restarted under an old page
        else:
            # Bars are in record order: bisect for the first one after ``cursor``.
            low, high = 0, len(bar_cursors)
            while low < high:
                mid = (low + high) // 2
                if bar_cursors[mid] <= cursor:
                    low = mid + 1
                else:
                    high = mid
            first = low
        count = len(bar_cursors) - first
        dropped = max(count - limit, 0)
        body = ",".join(islice(self.bars, first + dropped, None))
        return f'{{"cursor":{self.cursor},"dropped":{dropped},"bars":[{body}]}}'.encode()
