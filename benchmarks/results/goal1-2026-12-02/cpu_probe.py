"""Where a workload's CPU goes, per process and per worker thread, on each scheduler.

    .venv/bin/python benchmarks/results/goal1-2026-12-02/cpu_probe.py map-10k \\
        --schedulers dask-inf,dsched --repeats 3 [--traffic]

Each run starts a fresh cluster (2 single-thread `dask worker`s, as `dsched bench`'s
real-2x1), builds the workload untimed, then reads the CPU seconds (utime + stime from
/proc) of the scheduler, of each worker process and of each worker thread (named by
``client.run``: the event loop ``MainThread``, the ``Dask-Default-Threads`` executor
thread, the offload thread ...), and of this client process, before and after the timed
``run()``. With ``--traffic`` the workers also load ``count_traffic.py`` (a preload that
counts the messages, operations and bytes each worker reads and writes) and the deltas of
those counters are reported. Prints one JSON line per run and a summary per scheduler.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import threading
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

from distributed import Client

from dsched.bench.workloads import get_workload, inc
from dsched.testing.cluster import ProcessCluster

TICK = os.sysconf("SC_CLK_TCK")
HERE = Path(__file__).resolve().parent


def cpu(path: str) -> float:
    try:
        fields = Path(path).read_text().rsplit(")", 1)[1].split()
    except FileNotFoundError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / TICK  # utime, stime


def worker_threads() -> dict[str, Any]:
    return {
        "pid": os.getpid(),
        "threads": {t.name: t.native_id for t in threading.enumerate()},
    }


def traffic() -> Any:
    import builtins

    snap = getattr(builtins, "_g1_snapshot", None)
    return snap() if snap is not None else None


def sample(client: Client, scheduler_pid: int) -> dict[str, Any]:
    info = client.run(worker_threads)  # type: ignore[no-untyped-call]
    out: dict[str, Any] = {
        "scheduler": cpu(f"/proc/{scheduler_pid}/stat"),
        "client": time.process_time(),
        "workers": {},
    }
    for address, w in info.items():
        pid = w["pid"]
        threads = {
            name.split("-")[0] if name.startswith("Dask-Default") else name: cpu(
                f"/proc/{pid}/task/{tid}/stat"
            )
            for name, tid in w["threads"].items()
        }
        out["workers"][address] = {"process": cpu(f"/proc/{pid}/stat"), "threads": threads}
    return out


def delta(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    d: dict[str, Any] = {
        "scheduler": round(b["scheduler"] - a["scheduler"], 3),
        "client": round(b["client"] - a["client"], 3),
        "workers": {},
    }
    for w, bw in b["workers"].items():
        aw = a["workers"].get(w, {"process": 0.0, "threads": {}})
        d["workers"][w] = {
            "process": round(bw["process"] - aw["process"], 3),
            "threads": {
                n: round(v - aw["threads"].get(n, 0.0), 3) for n, v in bw["threads"].items()
            },
        }
    return d


def counter_delta(a: Any, b: Any) -> Any:
    if isinstance(b, dict):
        return {
            k: counter_delta((a or {}).get(k, 0) if isinstance(a, dict) else 0, v)
            for k, v in b.items()
        }
    return b - (a or 0)


def run(name: str, kind: str, with_traffic: bool) -> dict[str, Any]:
    if with_traffic:
        os.environ["DASK_DISTRIBUTED__WORKER__PRELOAD"] = json.dumps(
            [str(HERE / "count_traffic.py")]
        )
    else:
        os.environ.pop("DASK_DISTRIBUTED__WORKER__PRELOAD", None)
    with ProcessCluster(scheduler_kind=kind, n_workers=2) as cluster:
        assert cluster.scheduler is not None
        spid = cluster.scheduler.popen.pid
        client = Client(cluster.address, set_as_default=False)  # type: ignore[no-untyped-call]
        try:
            client.submit(inc, 0, pure=False).result()  # type: ignore[no-untyped-call]
            prepared = get_workload(name).prepare(client)
            t0 = client.run(traffic) if with_traffic else None  # type: ignore[no-untyped-call]
            before = sample(client, spid)
            begin = time.perf_counter()
            result = prepared.run()
            makespan = time.perf_counter() - begin
            after = sample(client, spid)
            t1 = client.run(traffic) if with_traffic else None  # type: ignore[no-untyped-call]
            prepared.check(result)
            out = {
                "kind": kind,
                "makespan_s": round(makespan, 3),
                "n_tasks": prepared.n_tasks,
                "load": os.getloadavg()[0],
                "cpu_s": delta(before, after),
            }
            if with_traffic:
                out["traffic"] = {w: counter_delta(t0.get(w), t1[w]) for w in t1}
            return out
        finally:
            client.close()  # type: ignore[no-untyped-call]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("workload")
    parser.add_argument("--schedulers", default="dask-inf,dsched")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--traffic", action="store_true")
    args = parser.parse_args(argv)
    runs: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for _ in range(args.repeats):
        for kind in args.schedulers.split(","):
            r = run(args.workload, kind, args.traffic)
            runs[kind].append(r)
            print(json.dumps(r), flush=True)
    for kind, rs in runs.items():
        n = rs[0]["n_tasks"]
        wcpu = [sum(w["process"] for w in r["cpu_s"]["workers"].values()) for r in rs]
        per_task = statistics.median(wcpu) / n * 1e3
        print(
            f"{kind:9s} makespan med {statistics.median(r['makespan_s'] for r in rs):.2f} s | "
            f"worker CPU (both) med {statistics.median(wcpu):.2f} s = {per_task:.3f} ms/task | "
            f"scheduler {statistics.median(r['cpu_s']['scheduler'] for r in rs):.2f} s | "
            f"client {statistics.median(r['cpu_s']['client'] for r in rs):.2f} s"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
