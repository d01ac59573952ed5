"""Per-task tracing: ``dsched scheduler --trace FILE``, ``dsched trace report FILE`` and
``dsched simulate --trace FILE``.

Theory of operation
-------------------
Four parts, used at different times and by different processes:

* ``record``: ``TraceRecorder``, the only part that runs inside the scheduler. The reactor
  calls it, when tracing is on, with what it already has in hand, and it appends one short
  text record per event to the file (the format is documented there).
* ``read``: ``read_trace`` parses a file into a ``Trace`` (per-task ``TaskTimes``, workers,
  graphs), the data model the two consumers share.
* ``report``: ``summarize`` turns a ``Trace`` into per-phase timings and per-worker idle
  time, and ``dsched trace report`` prints them and draws a task stream per worker.
* ``replay``: ``graph_from_trace`` turns a ``Trace`` into a simulator graph and cluster
  shape (a ``RecordedRun``), which ``dsched simulate --trace`` runs on every policy. It is
  not imported here: the scheduler imports this package for ``record`` and has no use for
  the simulator.
"""

from dsched.tools.trace.read import TaskTimes, Trace, read_trace
from dsched.tools.trace.record import TRACE_VERSION, TraceRecorder
from dsched.tools.trace.report import (
    add_parser,
    format_summary,
    main,
    plot_task_stream,
    summarize,
)

__all__ = [
    "TRACE_VERSION",
    "TaskTimes",
    "Trace",
    "TraceRecorder",
    "add_parser",
    "format_summary",
    "main",
    "plot_task_stream",
    "read_trace",
    "summarize",
]
