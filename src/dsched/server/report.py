"""``performance_report``: the static HTML file of ``distributed.performance_report``.

Theory of operation
-------------------
The Client's context manager asks ``run_on_scheduler(lambda s: s.monitor.count)`` and
``get_task_stream(0, 0)`` on entry (which turns the task stream on), and on exit the
``performance_report(start, last_count, code, mode)`` RPC, whose reply is the HTML it
writes to the file. Dask's report is a Bokeh document (task stream, progress, worker
profile, bandwidth, system monitor). dsched has no Bokeh documents; its report is plain
HTML built from the task stream records since ``start`` and says so at the top: the
duration, the calling code, tasks and compute/transfer seconds per task prefix and per
worker, erred tasks, and the task stream as an SVG chart (one row per worker thread).
"""

from __future__ import annotations

import html
import time
from collections import defaultdict
from collections.abc import Iterable
from typing import Any

from dask.utils import format_time, key_split

from dsched.ext.task_stream import TaskStream
from dsched.server.ops import RpcOp, call

_CHART_WIDTH = 1000
_ROW_HEIGHT = 14
_ACTION_COLORS = {"compute": "#1f77b4", "transfer": "#d62728", "disk-read": "#9467bd"}


class PerformanceReport:
    def __init__(self, task_stream: TaskStream) -> None:
        self.task_stream = task_stream

    def rpc_ops(self) -> dict[str, RpcOp]:
        return {"performance_report": call(self.performance_report)}

    def performance_report(
        self, start: float, last_count: int | None = None, code: str = "", mode: Any = None
    ) -> str:
        now = time.time()
        records = self.task_stream.collect(now, start=start)
        return render(records, float(start), now, str(code))


def _intervals(records: Iterable[dict[str, Any]]) -> list[tuple[str, str, str, float, float]]:
    """(worker, thread, action, start, stop) of every recorded interval."""
    return [
        (
            str(record.get("worker", "")),
            str(record.get("thread", "")),
            str(entry.get("action", "")),
            float(entry["start"]),
            float(entry["stop"]),
        )
        for record in records
        for entry in record.get("startstops") or ()
        if isinstance(entry, dict) and "start" in entry and "stop" in entry
    ]


def _table(title: str, header: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(cell)}</td>" for cell in row) + "</tr>" for row in rows
    )
    return f"<h2>{html.escape(title)}</h2><table><tr>{head}</tr>{body}</table>"


def _chart(intervals: list[tuple[str, str, str, float, float]], start: float, stop: float) -> str:
    rows = sorted({(worker, thread) for worker, thread, *_ in intervals})
    if not rows:
        return "<p>No task ran in this period.</p>"
    span = max(stop - start, 1e-9)
    index = {row: i for i, row in enumerate(rows)}
    rects = []
    for worker, thread, action, begin, end in intervals:
        x = (begin - start) / span * _CHART_WIDTH
        width = max((end - begin) / span * _CHART_WIDTH, 0.5)
        y = index[worker, thread] * _ROW_HEIGHT
        color = _ACTION_COLORS.get(action, "#7f7f7f")
        rects.append(
            f'<rect x="{x:.2f}" y="{y}" width="{width:.2f}" height="{_ROW_HEIGHT - 2}" '
            f'fill="{color}"><title>{html.escape(action)}</title></rect>'
        )
    labels = "".join(
        f"<li>row {i}: {html.escape(worker)} thread {html.escape(thread)}</li>"
        for i, (worker, thread) in enumerate(rows)
    )
    height = len(rows) * _ROW_HEIGHT
    return (
        f'<h2>Task stream</h2><svg width="{_CHART_WIDTH}" height="{height}" '
        f'class="task-stream">{"".join(rects)}</svg>'
        f"<p>compute: blue, transfer: red, disk-read: purple</p><ul>{labels}</ul>"
    )


def render(records: list[dict[str, Any]], start: float, now: float, code: str) -> str:
    per_prefix: dict[str, list[float]] = defaultdict(lambda: [0, 0.0, 0.0, 0])
    per_worker: dict[str, list[float]] = defaultdict(lambda: [0, 0.0, 0.0])
    errors = []
    for record in records:
        prefix = key_split(record.get("key"))
        worker = str(record.get("worker", ""))
        totals, worker_totals = per_prefix[prefix], per_worker[worker]
        totals[0] += 1
        worker_totals[0] += 1
        if record.get("status") == "error":
            totals[3] += 1
            errors.append([str(record.get("key")), str(record.get("exception_text", ""))])
        for entry in record.get("startstops") or ():
            seconds = float(entry["stop"]) - float(entry["start"])
            column = 1 if entry.get("action") == "compute" else 2
            totals[column] += seconds
            worker_totals[column] += seconds
    prefix_rows = [
        [prefix, str(int(n)), format_time(c), format_time(t), str(int(e))]
        for prefix, (n, c, t, e) in sorted(per_prefix.items())
    ]
    worker_rows = [
        [worker, str(int(n)), format_time(c), format_time(t)]
        for worker, (n, c, t) in sorted(per_worker.items())
    ]
    parts = [
        "<!DOCTYPE html><html><head><meta charset='utf-8'>"
        "<title>Dask Performance Report</title>"
        "<style>body{font-family:sans-serif}td,th{padding:2px 8px;text-align:left}</style>"
        "</head><body><h1>Dask Performance Report</h1>",
        "<p class='note'>Made by dsched. It holds the task stream and per-prefix and "
        "per-worker summaries of the tasks that ran; the Bokeh plots of Dask's report "
        "(progress, worker profile, bandwidth, system monitor) are not included.</p>",
        f"<p>Duration: {html.escape(format_time(now - start))}; "
        f"tasks: {len(records)}.</p>",
        f"<h2>Calling code</h2><pre>{html.escape(code)}</pre>",
        _table(
            "Tasks per prefix",
            ["prefix", "tasks", "compute", "transfer", "erred"],
            prefix_rows,
        ),
        _table("Tasks per worker", ["worker", "tasks", "compute", "transfer"], worker_rows),
    ]
    if errors:
        parts.append(_table("Erred tasks", ["key", "exception"], errors))
    parts.append(_chart(_intervals(records), start, now))
    parts.append("</body></html>")
    return "".join(parts)
