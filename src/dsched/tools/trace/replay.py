"""Replaying a recorded run: ``graph_from_trace(trace) -> RecordedRun``, a ``Trace`` turned
into what the simulator runs (``dsched simulate --trace FILE``).

Theory of operation
-------------------
A version 2 trace (``record.py``, read back by ``read.py``) describes every graph a client
submitted (dependencies, ``dask.order`` priorities, wanted keys) and what happened to it
(each task's compute interval on its worker, output size, which workers held scattered
data, when each worker registered and with how many threads). ``graph_from_trace`` puts
the measured costs on the recorded graph with ``dsched.sim.graphs.GraphBuilder`` (no
jitter: the replay is the recording) and derives the recorded cluster's shape and makespan;
``dsched.sim.cli`` runs the result on every policy next to the recorded makespan.

The simulator never sees a trace: this module sits on the tools layer, above ``dsched.sim``
(``tests/unit/test_layers.py``), and hands it a plain ``SimGraph`` and cluster shape. What
a trace cannot say is estimated or left out, as ``graph_from_trace`` lists: tasks that never
ran get an estimated cost, scattered data becomes pinned zero-duration roots, all graphs
are submitted at once and workers never leave.
"""

from __future__ import annotations

import ast
import statistics
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from dsched.sim.graphs import GraphBuilder, Key, SimGraph
from dsched.tools.trace.read import Trace

__all__ = ["RecordedRun", "graph_from_trace"]


@dataclass(slots=True)
class RecordedRun:
    """A trace turned into a simulator input: the graph, the recorded cluster's shape and the
    recorded makespan, for comparison with the simulated ones."""

    graph: SimGraph
    n_workers: int
    nthreads: int
    join_times: tuple[float, ...]  # per worker index, seconds after the replay's start
    makespan: float | None  # first graph taken in -> last client notification
    measured: int  # tasks with a measured compute interval
    estimated: int  # tasks that never ran: duration (and maybe size) estimated
    external: int  # data no traced task computed (scattered): zero-duration pinned roots
    compute: float = 0.0  # sum of the measured compute intervals, seconds
    notes: list[str] = field(default_factory=list)


def _trace_key(text: str) -> Key:
    """Tuple keys were recorded as their repr: give them back their shape."""
    if text.startswith("("):
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError, MemoryError, RecursionError):
            return text
        if isinstance(value, tuple):
            return value
    return text


def _estimate(
    by_prefix: dict[str, list[float]], everything: list[float], prefix: str, default: float
) -> float:
    values = by_prefix.get(prefix) or everything
    return float(statistics.median(values)) if values else default


def graph_from_trace(
    trace: Trace,
    *,
    name: str = "trace",
    duration: float | None = None,
    nbytes: int | None = None,
    worker_address: Callable[[int], str] | None = None,
    n_workers: int | None = None,
) -> RecordedRun:
    """The recorded graph (every graph of the trace, merged) with measured costs.

    * A task's duration is its last measured compute interval (worker start/stop) and its
      size the ``nbytes`` of its last ``task-finished``.
    * A task that never ran (erred, cancelled, lost before finishing, or a dependent of
      those) gets ``duration``/``nbytes`` if given, else the median of its key prefix's
      measured tasks, else the median of every measured task (0 if nothing was measured).
      The simulator runs it as if it had succeeded.
    * Data no traced task computed (scattered with ``Client.scatter``, or named by a graph
      but never described by one) becomes a zero-duration root task of its recorded size,
      restricted to the worker that held it (``worker_address(index)``, the holder's index
      modulo the simulated worker count), so it is in place at once, as it was.
    * Priorities: graphs in arrival order, each by its recorded ``dask.order``; all graphs
      are submitted at time 0 (the client's pauses between graphs are not replayed).
    * Cluster: the workers that registered or took part, in order of registration, with the
      most common thread count; workers that joined after the first graph join as late in
      the simulation (``join_times``). Leaving workers are not modelled.
    """
    from dask.utils import key_split

    if trace.version < 2:
        raise ValueError(
            f"trace version {trace.version} has no graph (dependencies, sizes): "
            "record it again with this dsched version"
        )
    described = {kid: tt for kid, tt in trace.tasks.items() if tt.dependencies is not None}
    if not described:
        raise ValueError("the trace holds no graph: no client submitted work while tracing")
    # Keys that a task or the client needs but no graph described as a task: external data.
    needed = {dep for tt in described.values() for dep in tt.dependencies or ()}
    needed.update(kid for kids in trace.wanted.values() for kid in kids)
    external = sorted(kid for kid in needed if kid not in described)

    # Workers by registration (unknown registration: first seen), and the replay's start.
    starts = [taken for _, taken, _, _ in trace.graphs.values()]
    start = min(starts) if starts else 0.0
    wids = sorted(trace.workers, key=lambda w: (trace.worker_joined.get(w, float("-inf")), w))
    index_of = {wid: i for i, wid in enumerate(wids)}
    threads = Counter(trace.worker_threads[w] for w in wids if w in trace.worker_threads)
    nthreads = threads.most_common(1)[0][0] if threads else 1
    notes = []
    if len(threads) > 1:
        notes.append(f"workers had different thread counts {dict(threads)}: using {nthreads}")
    join_times = tuple(max(0.0, trace.worker_joined.get(w, start) - start) for w in wids)
    simulated_workers = n_workers if n_workers is not None else max(1, len(wids))

    # Measured costs, and medians per prefix for what was not measured.
    keys: dict[int, Key] = {}
    seen: set[Key] = set()
    for kid in sorted([*described, *external]):
        text = trace.tasks[kid].key if kid in trace.tasks else f"#{kid}"
        key = _trace_key(text)
        if key in seen:  # two recorded keys with one text form (str vs repr of a tuple)
            key = f"{text}#{kid}"
        seen.add(key)
        keys[kid] = key
    prefix = {kid: key_split(key) for kid, key in keys.items()}
    durations: dict[str, list[float]] = {}
    sizes: dict[str, list[float]] = {}
    all_durations: list[float] = []
    all_sizes: list[float] = []
    for kid, tt in described.items():
        if tt.start is not None and tt.stop is not None:
            durations.setdefault(prefix[kid], []).append(max(0.0, tt.stop - tt.start))
            all_durations.append(max(0.0, tt.stop - tt.start))
        if tt.nbytes is not None:
            sizes.setdefault(prefix[kid], []).append(tt.nbytes)
            all_sizes.append(tt.nbytes)

    b = GraphBuilder(name, 0, 0.0)
    measured = estimated = 0
    for kid in external:
        data = trace.tasks.get(kid)
        size = data.nbytes if data is not None else None
        if size is None:
            size = nbytes if nbytes is not None else 0
        annotations: dict[str, Any] = {}
        holders = [index_of[w] for w in (data.holders if data is not None else ()) if w in index_of]
        if holders and worker_address is not None:
            annotations["workers"] = (worker_address(min(holders) % simulated_workers),)
        b.add(keys[kid], (), 0.0, int(size), annotations)
    ranked = sorted(described, key=lambda k: (described[k].described_in, described[k].order, k))
    for kid in ranked:
        tt = described[kid]
        if tt.start is not None and tt.stop is not None:
            seconds = max(0.0, tt.stop - tt.start)
            measured += 1
        else:
            seconds = (
                duration
                if duration is not None
                else _estimate(durations, all_durations, prefix[kid], 0.0)
            )
            estimated += 1
        if tt.nbytes is not None:
            size = tt.nbytes
        elif nbytes is not None:
            size = nbytes
        else:
            size = round(_estimate(sizes, all_sizes, prefix[kid], 0.0))
        deps = tuple(keys[d] for d in tt.dependencies or ())
        b.add(keys[kid], deps, seconds, int(size))
    wanted = [keys[kid] for gid in sorted(trace.wanted) for kid in trace.wanted[gid] if kid in keys]
    if not wanted:  # no Q records: the sinks
        has_dependents = {dep for tt in described.values() for dep in tt.dependencies or ()}
        wanted = [keys[kid] for kid in ranked if kid not in has_dependents]
    graph = b.build(list(dict.fromkeys(wanted)))

    notified = [tt.notified for tt in trace.tasks.values() if tt.notified is not None]
    if not notified:
        notified = [tt.finished for tt in trace.tasks.values() if tt.finished is not None]
    makespan = max(notified) - start if notified and starts else None
    if len(trace.graphs) > 1:
        notes.append(
            f"{len(trace.graphs)} graphs merged and submitted at once; the recorded makespan "
            "includes any pause between them"
        )
    if estimated:
        notes.append(
            f"{estimated} tasks never ran in the trace: "
            + (f"duration {duration:g} s" if duration is not None else "prefix median duration")
        )
    if external:
        notes.append(f"{len(external)} keys of scattered data: zero-duration roots, pinned")
    return RecordedRun(
        graph=graph,
        n_workers=max(1, len(wids)),
        nthreads=nthreads,
        join_times=join_times,
        makespan=makespan,
        measured=measured,
        estimated=estimated,
        external=len(external),
        compute=sum(all_durations),
        notes=notes,
    )
