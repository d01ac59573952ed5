"""Cluster start at scale: many connections at once, and a 1,000-worker start, dsched vs dask.

    .venv/bin/python benchmarks/results/scale/scale_start.py accept --connections 1500 \\
        --repeats 3 --schedulers dask,dsched
    .venv/bin/python benchmarks/results/scale/scale_start.py workers --workers 1000 \\
        --processes 4 --repeats 2 --schedulers dask,dsched

Theory of operation
-------------------
``accept``: a fresh scheduler per run (``dsched.testing.cluster.ProcessCluster`` with no
workers; schedulers interleaved per repeat). This process then opens ``--connections`` raw
non-blocking TCP sockets to it at once (``connect_ex`` on each, no Python per-connection work
in between beyond the syscall) and waits with one ``selectors`` loop for two events per
socket: *connected* (writable: the kernel completed the three-way handshake, which it only
does while the listen backlog has room; a dropped SYN is retried by the kernel after 1 s, 3 s,
...) and *greeted* (readable: the scheduler accepted the connection and wrote its Dask
handshake, which both schedulers do on accept). It reports the time until the last socket
was connected and the last one greeted, and how many were greeted after 0.9 s (a retried
SYN). The sockets are then closed; the scheduler sees connections that never handshake.

``workers``: a fresh scheduler, then ``--workers`` simulated workers (``dsched zero-worker``)
in ``--processes`` processes started together; measured from the start of the worker
processes until a Client sees all of them registered (``Client.wait_for_workers``). The
client connects before the workers start, so its own connect is not part of the figure.

Results are appended as JSON lines to ``--out`` (one record per run) and summarised on stdout.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import selectors
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from dsched.comm import parse_address
from dsched.testing.cluster import ProcessCluster

HERE = Path(__file__).resolve().parent


def _load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def accept_once(address: str, connections: int, timeout: float) -> dict[str, Any]:
    host, port = parse_address(address)
    selector = selectors.DefaultSelector()
    sockets: list[socket.socket] = []
    connected_at: dict[int, float] = {}
    greeted_at: dict[int, float] = {}
    start = time.perf_counter()
    try:
        for _ in range(connections):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setblocking(False)
            code = sock.connect_ex((host, port))
            if code not in (0, errno.EINPROGRESS):
                raise OSError(code, os.strerror(code))
            sockets.append(sock)
            selector.register(sock, selectors.EVENT_WRITE | selectors.EVENT_READ)
        issued = time.perf_counter() - start
        deadline = start + timeout
        while len(greeted_at) < connections and time.perf_counter() < deadline:
            for key, events in selector.select(timeout=0.5):
                sock = key.fileobj
                assert isinstance(sock, socket.socket)
                now = time.perf_counter() - start
                fd = sock.fileno()
                if events & selectors.EVENT_WRITE and fd not in connected_at:
                    error = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                    if error:
                        raise OSError(error, os.strerror(error))
                    connected_at[fd] = now
                    selector.modify(sock, selectors.EVENT_READ)
                if events & selectors.EVENT_READ:
                    if fd not in connected_at:
                        connected_at[fd] = now
                    if sock.recv(65536):
                        greeted_at[fd] = now
                        selector.unregister(sock)
    finally:
        for sock in sockets:
            sock.close()
        selector.close()
    greeted = sorted(greeted_at.values())
    return {
        "connections": connections,
        "issued_s": issued,
        "connected": len(connected_at),
        "greeted": len(greeted),
        "last_connected_s": max(connected_at.values(), default=None),
        "last_greeted_s": greeted[-1] if greeted else None,
        "median_greeted_s": statistics.median(greeted) if greeted else None,
        "greeted_after_0.9s": sum(1 for t in greeted if t > 0.9),
    }


def _start_scheduler_only(cluster: ProcessCluster) -> None:
    """ProcessCluster.start() without workers (it would wait for at least one)."""
    cluster._workdir = Path(tempfile.mkdtemp(prefix=f"dsched-scale-{cluster.scheduler_kind}-"))
    cluster.address = cluster._start_scheduler(time.monotonic() + cluster.startup_timeout)


def workers_once(cluster: ProcessCluster, workers: int, processes: int) -> dict[str, Any]:
    from distributed import Client

    assert cluster.address is not None
    client = Client(cluster.address, timeout=30, set_as_default=False)  # type: ignore[no-untyped-call]
    try:
        cluster.n_workers = workers
        cluster.zero_processes = processes
        start = time.perf_counter()
        cluster._start_zero_workers(cluster.address)
        client.wait_for_workers(workers, timeout=300)  # type: ignore[no-untyped-call]
        elapsed = time.perf_counter() - start
    finally:
        client.close()  # type: ignore[no-untyped-call]
    return {"workers": workers, "processes": processes, "all_registered_s": elapsed}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mode", choices=["accept", "workers"])
    parser.add_argument("--schedulers", default="dask,dsched")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--connections", type=int, default=1500)
    parser.add_argument("--workers", type=int, default=1000)
    parser.add_argument("--processes", type=int, default=4)
    parser.add_argument("--timeout", type=float, default=60.0)
    parser.add_argument(
        "--backlog",
        type=int,
        help="distributed.comm.socket-backlog for the scheduler (both read it; 100 is "
        "asyncio's default, what dsched listened with before)",
    )
    parser.add_argument("--out", default=str(HERE / "results.jsonl"))
    args = parser.parse_args(argv)
    schedulers = [s for s in args.schedulers.split(",") if s]
    records: list[dict[str, Any]] = []
    for repeat in range(1, args.repeats + 1):
        for kind in schedulers:
            env = (
                {}
                if args.backlog is None
                else {"DASK_DISTRIBUTED__COMM__SOCKET_BACKLOG": str(args.backlog)}
            )
            cluster = ProcessCluster(
                scheduler_kind=kind, n_workers=0, worker_kind="zero", scheduler_env=env
            )
            try:
                _start_scheduler_only(cluster)
                assert cluster.address is not None
                load = _load()
                if args.mode == "accept":
                    result = accept_once(cluster.address, args.connections, args.timeout)
                else:
                    result = workers_once(cluster, args.workers, args.processes)
            finally:
                cluster.close()
            record = {
                "mode": args.mode,
                "scheduler": kind,
                "repeat": repeat,
                "backlog": args.backlog,
                "load_before": load,
                "time": time.time(),
                **result,
            }
            records.append(record)
            print(json.dumps(record), flush=True)
            with open(args.out, "a") as out:
                out.write(json.dumps(record) + "\n")
    key = "last_greeted_s" if args.mode == "accept" else "all_registered_s"
    print(f"\nmedian {key} (command: {' '.join(sys.argv)})")
    for kind in schedulers:
        values = [r[key] for r in records if r["scheduler"] == kind and r[key] is not None]
        if values:
            print(f"  {kind:10s} {statistics.median(values):8.3f} s  (runs: {values})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
