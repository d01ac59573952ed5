"""Where the scheduler's bytes per task go: graph intake (peak and retained) and state.

    .venv/bin/python benchmarks/results/memory-2026-12-02/breakdown.py tree-14 xarray-25

Theory of operation
-------------------
Builds each workload's ``update-graph`` message as ``distributed.Client.compute`` does (the
expression, serialized and sent through the codec), then, in this one process and under
``tracemalloc``:

1. ``intake_update_graph``: the peak of traced memory during the call and what its result
   retains, both per task, with the allocation sites that hold the most at the end;
2. the same graph materialized only (``_materialize``): what the GraphNodes themselves
   retain once the expression is dropped (the cost of keeping them instead of pickles);
3. the result taken into a ``Core`` (``GraphReceived``, one flush, 8 workers connected
   and none answering): what the state machine and the policy add per task;
4. without tracemalloc: the CPU a task of pickling its GraphNode (what dispatch would pay on
   the event loop if GraphNodes were kept) and of encoding its compute-task.

tracemalloc counts Python allocations only (not the interpreter or imported libraries),
so the figures are the per-task part of RSS. Times under tracemalloc are not meaningful.
"""

from __future__ import annotations

import gc
import sys
import time
import tracemalloc
from collections.abc import Callable
from functools import partial
from typing import Any

from dask._expr import FinalizeCompute
from dask.base import collections_to_expr
from dask.core import flatten
from distributed import protocol
from distributed.protocol.serialize import Serialized, ToPickle, serialize, to_serialize

from dsched.bench import workloads
from dsched.core import Core
from dsched.graph import intake as intake_module
from dsched.policy import PolicyConfig, make_policy
from dsched.server.errors import killed_worker
from dsched.state import events as ev
from dsched.state.machine import SchedulerState
from dsched.wire import codec


def _collection(name: str) -> Any:
    kind, _, arg = name.partition("-")
    if kind == "tree":
        import operator

        from dask.delayed import delayed

        level = [delayed(workloads.times_ten)(i) for i in range(2 ** int(arg))]
        while len(level) > 1:
            pairs = zip(level[::2], level[1::2], strict=True)
            level = [delayed(operator.add)(a, b) for a, b in pairs]
        return level[0]
    if kind == "xarray":
        return workloads._xarray_graph(int(arg))
    raise SystemExit(f"unknown workload {name}")


def update_graph_message(collection: Any) -> dict[str, Any]:
    """``Client.compute``'s message, after a trip through the wire."""
    expr = FinalizeCompute(collections_to_expr([collection], True)).optimize()
    msg = {
        "op": "update-graph",
        "expr_ser": Serialized(*serialize(to_serialize(expr), on_error="raise")),
        "keys": set(flatten(expr.__dask_keys__())),
        "internal_priority": None,
        "submitting_task": None,
        "fifo_timeout": "60s",
        "actors": None,
        "code": ToPickle(()),
        "annotations": ToPickle({}),
        "span_metadata": ToPickle({"collections": []}),
    }
    decoded = codec.loads(protocol.dumps(msg))
    assert isinstance(decoded, dict)
    return decoded


def traced(step: Callable[[], Any]) -> tuple[Any, int, int, tracemalloc.Snapshot]:
    """(result, peak bytes, retained bytes, snapshot at the end), relative to the start."""
    gc.collect()
    tracemalloc.reset_peak()
    base = tracemalloc.get_traced_memory()[0]
    result = step()
    gc.collect()
    current, peak = tracemalloc.get_traced_memory()
    return result, peak - base, current - base, tracemalloc.take_snapshot()


def top_sites(snapshot: tracemalloc.Snapshot, before: tracemalloc.Snapshot, n_tasks: int) -> None:
    for stat in snapshot.compare_to(before, "lineno")[:12]:
        if stat.size_diff <= 0:
            continue
        frame = stat.traceback[0]
        where = f"{frame.filename.split('site-packages/')[-1].split('src/')[-1]}:{frame.lineno}"
        print(f"      {stat.size_diff / n_tasks:8.0f} B/task  {where}")


def take_in(intake: Any, keys: list[Any]) -> Core:
    """The intake result through GraphReceived and one flush, 8 workers connected."""
    policy = make_policy("dask", PolicyConfig())
    core = Core(SchedulerState(killed_worker=killed_worker), policy, [])
    for i in range(8):
        core.handle(ev.WorkerConnected(f"tcp://127.0.0.1:{10000 + i}", 1), 0.0)
    core.handle(ev.ClientConnected("client"), 0.0)
    tasks = list(intake.tasks.values())
    core.handle(ev.GraphReceived("client", tasks, keys, intake.order), 0.0)
    core.flush(0.0)
    return core


def materialize(msg: dict[str, Any]) -> Any:
    expression = intake_module._deserialize_expression(msg["expr_ser"])
    dsk, _ = intake_module._materialize(expression, set(msg["keys"]))
    return dsk


def dispatch_costs(msg: dict[str, Any], n: int) -> None:
    """CPU a task of pickling its GraphNode (what dispatch would pay on the event loop if
    GraphNodes were kept) and of encoding a compute-task that carries the pickle."""
    dsk = materialize(msg)
    pickler = intake_module._RunSpecPickler()
    started = time.process_time()
    pickles = [pickler(node) for node in dsk.values()]
    pickled = time.process_time()
    for run_spec in pickles:
        codec.dumps([{"op": "compute-task", "key": "k", "run_spec": run_spec}])
    encoded = time.process_time()
    print(
        f"  CPU: pickling a GraphNode {(pickled - started) / n * 1e6:.1f} us/task, "
        f"encoding its compute-task {(encoded - pickled) / n * 1e6:.1f} us/task"
    )


def measure(name: str) -> None:
    msg = update_graph_message(_collection(name))
    keys = list(msg["keys"])
    print(f"== {name}")

    before = tracemalloc.take_snapshot()
    intake, peak, retained, snap = traced(lambda: intake_module.intake_update_graph(msg))
    n = len(intake.tasks)
    print(f"  {n} tasks")
    print(f"  intake (TaskSpecs, pickled): peak {peak / n:.0f} B/task, retained {retained / n:.0f}")
    top_sites(snap, before, n)
    pickles = sum(len(s.run_spec.pickle_bytes) for s in intake.tasks.values())
    print(f"    of which pickle bytes {pickles / n:.0f} B/task (payload only)")

    before = tracemalloc.take_snapshot()
    core, peak, retained, snap = traced(partial(take_in, intake, keys))
    print(f"  state+policy on top: peak {peak / n:.0f} B/task, retained {retained / n:.0f}")
    top_sites(snap, before, n)
    del core, intake
    gc.collect()

    before = tracemalloc.take_snapshot()
    dsk, peak, retained, snap = traced(lambda: materialize(msg))
    print(f"  GraphNodes only: peak {peak / n:.0f} B/task, retained {retained / n:.0f}")
    top_sites(snap, before, n)
    del dsk
    tracemalloc.stop()
    dispatch_costs(msg, n)
    tracemalloc.start()


def main() -> None:
    tracemalloc.start()
    for name in sys.argv[1:]:
        measure(name)


if __name__ == "__main__":
    main()
