"""What the dashboard pages show, computed from the scheduler: one shared snapshot, the
task stream as compact bars behind a cursor, and the per-prefix task counts.

Theory of operation
-------------------
Dask's Bokeh dashboard gives every open page its own server-side document, refreshed by
periodic callbacks on the scheduler's loop, so its cost grows with the viewers and (for
progress) with the tasks. Here every viewer reads the same data, and no read walks the
tasks: what is per task is a small update as each task moves, and only once a dashboard
page was opened.

* ``PrefixProgress`` (an extension) keeps ``{prefix: {state: count}}`` up to date from
  the task transitions, so the progress view costs O(prefixes) to read. It observes
  nothing until a dashboard page first asks (``start``): then it counts the tasks once
  (the only pass over every task) and observes transitions from then on. Tasks created
  since the last batch (task ids are handed out in sequence) enter its counts as
  ``released``, as the state machine creates them; one created and forgotten within a
  batch (a task nobody needed) has no id left and is recognised by its moves. It also
  keeps the last ``MAX_EXCEPTIONS`` task errors with their tracebacks (observing
  ``TaskErred``, which costs one call per error, never per result), like Dask's
  ``Scheduler.erred_tasks``.
* ``build_snapshot`` reads the workers, the heartbeats' metrics, the prefix counts and the
  scheduler's own CPU and loop-lag samples: O(workers + prefixes). ``SnapshotCache``
  builds it at most once per ``SNAPSHOT_INTERVAL`` and keeps the encoded bytes, so any
  number of viewers cost one build per second.
* ``TaskStreamFeed`` turns the task stream extension's new records (Dask's
  ``TaskStreamPlugin`` records: one per finished or erred task, with its ``startstops``)
  into bars, each JSON-encoded once and shared by all viewers, indexed like the task stream
  (``cursor`` = records ever seen). A viewer asks for the bars after its cursor and gets
  at most the newest ``MAX_BARS`` (Dask's task stream also draws the last 1,000
  rectangles), so a slow or new viewer never makes the scheduler replay history, and
  since no reply holds older bars, only the newest ``MAX_BARS`` records of each update are
  encoded at all: at thousands of tasks a second, the rest cost nothing here.

Names are Dask's: ``queued`` is dsched's ``ready``. Nothing here does I/O or reads a
clock: ``now`` is passed in; the shell (``dashboard.py``) measures CPU and loop lag.
"""

from __future__ import annotations

import json
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from itertools import islice
from typing import Any, ClassVar

from dask.utils import key_split

from dsched.ext.protocol import NO_EFFECTS, Effects, Extension, Transition
from dsched.ext.task_stream import TaskStream
from dsched.state import events as ev
from dsched.state.edges import ERRED, READY, RELEASED, STATES
from dsched.state.machine import SchedulerState

SNAPSHOT_INTERVAL = 1.0  # seconds: the snapshot is rebuilt at most this often
MAX_EXCEPTIONS = 100  # Dask's erred_tasks deque length
MAX_BARS = 1_000  # the newest bars: kept, and the most a reply holds
HISTORY = 300  # scheduler CPU / loop-lag samples kept (one a second: five minutes)
DASK_STATE_NAMES = {READY: "queued"}
# The progress columns, in Dask's names and the order of a task's life.
PROGRESS_STATES = ("released", "waiting", "queued", "no-worker", "processing", "memory", "erred")


class PrefixProgress(Extension):
    name = "dashboard-progress"
    observes: ClassVar = frozenset({ev.TaskErred})

    def __init__(self, max_exceptions: int = MAX_EXCEPTIONS) -> None:
        self.counts: dict[str, dict[str, int]] = {}
        self.active = False
        self.exceptions: deque[dict[str, Any]] = deque(maxlen=max_exceptions)
        self._next_id = 0

    def start(self) -> bool:
        """Count every task once; True if this call started the counting (the caller then
        subscribes this extension to transitions, see ``HttpServer``)."""
        if self.active:
            return False
        self.active = True
        self.counts = {}
        for ts in self.state.tasks.values():
            self._row(ts.prefix)[ts.state] += 1
        self._next_id = self._id_counter()
        return True

    def _id_counter(self) -> int:
        # Task ids are handed out in sequence: the count of tasks ever created says which
        # ids are new since the last look.
        return int(self.state.tasks_created)

    def _row(self, prefix: str) -> dict[str, int]:
        row = self.counts.get(prefix)
        if row is None:
            row = self.counts[prefix] = dict.fromkeys(STATES, 0)
        return row

    def on_transitions(self, transitions: Sequence[Transition], now: float) -> Effects:
        state = self.state
        next_id = self._id_counter()
        gone = 0  # tasks created since the last batch and already forgotten
        for task_id in range(self._next_id, next_id):
            ts = state.task_by_id(task_id)
            if ts is None:
                gone += 1
            else:
                self._row(ts.prefix)[RELEASED] += 1
        self._next_id = next_id
        tasks = state.tasks
        # A task created and forgotten within this batch was never counted as released:
        # its first move (out of released) must not be taken off. Such tasks are among
        # the forgotten keys whose first move here leaves released; with ``gone`` of them,
        # the first ``gone`` such keys are taken for them.
        first_moves: set[Any] = set()
        counts = self.counts
        # This runs for every move of every task while a dashboard is in use: a task's
        # moves often come one after another, so its row is looked up once for them.
        last_key: Any = None
        row: dict[str, int] = {}
        missing = True
        for key, start, finish, _ in transitions:
            if key is not last_key or missing:
                last_key = key
                ts = tasks.get(key)
                missing = ts is None
                prefix = key_split(key) if ts is None else ts.prefix
                row = counts.get(prefix) or self._row(prefix)
                if gone and missing and key not in first_moves:
                    first_moves.add(key)
                    if start == RELEASED:
                        gone -= 1
                        row[finish] += 1
                        continue
            row[start] -= 1
            row[finish] += 1
        return NO_EFFECTS

    def on_event(self, event: ev.Event, now: float) -> Effects:
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
        return NO_EFFECTS

    def progress(self) -> list[dict[str, Any]]:
        """Dask's progress rows: prefixes with a task not forgotten, the most tasks first."""
        rows: list[tuple[int, str, dict[str, int]]] = []
        for prefix, counts in self.counts.items():
            row = {DASK_STATE_NAMES.get(s, s): max(n, 0) for s, n in counts.items()}
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
    progress: PrefixProgress,
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


def bars_of(record: Mapping[str, Any]) -> Iterable[tuple[str, Any, str, str, float, float, str]]:
    """The bars of one task stream record: one per ``startstops`` entry, as
    ``(worker, thread, prefix, action, start, stop, key)`` (transfers have the action
    ``transfer``, Dask colours them red; a failed computation ``error``)."""
    worker = str(record.get("worker", ""))
    thread = record.get("thread")
    key = record.get("key")
    prefix = key_split(key)
    erred = record.get("status") == "error"
    for startstop in record.get("startstops") or ():
        action = str(startstop.get("action", "compute"))
        start, stop = startstop.get("start"), startstop.get("stop")
        if type(start) not in (int, float) or type(stop) not in (int, float):
            continue
        if erred and action == "compute":
            action = "error"
        yield worker, thread, prefix, action, start, stop, str(key)


class TaskStreamFeed:
    """The task stream's records as encoded bars behind a cursor (see the module doc)."""

    def __init__(self, max_bars: int = MAX_BARS) -> None:
        self.max_bars = max_bars
        self.cursor = 0  # task stream records seen (TaskStream.index when last updated)
        self.bars: deque[str] = deque(maxlen=max_bars)
        self.bar_cursors: deque[int] = deque(maxlen=max_bars)  # the record index of each bar
        # Workers, prefixes and actions repeat: their JSON strings are made once.
        self._strings: dict[str, str] = {}

    def _string(self, text: str) -> str:
        encoded = self._strings.get(text)
        if encoded is None:
            if len(self._strings) > 100_000:
                self._strings.clear()
            encoded = self._strings[text] = json.dumps(text)
        return encoded

    def update(self, stream: TaskStream) -> None:
        new = stream.index - self.cursor
        if new <= 0:
            return
        # The newest records only (a record has one bar or more): O(max_bars), however
        # many tasks finished since the last update.
        records = list(islice(reversed(stream.buffer), min(new, len(stream.buffer), self.max_bars)))
        first = stream.index - len(records)
        string = self._string
        for offset, record in enumerate(reversed(records)):
            for worker, thread, prefix, action, start, stop, key in bars_of(record):
                thread_json = str(thread) if type(thread) is int else json.dumps(str(thread))
                self.bars.append(
                    f"[{string(worker)},{thread_json},{string(prefix)},{string(action)},"
                    f"{start:.4f},{stop:.4f},{json.dumps(key)}]"
                )
                self.bar_cursors.append(first + offset + 1)
        self.cursor = stream.index

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
