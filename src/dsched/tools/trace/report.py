"""Reporting on a trace: ``dsched trace report FILE`` (``summarize`` and the task stream).

Theory of operation
-------------------
``summarize`` splits each task's life, as ``read_trace`` returns it, into phases between
consecutive moments (``PHASES``: ready -> compute-task sent is the scheduler's decision,
sent -> start the dispatch latency, start -> stop the compute, and so on; a phase counts
only the tasks for which both moments were recorded), adds the transfer intervals and
each worker's busy time, and derives per-worker idle time as the span (first graph received
-> last event) minus compute and transfer. ``format_summary`` prints that as a table;
``plot_task_stream`` draws a Gantt chart per worker (one row per concurrently busy thread,
tasks coloured by key prefix, transfers in red) with matplotlib, imported only when a chart
is drawn. ``add_parser``/``main`` are the ``dsched trace`` subcommand.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
from collections import defaultdict
from typing import Any

from dsched.tools.trace.read import Trace, read_trace

__all__ = ["PHASES", "add_parser", "format_summary", "main", "plot_task_stream", "summarize"]


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
    from matplotlib.patches import Rectangle

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
    handles = [Rectangle((0, 0), 1, 1, color=colour_of[p]) for p in prefixes[:10]]
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
