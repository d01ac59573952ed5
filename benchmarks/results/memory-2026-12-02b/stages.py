"""The scheduler's memory through one graph's intake, stage by stage, in one process.

    .venv/bin/python benchmarks/results/memory-2026-12-02b/stages.py tree-14 xarray-25

Theory of operation
-------------------
For each workload a child process builds the ``update-graph`` message as the Client sends
it (``../memory-2026-12-02/breakdown.py``) and writes its frames to a file, so that
building the collection leaves nothing in the measuring process. A second child, with the
collector tuned as the scheduler's, decodes the frames, runs the server's own intake
(``dsched.server.streams._take_in``: materialize, pickle, order, cut into parts) and takes
the parts into a ``Core`` with 8 workers, as the loop would; it prints RSS and its high-water
mark (``VmHWM``) after each stage, and in a third child the same under ``tracemalloc``: the
Python bytes the state holds per task once the graph is in, and at most while zero workers
finish every task (50 a tick).
"""

from __future__ import annotations

import collections
import gc
import pickle
import subprocess
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent


def _rss() -> str:
    fields = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(("VmRSS", "VmHWM")):
            fields[line[:5]] = int(line.split()[1]) // 1024
    return f"RSS {fields['VmRSS']} MB (high-water {fields['VmHWM']} MB)"


def build(name: str, path: str) -> None:
    sys.path.insert(0, str(HERE.parent / "memory-2026-12-02"))
    from breakdown import _collection, update_graph_message
    from distributed import protocol

    # breakdown's message went through our codec; re-encode it as the Client sends it.
    msg = update_graph_message(_collection(name))
    frames = [bytes(f) for f in protocol.dumps(_as_client_sends(msg))]
    Path(path).write_bytes(pickle.dumps(frames))


def _as_client_sends(msg: dict[str, Any]) -> dict[str, Any]:
    from distributed.protocol.serialize import Serialized, ToPickle

    out = dict(msg)
    expr = msg["expr_ser"]
    out["expr_ser"] = Serialized(expr.header, list(expr.frames))
    for field in ("code", "annotations", "span_metadata"):
        out[field] = ToPickle(msg[field].unpickle() if hasattr(msg[field], "unpickle") else {})
    return out


def _core() -> Any:
    from dsched.core import Core
    from dsched.policy import PolicyConfig, make_policy
    from dsched.server.errors import killed_worker
    from dsched.state import events as ev
    from dsched.state.machine import SchedulerState

    state = SchedulerState(killed_worker=killed_worker)
    core = Core(state, make_policy("dask", PolicyConfig()), [])
    for i in range(8):
        core.handle(ev.WorkerConnected(f"tcp://127.0.0.1:{10000 + i}", 1), 0.0)
    core.handle(ev.ClientConnected("client"), 0.0)
    return core


def _intake(path: str) -> tuple[list[Any], int]:
    from dsched.server.collector import GraphFreezer
    from dsched.server.streams import _take_in
    from dsched.wire import codec

    msg = codec.loads(pickle.loads(Path(path).read_bytes()))
    assert isinstance(msg, dict)
    print(f"  message decoded: {_rss()}")
    started = time.process_time()
    _, parts = _take_in(GraphFreezer(), "client", list(msg["keys"]), msg, False)
    n = sum(len(part.tasks) for part in parts)
    print(
        f"  intake done ({time.process_time() - started:.2f} s CPU, {len(parts)} parts): {_rss()}"
    )
    return parts, n


def stages(path: str) -> None:
    from dsched.cli import tune_garbage_collector

    tune_garbage_collector()
    print(f"  start: {_rss()}")
    parts, _ = _intake(path)
    core = _core()
    while parts:
        core.handle(parts.pop(0), 0.0)
        core.flush(0.0)
    print(f"  state built: {_rss()}")


def traced(path: str) -> None:
    from dsched.cli import tune_garbage_collector
    from dsched.core import inbound

    tune_garbage_collector()
    parts, n = _intake(path)
    gc.collect()
    tracemalloc.start()
    core = _core()
    compute: collections.deque[tuple[str, Any, Any]] = collections.deque()

    def settle() -> None:
        for address, messages in core.flush(time.time()).out.to_workers.items():
            compute.extend(
                (address, m["key"], m["run_id"]) for m in messages if m["op"] == "compute-task"
            )

    while parts:
        core.handle(parts.pop(0), 0.0)
        settle()
    taken_in = tracemalloc.get_traced_memory()[0]
    peak = taken_in
    while compute:
        for _ in range(min(50, len(compute))):
            address, key, run_id = compute.popleft()
            now = time.time()
            msg = {
                "op": "task-finished", "status": "OK", "key": key, "run_id": run_id,
                "nbytes": 100, "type": b"int", "typename": "int", "metadata": {},
                "thread": 1, "startstops": ({"action": "compute", "start": now, "stop": now},),
                "stimulus_id": f"task-finished-{now}",
            }  # fmt: skip
            core.handle(inbound.WORKER_DECODERS["task-finished"](address, msg), now)
        settle()
        peak = max(peak, tracemalloc.get_traced_memory()[0])
    print(
        f"  traced: state + policy taken in {taken_in / 1e6:.1f} MB ({taken_in / n:.0f} B a "
        f"task, specs included), at most {peak / 1e6:.1f} MB while running "
        f"(zero workers)"
    )


def main() -> None:
    if len(sys.argv) == 4 and sys.argv[1] in ("build", "stages", "traced"):
        command, name_or_path, path = sys.argv[1:]
        if command == "build":
            build(name_or_path, path)
        elif command == "stages":
            stages(path)
        else:
            traced(path)
        return
    for name in sys.argv[1:]:
        with tempfile.TemporaryDirectory() as tmp:
            path = f"{tmp}/{name}.msg"
            run = [sys.executable, __file__]
            subprocess.run([*run, "build", name, path], check=True)
            print(f"== {name}", flush=True)
            subprocess.run([*run, "stages", name, path], check=True)
            subprocess.run([*run, "traced", name, path], check=True)


if __name__ == "__main__":
    main()
