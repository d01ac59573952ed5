"""CPU per task of the state machine + policy alone: no sockets, no codec, no event loop.

    python benchmarks/state_hotpath.py tree 14            # 2**15 - 1 tasks, 8 workers
    python benchmarks/state_hotpath.py merge 25000 --policy locality --workers 64
    python benchmarks/state_hotpath.py tree 14 --profile  # cProfile's top entries
    python benchmarks/state_hotpath.py tree 14 --observers 1  # + one no-op extension

Plays zero workers the way the reactor sees them: every ``compute-task`` is answered with a
``task-finished``, in batches of ``--batch`` messages per tick, and the policy runs once per
tick on the tick's events (the reactor's dirty flag). Reports process CPU microseconds per
task for taking the graph in and for running it, so it can be used on a loaded machine.
"""

from __future__ import annotations

import argparse
import collections
import cProfile
import pstats
import time
from typing import Any

from dsched.cli import tune_garbage_collector
from dsched.core import Core
from dsched.ext.protocol import Extension
from dsched.policy import POLICIES, PolicyConfig, make_policy
from dsched.server.errors import killed_worker
from dsched.sim import graphs
from dsched.state import events as ev
from dsched.state.machine import SchedulerState


class _IgnoresEverything(Extension):
    """An extension that declares observations and does nothing with them: what the core
    pays to fan out to one (``--observers``)."""

    observes = frozenset({ev.TaskFinished, ev.WorkerConnected})
    observes_transitions = True

    def __init__(self, index: int) -> None:
        self.name = f"ignores-everything-{index}"


def run(graph: graphs.SimGraph, args: argparse.Namespace) -> None:
    state = SchedulerState(killed_worker=killed_worker)
    observers = [_IgnoresEverything(i) for i in range(args.observers)]
    core = Core(state, make_policy(args.policy, PolicyConfig()), observers)
    compute_tasks: collections.deque[tuple[str, Any, Any]] = collections.deque()
    clock = [0.0]

    def settle() -> None:
        """End the tick as the reactor does: one flush, then 'send' the compute-tasks."""
        out = core.flush(clock[0]).out
        for address, messages in out.to_workers.items():
            compute_tasks.extend(
                (address, m["key"], m["run_id"]) for m in messages if m["op"] == "compute-task"
            )

    for i in range(args.workers):
        core.handle(ev.WorkerConnected(f"tcp://127.0.0.1:{10000 + i}", 1), 0.0)
    core.handle(ev.ClientConnected("client"), 0.0)
    settle()
    tasks = [ev.NewTask(t.key, t.dependencies, b"run-spec", {}) for t in graph.tasks.values()]
    outputs = graph.keys

    started = time.process_time()
    core.handle(ev.GraphReceived("client", tasks, outputs, graph.order), 0.0)
    settle()
    taken_in = time.process_time()
    finished = 0
    while compute_tasks:
        clock[0] += 0.001
        for _ in range(min(args.batch, len(compute_tasks))):
            address, key, run_id = compute_tasks.popleft()
            # Workers send their own stimulus id with every message (the decoder keeps it).
            finished_msg = ev.TaskFinished(
                address, key, run_id, 8, type=b"int", stimulus_id=f"task-finished-{clock[0]}"
            )
            core.handle(finished_msg, clock[0])
            finished += 1
        settle()
    done = time.process_time()
    assert finished == len(graph), (finished, len(graph))
    # Only the results the client holds are in memory; every intermediate was released
    # (and is forgotten when the client lets go of the results).
    in_memory = {key for key, ts in state.tasks.items() if ts.state == "memory"}
    assert in_memory == set(outputs), len(in_memory)
    per_task = 1e6 / len(graph)
    print(
        f"{len(graph)} tasks, {args.workers} workers, policy {args.policy}: "
        f"graph intake {(taken_in - started) * per_task:.1f} us/task, "
        f"run {(done - taken_in) * per_task:.1f} us/task"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("shape", choices=["tree", "merge"])
    parser.add_argument("size", type=int, help="K for tree (2**K leaves), N for merge")
    parser.add_argument("--policy", default="dask", choices=sorted(POLICIES))
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--batch", type=int, default=50, help="task-finished per tick")
    parser.add_argument(
        "--observers",
        type=int,
        default=0,
        help="extensions observing every transition and task-finished (the fan-out cost)",
    )
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args()
    # The simulator's shapes of the tree-K and merge-N benchmarks (durations unused here).
    graph = graphs.tree(args.size) if args.shape == "tree" else graphs.merge(args.size)
    tune_garbage_collector()  # as the scheduler process does
    if args.profile:
        profiler = cProfile.Profile()
        profiler.runcall(run, graph, args)
        pstats.Stats(profiler).sort_stats("tottime").print_stats(30)
    else:
        run(graph, args)


if __name__ == "__main__":
    main()
