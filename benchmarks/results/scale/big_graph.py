"""A graph of up to a million tasks through zero workers: loop lag, peak RSS, cost per task.

    .venv/bin/python benchmarks/results/scale/big_graph.py --sizes 10000,100000,1000000 \\
        --schedulers dsched,dask

Theory of operation
-------------------
The graph is ``da.ones((n, 1000), chunks=(1, 1000)).sum()`` with ``n = size // 2`` rows of
one chunk each: ``n`` blockwise tasks plus a tree reduction of about as many, so about
``size`` tasks (the exact count, after optimization, is recorded). The Client sends it as
an expression of a few KB, so the scheduler, not the Client, materializes and orders the
whole graph: exactly the intake a huge graph costs. A fresh scheduler per run with 8
simulated workers (``dsched zero-worker``; every task completes at once), schedulers
interleaved per size.

While the graph runs, a probe in this process sends the ``identity`` RPC to the scheduler
every 20 ms on its own connection and records each reply's latency: the longest is the
longest time the scheduler's event loop did not answer (heartbeats and other clients wait
that long). Reported per run: makespan (compute + gather of the one result), ms per task,
the longest and 99th-percentile probe latency, and the scheduler's peak RSS (VmHWM).
The scheduler also runs the ``loop_watch.py`` preload, which reports from inside the
scheduler the longest stall of its loop and the most CPU its loop thread spent in one
stall: on a loaded machine the wall figures include waiting for a core, the CPU figure
does not; the five longest stalls are kept with when they started (seconds after the
graph was sent), to tell intake, parts, running and release apart.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import sys
import threading
import time
from pathlib import Path
from typing import Any

from distributed import Client

from dsched.bench.workloads import _count_tasks
from dsched.comm import connect
from dsched.testing.cluster import ProcessCluster

HERE = Path(__file__).resolve().parent
PROBE_INTERVAL_S = 0.02


class LoopProbe:
    """``identity`` RPCs to the scheduler every 20 ms, from a thread with its own loop."""

    def __init__(self, address: str) -> None:
        self.address = address
        self.latencies: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._run()), daemon=True)

    def __enter__(self) -> LoopProbe:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=120)

    async def _run(self) -> None:
        comm = await connect(self.address)
        try:
            while not self._stop.is_set():
                start = time.perf_counter()
                comm.write({"op": "identity", "reply": True})
                await comm.read()
                self.latencies.append(time.perf_counter() - start)
                await asyncio.sleep(PROBE_INTERVAL_S)
        finally:
            await comm.close()


def _peak_rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _loop_stalls(log: str, started: float) -> tuple[float, float, list[list[float]]]:
    """The longest stall ``loop_watch`` saw (wall s), the most CPU in one (s), and the five
    longest as [seconds since the graph was sent, wall, CPU]."""
    stalls = [
        (float(wall), float(cpu), float(at))
        for wall, cpu, at in re.findall(r"LOOP-STALL wall=([\d.]+) cpu=([\d.]+) at=([\d.]+)", log)
    ]
    longest = sorted(stalls, reverse=True)[:5]
    return (
        max((wall for wall, _, _ in stalls), default=0.0),
        max((cpu for _, cpu, _ in stalls), default=0.0),
        [[round(at - wall - started, 2), wall, cpu] for wall, cpu, at in longest],
    )


def run_one(kind: str, size: int, timeout: float) -> dict[str, Any]:
    import dask.array as da

    rows = max(1, size // 2)
    cluster = ProcessCluster(
        scheduler_kind=kind,
        n_workers=8,
        worker_kind="zero",
        startup_timeout=120,
        scheduler_args=["--preload", str(HERE / "loop_watch.py")],
    )
    with cluster:
        assert cluster.address is not None and cluster.scheduler is not None
        client = Client(cluster.address, set_as_default=False)  # type: ignore[no-untyped-call]
        try:
            graph = da.ones((rows, 1000), chunks=(1, 1000)).sum()  # type: ignore[no-untyped-call]
            with LoopProbe(cluster.address) as probe:
                start = time.perf_counter()
                sent = time.time()
                future = client.compute(graph)  # type: ignore[no-untyped-call]
                future.result(timeout=timeout)
                makespan = time.perf_counter() - start
        finally:
            client.close()  # type: ignore[no-untyped-call]
        rss = _peak_rss_mb(cluster.scheduler.popen.pid)
        log = cluster.scheduler.log_path.read_text()
        stall_wall, stall_cpu, longest = _loop_stalls(log, sent)
    lat = sorted(probe.latencies)
    n_tasks = _count_tasks(graph)
    return {
        "scheduler": kind,
        "size": size,
        "tasks": n_tasks,
        "makespan_s": makespan,
        "ms_per_task": 1e3 * makespan / n_tasks,
        "probe_max_s": lat[-1] if lat else None,
        "probe_p99_s": lat[int(0.99 * (len(lat) - 1))] if lat else None,
        "probes": len(lat),
        "peak_rss_mb": rss,
        "loop_stall_max_s": stall_wall,
        "loop_stall_max_cpu_s": stall_cpu,
        "loop_stalls_longest": longest,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="10000,100000,1000000")
    parser.add_argument("--schedulers", default="dsched,dask")
    parser.add_argument("--timeout", type=float, default=1800)
    parser.add_argument("--out", default=str(HERE / "big_graph.jsonl"))
    args = parser.parse_args(argv)
    for size in (int(s) for s in args.sizes.split(",")):
        for kind in args.schedulers.split(","):
            record = {**run_one(kind, size, args.timeout), "time": time.time()}
            print(json.dumps(record), flush=True)
            with open(args.out, "a") as out:
                out.write(json.dumps(record) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
