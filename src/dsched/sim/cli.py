"""``dsched simulate``: run policies on a simulated cluster and compare them in one table.

    dsched simulate --graph merge:10000 --graph tree:12 --policy dask,locality --workers 2
    dsched simulate --graph mymodule:make_collection --gantt /tmp/gantt
    dsched simulate --trace run.trace --policy dask,random

A graph is ``NAME[:ARG,ARG...]`` for a synthetic shape (merge:N, map:N, tree:K,
chains:N,LENGTH, wide:N) or ``module:function`` returning a dask collection.

``--trace FILE`` replays a run recorded with ``dsched scheduler --trace FILE``: the graph(s)
the clients submitted, each task with its measured compute time and output size, on the
recorded cluster's shape (workers, threads per worker, late joiners) unless --workers or
--threads say otherwise. The table then shows the recorded makespan (first graph taken in ->
last result reported to the client) next to each simulated one. Tasks that never ran in the
recording get --duration/--nbytes if given, else their key prefix's median; scattered data
becomes zero-duration tasks pinned to the worker that held it. Several graphs in one trace
are merged and submitted at once. For the policy the recording ran with (``dask`` unless
the scheduler got --policy), the gap between the two makespans is what the simulator does
not model (scheduler CPU, worker-side overheads, outgoing-link contention); the other rows
show what another policy would change.

Runs are deterministic given --seed (synthetic graphs' jitter, the random policy).
"""

from __future__ import annotations

import argparse
import importlib
import os
from typing import TYPE_CHECKING, Any

from dsched.sim.graphs import SYNTHETIC, SimGraph, graph_from_collection

if TYPE_CHECKING:
    from dsched.tools.trace.replay import RecordedRun

DEFAULT_WORKERS = 2
DEFAULT_THREADS = 1


def parse_graph(spec: str, seed: int, duration: float | None, nbytes: int | None) -> SimGraph:
    name, _, arg_text = spec.partition(":")
    options: dict[str, Any] = {"seed": seed}
    if duration is not None:
        options["duration"] = duration
    if nbytes is not None:
        options["nbytes"] = nbytes
    if name in SYNTHETIC:
        args = [int(a) for a in arg_text.split(",") if a]
        return SYNTHETIC[name](*args, **options)
    if not arg_text:
        raise SystemExit(f"dsched simulate: unknown graph {spec!r}")
    function = getattr(importlib.import_module(name), arg_text)
    return graph_from_collection(function(), name=spec, **options)


def load_trace(
    path: str,
    *,
    duration: float | None,
    nbytes: int | None,
    n_workers: int | None,
) -> RecordedRun:
    """Read a trace file and rebuild its graph (see ``dsched.tools.trace.replay``)."""
    from dsched.sim.engine import ClusterSpec
    from dsched.tools.trace.read import read_trace
    from dsched.tools.trace.replay import graph_from_trace

    try:
        return graph_from_trace(
            read_trace(path),
            name=f"trace:{os.path.basename(path)}",
            duration=duration,
            nbytes=nbytes,
            worker_address=ClusterSpec().address,
            n_workers=n_workers,
        )
    except (OSError, ValueError) as error:
        raise SystemExit(f"dsched simulate: {path}: {error}") from error


def describe(run: RecordedRun, n_workers: int, nthreads: int, overridden: bool) -> str:
    graph = run.graph
    recorded = f"{run.makespan:.4f} s" if run.makespan is not None else "unknown"
    lines = [
        f"{graph.name}: {len(graph)} tasks ({run.measured} measured, {run.estimated} "
        f"estimated, {run.external} scattered), {len(graph.keys)} wanted; recorded on "
        f"{run.n_workers} workers x {run.nthreads} threads, makespan {recorded}; simulated on "
        f"{n_workers} x {nthreads}{' (--workers/--threads)' if overridden else ''}"
    ]
    if run.makespan:
        share = run.compute / (run.n_workers * run.nthreads * run.makespan)
        hint = " (the run was bound by overheads the simulator does not model)"
        lines.append(
            f"  measured compute {run.compute:.3f} s = {share:.0%} of the recorded worker "
            f"threads' time{hint if share < 0.5 else ''}"
        )
    lines += [f"  note: {note}" for note in run.notes]
    return "\n".join(lines)


def add_parser(subparsers: Any, name: str) -> None:
    parser = subparsers.add_parser(
        name,
        help="run scheduling policies on a simulated cluster",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--graph", action="append", help="graph spec (repeatable)")
    parser.add_argument(
        "--trace",
        action="append",
        metavar="FILE",
        help="replay a run recorded with `dsched scheduler --trace FILE` (repeatable)",
    )
    parser.add_argument("--policy", action="append", help="policies, comma-separated (default all)")
    parser.add_argument(
        "--workers",
        type=int,
        help=f"workers (default {DEFAULT_WORKERS}; for --trace, as recorded)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        help=f"threads per worker (default {DEFAULT_THREADS}; for --trace, as recorded)",
    )
    parser.add_argument("--bandwidth", type=float, default=100e6, help="bytes/s per worker")
    parser.add_argument("--latency", type=float, default=0.001, help="seconds per message")
    parser.add_argument(
        "--duration",
        type=float,
        help="task duration (s) for the graphs (--trace: only for tasks that never ran)",
    )
    parser.add_argument(
        "--nbytes",
        type=int,
        help="output size (bytes) for the graphs (--trace: only where not recorded)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--gantt", metavar="PREFIX", help="write PREFIX-<graph>-<policy>.png")
    parser.add_argument("--validate", action="store_true", help="check invariants every step")
    parser.set_defaults(func=main)


def main(args: argparse.Namespace) -> None:
    from dsched.policy import POLICIES, PolicyConfig, make_policy
    from dsched.sim.engine import ClusterSpec, simulate
    from dsched.sim.report import gantt, markdown_table

    policies = [p for item in args.policy or [",".join(POLICIES)] for p in item.split(",") if p]
    config = PolicyConfig(bandwidth=args.bandwidth, seed=args.seed)

    def cluster(n_workers: int, nthreads: int, join_times: tuple[float, ...] = ()) -> ClusterSpec:
        return ClusterSpec(
            n_workers=n_workers,
            nthreads=nthreads,
            bandwidth=args.bandwidth,
            latency=args.latency,
            join_times=join_times,
        )

    runs: list[tuple[SimGraph, ClusterSpec]] = []
    recorded: dict[str, float | None] = {}
    for path in args.trace or []:
        run = load_trace(path, duration=args.duration, nbytes=args.nbytes, n_workers=args.workers)
        n_workers = args.workers if args.workers is not None else run.n_workers
        nthreads = args.threads if args.threads is not None else run.nthreads
        # Recorded join times only make sense for the recorded workers.
        join_times = run.join_times if args.workers is None else ()
        overridden = args.workers is not None or args.threads is not None
        print(describe(run, n_workers, nthreads, overridden))
        runs.append((run.graph, cluster(n_workers, nthreads, join_times)))
        recorded[run.graph.name] = run.makespan
    synthetic = cluster(args.workers or DEFAULT_WORKERS, args.threads or DEFAULT_THREADS)
    runs.extend(
        (parse_graph(spec, args.seed, args.duration, args.nbytes), synthetic)
        for spec in args.graph or ([] if args.trace else ["merge:10000"])
    )
    results = []
    for graph, spec_cluster in runs:
        for name in policies:
            result = simulate(
                graph,
                make_policy(name, config),
                spec_cluster,
                policy_name=name,
                validate=args.validate,
            )
            results.append(result)
            if args.gantt:
                safe = graph.name.replace("/", "_").replace(":", "_")
                print("wrote", gantt(result, f"{args.gantt}-{safe}-{name}.png"))
    print(markdown_table(results, recorded))
