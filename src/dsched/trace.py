"""Per-task tracing: ``dsched scheduler --trace FILE`` and ``dsched trace report FILE``.

Theory of operation
-------------------
The reactor (``server/scheduler.py``) calls a ``TraceRecorder`` from a handful of sites, each
behind one ``if self.trace is not None:`` guard, with data it already has in hand: the graph
it just took in (its tasks' dependencies and priorities, the keys the client wants), each
worker registering (its threads), the policy's input events and decisions, the outbox it is
about to write
(``compute-task`` to workers, ``key-in-memory``/``task-erred`` to clients) and the
``task-finished`` messages workers send (whose ``startstops`` give the worker-side compute and
transfer intervals, and the output size). Nothing is added to the pure state machine. With
tracing off the cost is that one attribute test per site.

The file is append-only text, one record per line, tab-separated; times are integer
microseconds since the ``H`` record's ``t0`` (seconds since the epoch). Keys and workers are
numbered on first sight by a definition record, so event records stay short::

    H  {"version": 2, "t0": ..., "pid": ...}           header (JSON)
    K  kid  gid  key                                   key definition (key as JSON string)
    W  wid  address  nthreads  t_joined                worker definition
    G  gid  t_arrived  t_taken_in  client  n_tasks     graph received (then taken in)
    D  kid  order  dep_kid...                          a task of the last G: its priority
                                                       within the graph and its dependencies
    M  kid  nbytes  holder_wid...                      data a graph needs that no traced task
                                                       computes (scattered): size, holders
    Q  gid  kid...                                     the keys the client wants from graph gid
    R  t  kid                                          task ready (all inputs in memory)
    A  t  kid                                          task assigned by the policy
    S  t  kid  wid  run_id                             compute-task written to the worker
    F  t  kid  wid  start  stop  nbytes                task-finished received; compute
                                                       interval and output size
    X  kid  wid  start  stop  source_wid               transfer interval from startstops
    E  t  kid  wid                                     task-erred received
    C  t  kid                                          client notified (key-in-memory/task-erred)

A ``D`` record is written once per task, when the first graph naming it is taken in; ``K``,
``D``, ``M`` and ``Q`` records follow their ``G`` record at once. Empty fields mean "not
known" (``W`` of a worker seen before it registered; ``F`` without a compute interval).
Version 1 files (no ``D``/``M``/``Q`` records, no nthreads on ``W``, no nbytes on ``F``)
are still read, and ``dsched trace report`` handles them; ``dsched simulate --trace`` needs
version 2, which holds the graph.

``dsched trace report FILE`` reads it back, splits each task's life into phases (scheduler
decision, send->start latency, compute, finish->scheduler latency, transfer) plus per-worker
idle time, prints a summary, and draws a task stream (Gantt chart) per worker as a PNG.
``dsched simulate --trace FILE`` replays the recorded graph, with the measured durations and
output sizes, on the simulator (``dsched.sim.graphs.graph_from_trace``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["TaskTimes", "Trace", "TraceRecorder", "add_parser", "read_trace", "summarize"]

TRACE_VERSION = 2
READABLE_VERSIONS = (1, 2)
_FLUSH_EVERY_S = 1.0
_TAB = "\t"


def _key_text(key: Any) -> str:
    return json.dumps(key if isinstance(key, str) else repr(key))


class TraceRecorder:
    """Writes trace records (see the module docstring). ``state`` resolves policy task ids."""

    def __init__(self, path: str | os.PathLike[str], state: Any = None) -> None:
        self.path = Path(path)
        self.state = state
        self.t0 = time.time()
        self._file = self.path.open("w", buffering=1 << 20)
        self._write = self._file.write
        self._keys: dict[Any, int] = {}
        self._workers: dict[str, int] = {}
        self._described: set[int] = set()  # kids with a D or M record
        self._graphs = 0
        self._last_flush = time.monotonic()
        header = {"version": TRACE_VERSION, "t0": self.t0, "pid": os.getpid()}
        self._write(f"H\t{json.dumps(header)}\n")

    # -- ids -------------------------------------------------------------------------
    def _us(self, t: float) -> int:
        return round((t - self.t0) * 1e6)

    def _kid(self, key: Any, gid: int = -1) -> int:
        kid = self._keys.get(key)
        if kid is None:
            kid = self._keys[key] = len(self._keys)
            self._write(f"K\t{kid}\t{gid}\t{_key_text(key)}\n")
        return kid

    def _wid(self, address: str, nthreads: Any = None, joined: float | None = None) -> int:
        wid = self._workers.get(address)
        if wid is None:
            wid = self._workers[address] = len(self._workers)
            if nthreads is None:  # seen before it registered (or not a worker of ours)
                ws = getattr(self.state, "workers", {}).get(address)
                nthreads = ws.nthreads if ws is not None else ""
            t = "" if joined is None else self._us(joined)
            self._write(f"W\t{wid}\t{address}\t{nthreads}\t{t}\n")
        return wid

    def _external(self, key: Any) -> int:
        """A key a graph needs that no traced task computes (scattered data): an M record
        with its size and holders, from the runtime's state, once."""
        kid = self._kid(key)
        if kid not in self._described:
            self._described.add(kid)
            tasks = getattr(self.state, "tasks", None)
            ts = tasks.get(key) if isinstance(tasks, dict) else None
            nbytes = "" if ts is None else ts.nbytes
            holders = [] if ts is None else sorted(self._wid(ws.address) for ws in ts.who_has)
            self._write("\t".join(["M", str(kid), str(nbytes), *map(str, holders)]) + "\n")
        return kid

    # -- hooks -----------------------------------------------------------------------
    def worker(self, address: str, nthreads: int, now: float) -> None:
        """A worker registered (defines it, with its threads, unless seen before)."""
        self._wid(address, nthreads, now)

    def graph(
        self, client: str, intake: Any, wanted: Iterable[Any], arrived: float, taken_in: float
    ) -> None:
        """A client's graph (a ``GraphIntake``: ``tasks`` key -> spec with ``dependencies``,
        ``order`` key -> priority), received at ``arrived`` and taken in by ``taken_in``;
        ``wanted`` are the keys the client asked for."""
        gid = self._graphs
        self._graphs += 1
        tasks = intake.tasks
        order = intake.order
        write = self._write
        write(f"G\t{gid}\t{self._us(arrived)}\t{self._us(taken_in)}\t{client}\t{len(tasks)}\n")
        keys = self._keys
        for key in tasks:
            if key not in keys:
                self._kid(key, gid)
        described = self._described
        get_kid = keys.get
        get_order = order.get
        for key, spec in tasks.items():
            kid = keys[key]
            if kid in described:
                continue  # a task of an earlier graph, submitted again
            described.add(kid)
            deps = spec.dependencies
            if not deps:
                write(f"D\t{kid}\t{get_order(key, 0)}\n")
                continue
            ids = []
            for dep in deps:
                did = get_kid(dep)
                if did is None or (did not in described and dep not in tasks):
                    did = self._external(dep)
                ids.append(str(did))
            write(f"D\t{kid}\t{get_order(key, 0)}\t{_TAB.join(ids)}\n")
        line = f"Q\t{gid}"
        for key in wanted:
            kid = keys.get(key)
            if kid is None or (kid not in described and key not in tasks):
                kid = self._external(key)
            line += f"\t{kid}"
        write(line + "\n")

    def policy(self, events: Sequence[Any], decisions: Sequence[Any], now: float) -> None:
        """Ready tasks handed to the policy and the assignments it answered with."""
        t = self._us(now)
        task_by_id = self.state.task_by_id
        for event in events:
            if type(event).__name__ == "TaskReady":
                ts = task_by_id(event.task)
                if ts is not None:
                    self._write(f"R\t{t}\t{self._kid(ts.key)}\n")
        t = self._us(time.time())
        for decision in decisions:
            if type(decision).__name__ == "Assignment":
                ts = task_by_id(decision.task)
                if ts is not None:
                    self._write(f"A\t{t}\t{self._kid(ts.key)}\n")

    def outbox(self, out: Any, now: float) -> None:
        """After a flush: compute-task messages sent, clients told about results."""
        t = self._us(now)
        write = self._write
        for address, msgs in out.to_workers.items():
            wid = -1
            for msg in msgs:
                if msg["op"] == "compute-task":
                    if wid < 0:
                        wid = self._wid(address)
                    write(f"S\t{t}\t{self._kid(msg['key'])}\t{wid}\t{msg['run_id']}\n")
        for msgs in out.to_clients.values():
            for msg in msgs:
                if msg["op"] in ("key-in-memory", "task-erred"):
                    write(f"C\t{t}\t{self._kid(msg['key'])}\n")
        if time.monotonic() - self._last_flush > _FLUSH_EVERY_S:
            self.flush()

    def task_finished(self, worker: str, msg: dict[str, Any], now: float) -> None:
        kid = self._kid(msg["key"])
        wid = self._wid(worker)
        start = stop = None
        for entry in msg.get("startstops") or ():
            action = entry.get("action")
            if action == "compute":
                start, stop = entry["start"], entry["stop"]
            elif action == "transfer":
                source = entry.get("source")
                swid = self._wid(source) if isinstance(source, str) else -1
                self._write(
                    f"X\t{kid}\t{wid}\t{self._us(entry['start'])}\t{self._us(entry['stop'])}"
                    f"\t{swid}\n"
                )
        nbytes = msg.get("nbytes")
        if nbytes is None:
            nbytes = ""
        if start is None:
            self._write(f"F\t{self._us(now)}\t{kid}\t{wid}\t\t\t{nbytes}\n")
        else:
            self._write(
                f"F\t{self._us(now)}\t{kid}\t{wid}\t{self._us(start)}\t{self._us(stop)}\t{nbytes}\n"
            )

    def task_erred(self, worker: str, msg: dict[str, Any], now: float) -> None:
        self._write(f"E\t{self._us(now)}\t{self._kid(msg['key'])}\t{self._wid(worker)}\n")

    def flush(self) -> None:
        self._file.flush()
        self._last_flush = time.monotonic()

    def close(self) -> None:
        if not self._file.closed:
            self._file.close()


# ---------------------------------------------------------------------- reading
@dataclass(slots=True)
class TaskTimes:
    """One task's moments, in seconds since the trace's t0 (None when not seen)."""

    key: str
    graph: int = -1
    received: float | None = None
    ready: float | None = None
    assigned: float | None = None
    sent: float | None = None
    worker: int = -1
    start: float | None = None
    stop: float | None = None
    finished: float | None = None
    notified: float | None = None
    erred: bool = False
    transfers: list[tuple[float, float, int]] = field(default_factory=list)
    nbytes: int | None = None  # output size from the last task-finished (version 2)
    # From the D record (version 2): the graph that described the task, its priority within
    # that graph, its dependencies (kids); None when no graph described it as a task.
    described_in: int = -1
    order: float = 0.0
    dependencies: tuple[int, ...] | None = None
    # From the M record: data no traced task computes (scattered), with its holders (wids).
    external: bool = False
    holders: tuple[int, ...] = ()


@dataclass
class Trace:
    t0: float
    tasks: dict[int, TaskTimes]
    workers: dict[int, str]
    graphs: dict[int, tuple[float, float, str, int]]  # gid -> (arrived, taken in, client, n)
    version: int = TRACE_VERSION
    wanted: dict[int, list[int]] = field(default_factory=dict)  # gid -> kids the client wants
    worker_threads: dict[int, int] = field(default_factory=dict)  # wid -> nthreads
    worker_joined: dict[int, float] = field(default_factory=dict)  # wid -> registration time


def read_trace(path: str | os.PathLike[str]) -> Trace:
    """Parse a trace file; a truncated last line (scheduler killed) is ignored."""
    tasks: dict[int, TaskTimes] = {}
    workers: dict[int, str] = {}
    graphs: dict[int, tuple[float, float, str, int]] = {}
    wanted: dict[int, list[int]] = {}
    worker_threads: dict[int, int] = {}
    worker_joined: dict[int, float] = {}
    t0 = 0.0
    version = TRACE_VERSION
    last_graph = -1

    def task(kid: str) -> TaskTimes:
        k = int(kid)
        tt = tasks.get(k)
        if tt is None:
            tt = tasks[k] = TaskTimes(key=f"#{k}")
        return tt

    with open(path) as f:
        for line in f:
            if not line.endswith("\n"):
                break
            parts = line[:-1].split("\t")
            code = parts[0]
            try:
                if code == "H":
                    header = json.loads(parts[1])
                    version = header.get("version")
                    if version not in READABLE_VERSIONS:
                        raise ValueError(f"unsupported trace version {version}")
                    t0 = float(header["t0"])
                elif code == "K":
                    tt = task(parts[1])
                    tt.key = json.loads(parts[3])
                    tt.graph = int(parts[2])
                    if tt.graph in graphs:
                        tt.received = graphs[tt.graph][0]
                elif code == "W":
                    wid = int(parts[1])
                    workers[wid] = parts[2]
                    if len(parts) > 3 and parts[3]:
                        worker_threads[wid] = int(parts[3])
                    if len(parts) > 4 and parts[4]:
                        worker_joined[wid] = int(parts[4]) / 1e6
                elif code == "G":
                    last_graph = int(parts[1])
                    graphs[last_graph] = (
                        int(parts[2]) / 1e6,
                        int(parts[3]) / 1e6,
                        parts[4],
                        int(parts[5]),
                    )
                elif code == "D":
                    tt = task(parts[1])
                    tt.described_in = last_graph
                    tt.order = float(parts[2])
                    tt.dependencies = tuple(int(d) for d in parts[3:])
                elif code == "M":
                    tt = task(parts[1])
                    tt.external = True
                    if parts[2]:
                        tt.nbytes = int(parts[2])
                    tt.holders = tuple(int(w) for w in parts[3:])
                elif code == "Q":
                    wanted.setdefault(int(parts[1]), []).extend(int(k) for k in parts[2:])
                elif code == "R":
                    tt = task(parts[2])
                    if tt.ready is None:
                        tt.ready = int(parts[1]) / 1e6
                elif code == "A":
                    task(parts[2]).assigned = int(parts[1]) / 1e6
                elif code == "S":
                    tt = task(parts[2])
                    tt.sent = int(parts[1]) / 1e6
                    tt.worker = int(parts[3])
                elif code == "F":
                    tt = task(parts[2])
                    tt.finished = int(parts[1]) / 1e6
                    tt.worker = int(parts[3])
                    if parts[4]:
                        tt.start = int(parts[4]) / 1e6
                        tt.stop = int(parts[5]) / 1e6
                    if len(parts) > 6 and parts[6]:
                        tt.nbytes = int(parts[6])
                elif code == "X":
                    task(parts[1]).transfers.append(
                        (int(parts[3]) / 1e6, int(parts[4]) / 1e6, int(parts[2]))
                    )
                elif code == "E":
                    tt = task(parts[2])
                    tt.finished = int(parts[1]) / 1e6
                    tt.erred = True
                elif code == "C":
                    task(parts[2]).notified = int(parts[1]) / 1e6
            except (IndexError, ValueError) as error:
                raise ValueError(f"{path}: bad trace line {line!r}: {error}") from error
    return Trace(t0, tasks, workers, graphs, version, wanted, worker_threads, worker_joined)


def _stats(values: list[float]) -> dict[str, float]:
    if not values:
        return {"n": 0, "total": 0.0, "mean": 0.0, "median": 0.0, "p90": 0.0, "max": 0.0}
    ordered = sorted(values)
    return {
        "n": len(ordered),
        "total": sum(ordered),
        "mean": statistics.fmean(ordered),
        "median": statistics.median(ordered),
        "p90": ordered[min(len(ordered) - 1, int(0.9 * len(ordered)))],
        "max": ordered[-1],
    }


PHASES = {
    "scheduler decision (ready -> compute-task sent)": ("ready", "sent"),
    "send -> start latency": ("sent", "start"),
    "compute": ("start", "stop"),
    "stop -> result received": ("stop", "finished"),
    "result received -> client notified": ("finished", "notified"),
}


def summarize(trace: Trace) -> dict[str, Any]:
    """Where time went: per-phase statistics, transfers, per-worker busy/idle, the span."""
    phases: dict[str, list[float]] = {name: [] for name in PHASES}
    for tt in trace.tasks.values():
        for name, (a, b) in PHASES.items():
            ta, tb = getattr(tt, a), getattr(tt, b)
            if ta is not None and tb is not None:
                phases[name].append(max(0.0, tb - ta))
    transfers = [stop - start for tt in trace.tasks.values() for start, stop, _ in tt.transfers]
    moments = [
        t
        for tt in trace.tasks.values()
        for t in (tt.received, tt.sent, tt.finished, tt.notified)
        if t is not None
    ]
    span_start = min(moments, default=0.0)
    span_end = max(moments, default=0.0)
    busy: dict[int, float] = defaultdict(float)
    moved: dict[int, float] = defaultdict(float)
    counts: dict[int, int] = defaultdict(int)
    for tt in trace.tasks.values():
        if tt.start is not None and tt.stop is not None and tt.worker >= 0:
            busy[tt.worker] += tt.stop - tt.start
            counts[tt.worker] += 1
        for start, stop, wid in tt.transfers:
            moved[wid] += stop - start
    span = span_end - span_start
    per_worker = {
        trace.workers.get(wid, f"#{wid}"): {
            "tasks": counts[wid],
            "compute": busy[wid],
            "transfer": moved[wid],
            "idle": max(0.0, span - busy[wid] - moved[wid]),
        }
        for wid in sorted(set(busy) | set(moved))
    }
    return {
        "tasks": len(trace.tasks),
        "graphs": len(trace.graphs),
        "span": span,
        "phases": {name: _stats(values) for name, values in phases.items()},
        "transfer": _stats(transfers),
        "workers": per_worker,
        "intake": _stats([taken - arrived for arrived, taken, _, _ in trace.graphs.values()]),
    }


def format_summary(summary: dict[str, Any]) -> str:
    lines = [
        f"tasks: {summary['tasks']}   graphs: {summary['graphs']}   "
        f"span (first graph -> last event): {summary['span']:.3f} s",
        f"graph intake (received -> taken in): total {summary['intake']['total']:.3f} s",
        "",
        f"{'phase':<45} {'n':>7} {'total s':>9} {'mean ms':>9} {'median ms':>10} "
        f"{'p90 ms':>8} {'max ms':>8}",
    ]
    for name, st in [*summary["phases"].items(), ("transfer", summary["transfer"])]:
        lines.append(
            f"{name:<45} {st['n']:>7} {st['total']:>9.3f} {st['mean'] * 1e3:>9.3f} "
            f"{st['median'] * 1e3:>10.3f} {st['p90'] * 1e3:>8.3f} {st['max'] * 1e3:>8.3f}"
        )
    lines += ["", f"{'worker':<28} {'tasks':>7} {'compute s':>10} {'transfer s':>11} {'idle s':>8}"]
    for address, row in summary["workers"].items():
        lines.append(
            f"{address:<28} {row['tasks']:>7} {row['compute']:>10.3f} {row['transfer']:>11.3f} "
            f"{row['idle']:>8.3f}"
        )
    lines.append("(idle = span - compute - transfer, per worker, all threads together)")
    return "\n".join(lines)


def _lanes(intervals: list[tuple[float, float, str]]) -> list[tuple[int, float, float, str]]:
    """Greedy lane assignment so that overlapping intervals (threads) get their own row."""
    lane_ends: list[float] = []
    placed = []
    for start, stop, label in sorted(intervals):
        for lane, end in enumerate(lane_ends):
            if end <= start:
                lane_ends[lane] = stop
                break
        else:
            lane = len(lane_ends)
            lane_ends.append(stop)
        placed.append((lane, start, stop, label))
    return placed


def plot_task_stream(trace: Trace, path: str | os.PathLike[str], title: str = "") -> None:
    """A Gantt chart: one band per worker (a row per concurrent lane), tasks coloured by
    key prefix, transfers in red."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from dask.utils import key_split

    by_worker: dict[int, list[tuple[float, float, str]]] = defaultdict(list)
    moves: dict[int, list[tuple[float, float]]] = defaultdict(list)
    for tt in trace.tasks.values():
        if tt.start is not None and tt.stop is not None and tt.worker >= 0:
            by_worker[tt.worker].append((tt.start, tt.stop, key_split(tt.key)))
        for start, stop, wid in tt.transfers:
            moves[wid].append((start, stop))
    prefixes = sorted({label for rows in by_worker.values() for _, _, label in rows})
    colours = plt.get_cmap("tab10")
    colour_of = {p: colours(i % 10) for i, p in enumerate(prefixes)}
    fig, ax = plt.subplots(figsize=(12, 1 + 0.5 * max(1, len(by_worker) + len(moves))))
    row = 0
    ticks, labels = [], []
    for wid in sorted(set(by_worker) | set(moves)):
        placed = _lanes(by_worker.get(wid, []))
        n_lanes = max((lane for lane, *_ in placed), default=0) + 1
        bars: dict[tuple[int, str], list[tuple[float, float]]] = defaultdict(list)
        for lane, start, stop, prefix in placed:
            bars[lane, prefix].append((start, max(stop - start, 1e-5)))
        for (lane, prefix), lane_bars in bars.items():
            ax.broken_barh(lane_bars, (row + lane, 0.8), color=colour_of[prefix])
        if moves.get(wid):
            ax.broken_barh(
                [(s, max(e - s, 1e-5)) for s, e in moves[wid]],
                (row + n_lanes, 0.8),
                color="red",
            )
            n_lanes += 1
        ticks.append(row + n_lanes / 2)
        labels.append(trace.workers.get(wid, f"#{wid}"))
        row += n_lanes + 1
    ax.set_yticks(ticks, labels)
    ax.set_xlabel("seconds since the scheduler started tracing")
    ax.set_title(title or "task stream per worker (red: transfers)")
    handles = [plt.Rectangle((0, 0), 1, 1, color=colour_of[p]) for p in prefixes[:10]]
    if handles:
        ax.legend(handles, prefixes[:10], loc="upper right", fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------------- command line
def add_parser(subparsers: Any, name: str) -> None:
    parser = subparsers.add_parser(name, help="inspect a trace written by scheduler --trace")
    commands = parser.add_subparsers(dest="trace_command", required=True)
    report = commands.add_parser("report", help="where time went, and a task-stream PNG")
    report.add_argument("file", help="trace file written by `dsched scheduler --trace FILE`")
    report.add_argument(
        "--png", default=None, help="task-stream chart to write (default: FILE.png)"
    )
    report.add_argument("--no-plot", action="store_true", help="only print the summary")
    report.add_argument("--json", action="store_true", help="print the summary as JSON")
    parser.set_defaults(func=main)


def main(args: argparse.Namespace) -> None:
    trace = read_trace(args.file)
    summary = summarize(trace)
    print(json.dumps(summary, indent=2) if args.json else format_summary(summary))
    if not args.no_plot:
        png = args.png or f"{args.file}.png"
        plot_task_stream(trace, png, title=f"task stream: {os.path.basename(args.file)}")
        if not args.json:
            print(f"\ntask stream written to {png}")
