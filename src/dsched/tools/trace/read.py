"""Reading a trace back: ``read_trace(path) -> Trace``, the data model of a recorded run.

Theory of operation
-------------------
``read_trace`` parses the file format that ``record.py`` writes (its docstring is the format
reference) in one pass, line by line. Definition records (``K``, ``W``, ``G``, ``D``, ``M``,
``Q``) fill the tables of a ``Trace``; event records set the moments of the task they name on
its ``TaskTimes`` (created on first mention, so records of a task seen before its ``K``
still land). Times come back as float seconds since the trace's ``t0``. A ``D`` record
belongs to the last ``G`` before it. A last line without its newline (the scheduler was
killed mid-write) is ignored, and so are records of an unknown type; a malformed line, or a
header of an unknown version, raises ``ValueError`` naming the file and the line. Version 1
and 2 files are read; the fields version 1 lacks stay at their defaults.

Nothing here interprets the times: ``report.py`` summarizes them, and
``dsched.tools.trace.replay.graph_from_trace`` rebuilds the graph of a version 2 trace for the
simulator.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

from dsched.tools.trace.record import TRACE_VERSION

__all__ = ["READABLE_VERSIONS", "TaskTimes", "Trace", "read_trace"]

READABLE_VERSIONS = (1, 2)


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
