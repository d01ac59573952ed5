"""``dsched simulate``: run policies on a simulated cluster and compare them in one table.

    dsched simulate --graph merge:10000 --graph tree:12 --policy dask,locality --workers 2
    dsched simulate --graph mymodule:make_collection --gantt /tmp/gantt

A graph is ``NAME[:ARG,ARG...]`` for a synthetic shape (merge:N, map:N, tree:K,
chains:N,LENGTH, wide:N) or ``module:function`` returning a dask collection.
"""

from __future__ import annotations

import argparse
import importlib
from typing import Any

from dsched.sim.graphs import SYNTHETIC, SimGraph, graph_from_collection


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


def add_parser(subparsers: Any, name: str) -> None:
    parser = subparsers.add_parser(
        name,
        help="run scheduling policies on a simulated cluster",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--graph", action="append", help="graph spec (repeatable)")
    parser.add_argument("--policy", action="append", help="policies, comma-separated (default all)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="threads per worker")
    parser.add_argument("--bandwidth", type=float, default=100e6, help="bytes/s per worker")
    parser.add_argument("--latency", type=float, default=0.001, help="seconds per message")
    parser.add_argument("--duration", type=float, help="task duration (s) for the graphs")
    parser.add_argument("--nbytes", type=int, help="output size (bytes) for the graphs")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--gantt", metavar="PREFIX", help="write PREFIX-<graph>-<policy>.png")
    parser.add_argument("--validate", action="store_true", help="check invariants every step")
    parser.set_defaults(func=main)


def main(args: argparse.Namespace) -> None:
    from dsched.policy import POLICIES, PolicyConfig, make_policy
    from dsched.sim.engine import ClusterSpec, simulate
    from dsched.sim.report import gantt, markdown_table

    policies = [p for item in args.policy or [",".join(POLICIES)] for p in item.split(",") if p]
    cluster = ClusterSpec(
        n_workers=args.workers,
        nthreads=args.threads,
        bandwidth=args.bandwidth,
        latency=args.latency,
    )
    config = PolicyConfig(bandwidth=args.bandwidth, seed=args.seed)
    results = []
    for spec in args.graph or ["merge:10000"]:
        graph = parse_graph(spec, args.seed, args.duration, args.nbytes)
        for name in policies:
            result = simulate(
                graph, make_policy(name, config), cluster, policy_name=name, validate=args.validate
            )
            results.append(result)
            if args.gantt:
                safe = graph.name.replace("/", "_").replace(":", "_")
                print("wrote", gantt(result, f"{args.gantt}-{safe}-{name}.png"))
    print(markdown_table(results))
