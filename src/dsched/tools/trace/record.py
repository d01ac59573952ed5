"""Recording a trace: what ``dsched scheduler --trace FILE`` runs inside the scheduler.

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
are still read (``read.py``), and ``dsched trace report`` handles them; ``dsched simulate
--trace`` needs version 2, which holds the graph.

Writes go through a 1 MiB buffer; ``outbox`` flushes it once more than a second has passed
since the last flush, and ``close`` at the end, so a scheduler killed mid-run loses about
its last second of records (the reader ignores a truncated last line).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from dsched.graph import GraphIntake
    from dsched.policy.protocol import Decision, PolicyEvent
    from dsched.state.outbox import Outbox

__all__ = ["TRACE_VERSION", "TraceRecorder"]

TRACE_VERSION = 2
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
        self,
        client: str,
        intake: GraphIntake,
        wanted: Iterable[Any],
        arrived: float,
        taken_in: float,
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
            wanted_kid = keys.get(key)
            if wanted_kid is None or (wanted_kid not in described and key not in tasks):
                wanted_kid = self._external(key)
            line += f"\t{wanted_kid}"
        write(line + "\n")

    def policy(
        self, events: Sequence[PolicyEvent], decisions: Sequence[Decision], now: float
    ) -> None:
        """Ready tasks handed to the policy and the assignments it answered with."""
        # Imported here: every `dsched` command imports this module (via the `trace`
        # subcommand), and the policy package is not needed to start most of them.
        from dsched.policy.protocol import Assignment, TaskReady

        t = self._us(now)
        task_by_id = self.state.task_by_id
        for event in events:
            if isinstance(event, TaskReady):
                ts = task_by_id(event.task)
                if ts is not None:
                    self._write(f"R\t{t}\t{self._kid(ts.key)}\n")
        t = self._us(time.time())
        for decision in decisions:
            if isinstance(decision, Assignment):
                ts = task_by_id(decision.task)
                if ts is not None:
                    self._write(f"A\t{t}\t{self._kid(ts.key)}\n")

    def outbox(self, out: Outbox, now: float) -> None:
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
        for client_msgs in out.to_clients.values():
            for client_msg in client_msgs:
                if client_msg["op"] == "key-in-memory" or client_msg["op"] == "task-erred":
                    write(f"C\t{t}\t{self._kid(client_msg['key'])}\n")
        if time.monotonic() - self._last_flush > _FLUSH_EVERY_S:
            self.flush()

    def task_finished(self, worker: str, msg: dict[str, Any], now: float) -> None:
        kid = self._kid(msg["key"])
        wid = self._wid(worker)
        compute: tuple[float, float] | None = None
        for entry in msg.get("startstops") or ():
            action = entry.get("action")
            if action == "compute":
                compute = entry["start"], entry["stop"]
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
        if compute is None:
            self._write(f"F\t{self._us(now)}\t{kid}\t{wid}\t\t\t{nbytes}\n")
        else:
            start, stop = compute
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
