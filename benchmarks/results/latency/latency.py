"""Interactive latency: one ``submit(...).result()`` and small collection computes, dsched vs dask.

    .venv/bin/python benchmarks/results/latency/latency.py --rounds 10 --per-round 30
    .venv/bin/python benchmarks/results/latency/latency.py --breakdown --per-round 200

Theory of operation
-------------------
Both clusters (``dask scheduler`` and ``dsched scheduler``, 2 single-thread ``dask worker``s
each, all on 127.0.0.1) run side by side for the whole benchmark; rounds alternate between
them (dask, dsched, dask, ...), so drift in machine load falls on both. In a round, one
Client times ``--per-round`` calls of each case:

* ``submit-loop``: ``client.submit(inc, i).result()`` back to back, what a loop in a notebook
  does. The Client batches its scheduler stream every 10 ms: a send within 10 ms of the last
  one waits, and each iteration sends twice (the release of the last future, then the next
  ``update-graph``, which go out together), so an iteration cannot take less than ~10 ms.
* ``submit-idle``: the same call after 25 ms of idleness (untimed), so the Client's stream
  sends at once: the true round trip (client -> scheduler -> worker -> scheduler -> client).
* ``array-sum``: ``da.random.random((1000, 1000), chunks=(100, 1000)).sum().compute()``
  (10 partitions, graph built each time as a user would), after 25 ms idle.
* ``df-groupby``: a 10-partition dataframe of 20,000 rows, ``groupby("k").x.mean()``,
  after 25 ms idle.

``--breakdown`` instead runs one dsched cluster with ``--trace`` and splits each
``submit-idle`` call into its parts with the trace (all on one clock): client -> scheduler
(update-graph arrival), graph intake (thread), intake -> compute-task written, worker
(compute-task written -> task-finished received), task-finished -> key-in-memory written,
key-in-memory written -> the Client sees the key in memory (``wait`` returns), and
``result()``: the gather RPC, which the scheduler serves by fetching the value from the
worker (``get_data``). dsched's share: intake, the two in-scheduler steps, and part of the
gather.

Medians (and 10th-90th percentiles) per case and scheduler are printed and written as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from distributed import Client

from dsched.bench.workloads import inc
from dsched.testing.cluster import ProcessCluster

HERE = Path(__file__).resolve().parent
IDLE_S = 0.025


def _array_sum(client: Client) -> Any:
    import dask.array as da

    x = da.random.random((1000, 1000), chunks=(100, 1000))  # type: ignore[no-untyped-call]
    return client.compute(x.sum()).result()  # type: ignore[no-untyped-call]


_FRAME: Any = None


def _df_groupby(client: Client) -> Any:
    global _FRAME
    import dask.dataframe as dd
    import numpy as np
    import pandas as pd  # type: ignore[import-untyped]  # no pandas-stubs installed

    if _FRAME is None:
        rng = np.random.default_rng(0)
        pdf = pd.DataFrame({"k": rng.integers(0, 20, 20_000), "x": rng.random(20_000)})
        _FRAME = dd.from_pandas(pdf, npartitions=10)
    return client.compute(_FRAME.groupby("k").x.mean()).result()  # type: ignore[no-untyped-call]


def _cases(client: Client) -> dict[str, Callable[[int], Any]]:
    return {
        "submit-idle": lambda i: client.submit(inc, i, pure=False).result(),  # type: ignore[no-untyped-call]
        "array-sum": lambda i: _array_sum(client),
        "df-groupby": lambda i: _df_groupby(client),
    }


def one_round(client: Client, per_round: int) -> dict[str, list[float]]:
    times: dict[str, list[float]] = {"submit-loop": []}
    start = time.perf_counter()
    for i in range(per_round):
        client.submit(inc, i, pure=False).result()  # type: ignore[no-untyped-call]
        now = time.perf_counter()
        times["submit-loop"].append(now - start)
        start = now
    for name, call in _cases(client).items():
        times[name] = []
        for i in range(per_round):
            time.sleep(IDLE_S)
            start = time.perf_counter()
            call(i)
            times[name].append(time.perf_counter() - start)
    return times


def _summary(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)
    return {
        "median_ms": 1e3 * statistics.median(ordered),
        "p10_ms": 1e3 * ordered[len(ordered) // 10],
        "p90_ms": 1e3 * ordered[(9 * len(ordered)) // 10],
        "n": len(ordered),
    }


def compare(schedulers: list[str], rounds: int, per_round: int) -> dict[str, Any]:
    clusters = {kind: ProcessCluster(scheduler_kind=kind, n_workers=2) for kind in schedulers}
    clients: dict[str, Client] = {}
    samples: dict[str, dict[str, list[float]]] = {kind: {} for kind in schedulers}
    loads = []
    try:
        for kind, cluster in clusters.items():
            address = cluster.start()
            clients[kind] = Client(address, set_as_default=False)  # type: ignore[no-untyped-call]
            one_round(clients[kind], 3)  # warm-up: imports, worker code paths
        for _ in range(rounds):
            loads.append(os.getloadavg()[0])
            for kind in schedulers:
                for name, values in one_round(clients[kind], per_round).items():
                    samples[kind].setdefault(name, []).extend(values)
    finally:
        for client in clients.values():
            client.close()  # type: ignore[no-untyped-call]
        for cluster in clusters.values():
            cluster.close()
    summary = {
        kind: {name: _summary(values) for name, values in cases.items()}
        for kind, cases in samples.items()
    }
    return {"summary": summary, "load_1min": loads}


def breakdown(per_round: int) -> dict[str, Any]:
    from dsched.tools.trace.read import read_trace

    trace_file = Path(tempfile.mkdtemp(prefix="dsched-latency-")) / "trace.tsv"
    cluster = ProcessCluster(
        scheduler_kind="dsched", n_workers=2, scheduler_args=["--trace", str(trace_file)]
    )
    from distributed.client import _wait

    # key, submitted, the Client saw it in memory, result() returned (epoch seconds)
    calls: list[tuple[str, float, float, float]] = []
    cluster.start()
    try:
        client = Client(cluster.address, set_as_default=False)  # type: ignore[no-untyped-call]
        try:
            one_round(client, 3)
            for i in range(per_round):
                time.sleep(IDLE_S)
                submitted = time.time()
                future = client.submit(inc, i, pure=False)  # type: ignore[no-untyped-call]
                client.sync(_wait, [future])  # type: ignore[no-untyped-call]
                ready = time.time()
                future.result()
                calls.append((str(future.key), submitted, ready, time.time()))
        finally:
            client.close()  # type: ignore[no-untyped-call]
    finally:
        cluster.close()  # the scheduler flushes its trace on close
    trace = read_trace(trace_file)
    by_key = {t.key: t for t in trace.tasks.values()}
    parts: dict[str, list[float]] = {}
    for key, submitted, ready, returned in calls:
        task = by_key.get(json.dumps(key)) or by_key.get(key)
        if task is None or None in (task.sent, task.finished, task.notified):
            continue
        arrived, taken_in = trace.graphs[task.graph][:2]
        assert task.sent is not None and task.finished is not None and task.notified is not None
        t0 = trace.t0
        split = {
            "client->scheduler": t0 + arrived - submitted,
            "graph intake (thread)": taken_in - arrived,
            "intake->compute-task written": task.sent - taken_in,
            "worker (written->task-finished read)": task.finished - task.sent,
            "task-finished->key-in-memory written": task.notified - task.finished,
            "key-in-memory written->client sees it": ready - (t0 + task.notified),
            "result(): gather through the scheduler": returned - ready,
            "total": returned - submitted,
        }
        for name, value in split.items():
            parts.setdefault(name, []).append(value)
    return {"breakdown": {name: _summary(values) for name, values in parts.items()}}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--schedulers", default="dask,dsched")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--per-round", type=int, default=30)
    parser.add_argument("--breakdown", action="store_true")
    parser.add_argument("--out", help="JSON file (default: next to this script)")
    args = parser.parse_args(argv)
    if args.breakdown:
        result = breakdown(args.per_round)
        default_out = HERE / "breakdown.json"
    else:
        result = compare(args.schedulers.split(","), args.rounds, args.per_round)
        default_out = HERE / "latency.json"
    result["command"] = " ".join(sys.argv)
    result["time"] = time.time()
    Path(args.out or default_out).write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
