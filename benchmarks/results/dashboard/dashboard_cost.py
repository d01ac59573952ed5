"""What open dashboard pages cost the scheduler: merge-25k in zero mode, with 0 and with 3
`/status` pages open in headless Chromium, for dsched and for `dask scheduler` (Bokeh).

    .venv/bin/python benchmarks/results/dashboard/dashboard_cost.py --repeats 5 \\
        --out benchmarks/results/dashboard
    .venv/bin/python benchmarks/results/dashboard/dashboard_cost.py --micro   # snapshot cost

One run: a fresh cluster (scheduler with its dashboard on + 8 simulated zero workers in one
process, as ``dsched bench``'s zero-8), then, for "3 pages", one headless Chromium with
three tabs on ``/status`` (the first given on the command line, two more opened through the
DevTools endpoint of ``--remote-debugging-port=0``; real time, so each page polls or holds
its websocket as a viewer's would), ``PAGE_WARMUP_S`` for the pages to load and start
polling, a warm-up task, the graph built untimed, then the timed ``compute``: makespan
and the scheduler process's CPU seconds (user + system) over it. Runs are interleaved
(for each repeat: every condition of dsched, then of dask), so drift in machine load
spreads over all of them. A control condition opens the same browser with three tabs on
``/health`` (loaded once, polling nothing): on a 2-core machine the browser competes with
the scheduler for the CPU, which by itself costs the scheduler CPU (smaller batches per
tick); the dashboard's own cost is the difference between the ``/status`` and ``/health``
conditions. Chromium is killed by its process group after each run.

``--micro`` times ``build_snapshot`` + JSON encoding in-process for 10 to 1,000 workers
and 100k tasks over 200 prefixes (what one snapshot a second costs, whatever the viewers).

``--core`` isolates the per-task part, without processes, sockets or a browser: the pure
``Core`` (default policy, 8 workers) runs merge-25k as ``benchmarks/state_hotpath.py``
does (50 results per tick, each message with ``startstops`` and ``thread`` as a worker's),
with the dashboard observer stopped (no page) and started (a page open: per-prefix counts
and task-stream results), interleaved, ``--repeats`` times; the process CPU of the run
(graph intake to last result) per condition, and the paired difference.

Writes ``results.json`` (every run) and ``results.md`` (medians, min-max) to ``--out``.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

from dsched.testing.browser import chromium_command

HERE = Path(__file__).resolve().parent
WORKLOAD = "merge-25k"
ZERO_WORKERS = 8
PAGES = 3
PAGE_WARMUP_S = 6.0
# (scheduler, tabs, page): no browser; a browser with tabs on /health (which loads once and
# polls nothing: what Chromium next to the scheduler costs by itself on this machine);
# a browser with tabs on the dashboard's /status.
CONDITIONS = [
    (scheduler, tabs, page)
    for scheduler in ("dsched", "dask")
    for tabs, page in ((0, ""), (PAGES, "/health"), (PAGES, "/status"))
]


def open_pages(url: str, n: int, profile: str) -> subprocess.Popen[bytes]:
    """One headless Chromium showing ``url`` in ``n`` tabs; returns the browser process."""
    browser = subprocess.Popen(
        chromium_command(
            "chromium", profile, "--remote-debugging-port=0", "--window-size=1400,1000", url
        ),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    assert browser.stderr is not None
    deadline = time.monotonic() + 30
    port = None
    while port is None and time.monotonic() < deadline:
        line = browser.stderr.readline().decode(errors="replace")
        match = re.search(r"DevTools listening on ws://[^:]+:(\d+)/", line)
        if match:
            port = int(match.group(1))
        elif not line and browser.poll() is not None:
            raise RuntimeError("chromium exited before listening")
    if port is None:
        raise RuntimeError("chromium did not report its DevTools port")
    # Keep draining stderr so the browser never blocks on a full pipe.
    threading.Thread(target=browser.stderr.read, daemon=True).start()
    for _ in range(n - 1):
        request = urllib.request.Request(f"http://127.0.0.1:{port}/json/new?{url}", method="PUT")
        with urllib.request.urlopen(request, timeout=10) as reply:
            reply.read()
    return browser


def close_browser(browser: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(browser.pid, signal.SIGKILL)
    browser.wait(timeout=20)


def run_one(scheduler: str, pages: int, page: str, repeat: int) -> dict[str, Any]:
    from distributed import Client

    from dsched.bench.runner import _cpu_seconds
    from dsched.bench.workloads import get_workload, inc
    from dsched.testing.cluster import ProcessCluster

    record: dict[str, Any] = {
        "scheduler": scheduler,
        "pages": pages,
        "page": page,
        "repeat": repeat,
        "workload": WORKLOAD,
        "setup": f"zero-{ZERO_WORKERS}",
        "status": "error",
        "started_at": time.time(),
    }
    # ProcessCluster passes --no-dashboard; for both schedulers the last flag wins.
    cluster = ProcessCluster(
        scheduler_kind=scheduler,
        n_workers=ZERO_WORKERS,
        worker_kind="zero",
        scheduler_args=("--dashboard",),
    )
    browser = None
    try:
        cluster.start()
        assert cluster.scheduler is not None and cluster.address is not None
        pid = cluster.scheduler.popen.pid
        with Client(cluster.address, timeout=30, set_as_default=False) as client:
            port = client.scheduler_info()["services"]["dashboard"]
            with tempfile.TemporaryDirectory(prefix="dsched-bench-chromium-") as profile:
                if pages:
                    browser = open_pages(f"http://127.0.0.1:{port}{page}", pages, profile)
                    time.sleep(PAGE_WARMUP_S)  # the pages load and start polling
                client.submit(inc, 0, pure=False).result(timeout=30)
                prepared = get_workload(WORKLOAD).prepare(client)
                cpu_before = _cpu_seconds(pid)
                start = time.perf_counter()
                prepared.run()
                record["makespan_s"] = time.perf_counter() - start
                cpu_after = _cpu_seconds(pid)
                record["tasks"] = prepared.n_tasks
                if cpu_before is not None and cpu_after is not None:
                    record["scheduler_cpu_s"] = cpu_after - cpu_before
                record["status"] = "ok"
                if browser is not None:
                    close_browser(browser)
                    browser = None
    except Exception as error:
        record["error"] = f"{type(error).__name__}: {error}"[:2000]
    finally:
        if browser is not None:
            close_browser(browser)
        cluster.close()
    return record


def summarize(records: list[dict[str, Any]]) -> str:
    lines = [
        f"# Dashboard cost: {WORKLOAD}, zero-{ZERO_WORKERS}, 0 vs {PAGES} `/status` pages open",
        "",
        "| scheduler | tabs | runs | scheduler CPU s, median (min-max) | makespan s, median "
        "(min-max) | CPU vs no browser: of the medians; paired median (repeats) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    baseline: dict[str, float] = {}
    # The no-browser CPU of each repeat, for the paired ratios.
    alone = {
        (r["scheduler"], r["repeat"]): r["scheduler_cpu_s"]
        for r in records
        if r["pages"] == 0 and r["status"] == "ok" and "scheduler_cpu_s" in r
    }
    for scheduler, pages, page in CONDITIONS:
        if not any(r["scheduler"] == scheduler for r in records):
            continue
        ok = [
            r
            for r in records
            if (r["scheduler"], r["pages"], r.get("page", "/status"), r["status"])
            == (scheduler, pages, page, "ok")
            and "scheduler_cpu_s" in r
        ]
        label = f"{pages} x `{page}`" if pages else "0"
        if not ok:
            lines.append(f"| {scheduler} | {label} | 0 | - | - | - |")
            continue
        cpu = [r["scheduler_cpu_s"] for r in ok]
        wall = [r["makespan_s"] for r in ok]
        median = statistics.median(cpu)
        if pages == 0:
            baseline[scheduler] = median
        paired = [
            r["scheduler_cpu_s"] / alone[scheduler, r["repeat"]] - 1
            for r in ok
            if (scheduler, r["repeat"]) in alone
        ]
        ratio = (
            f"{100 * (median / baseline[scheduler] - 1):+.1f}%; "
            f"{100 * statistics.median(paired):+.1f}% ({len(paired)})"
            if pages and scheduler in baseline and paired
            else ""
        )
        lines.append(
            f"| {scheduler} | {label} | {len(ok)} | {median:.2f} ({min(cpu):.2f}-{max(cpu):.2f})"
            f" | {statistics.median(wall):.2f} ({min(wall):.2f}-{max(wall):.2f}) | {ratio} |"
        )
    failed = [r for r in records if r["status"] != "ok"]
    if failed:
        lines += [
            "",
            f"{len(failed)} failed run(s): "
            + "; ".join(
                f"{r['scheduler']}/{r['pages']}/{r['repeat']}: {r.get('error', '')[:200]}"
                for r in failed
            ),
        ]
    return "\n".join(lines) + "\n"


def micro() -> str:
    """In-process: one snapshot build + encoding, 100k tasks over 200 prefixes."""
    sys.path.insert(0, str(HERE.parents[2] / "tests" / "unit"))
    from harness import Harness  # the unit tests' in-memory scheduler

    from dsched.http.dashboard_data import DashboardObserver, SchedulerSamples, build_snapshot

    lines = [
        "| workers | tasks | prefixes | build + encode ms (median of 20) | bytes |",
        "|---:|---:|---:|---:|---:|",
    ]
    for n_workers in (10, 100, 1000):
        h = Harness()
        for w in range(n_workers):
            h.add_worker(f"tcp://10.0.{w // 250}.{w % 250}:9000", nthreads=4, memory_limit=8 << 30)
        h.add_client()
        progress = DashboardObserver()
        h.core.add_extension(progress)
        progress.start()
        h.core.set_observations(progress, progress.observations, transitions=False)
        h.submit({f"p{i % 200}-{i}": [] for i in range(100_000)}, [])
        h.submit(
            {f"p{i % 200}-{i}": [] for i in range(100_000)},
            [f"p{i % 200}-{i}" for i in range(100_000)],
        )
        metrics = {
            "managed_bytes": 1 << 30,
            "memory": 2 << 30,
            "cpu": 50.0,
            "spilled_bytes": {"memory": 0, "disk": 0},
            "transfer": {"incoming_bytes": 0, "outgoing_bytes": 0},
        }
        heartbeats = {address: (metrics, time.time()) for address in h.state.workers}
        samples = SchedulerSamples()
        for i in range(300):
            samples.add(float(i), 0.1, 0.001)
        times = []
        size = 0
        for _ in range(20):
            start = time.perf_counter()
            snap = build_snapshot(h.state, heartbeats, progress, samples, time.time())
            size = len(json.dumps(snap, default=str).encode())
            times.append(time.perf_counter() - start)
        lines.append(
            f"| {n_workers} | {len(h.state.tasks)} | {len(snap['progress'])} | "
            f"{1e3 * statistics.median(times):.2f} | {size} |"
        )
    return "\n".join(lines) + "\n"


def core_run(observed: bool, n: int = 25_000, workers: int = 8, batch: int = 50) -> float:
    """CPU seconds of merge-``n`` through the pure core, the dashboard observer started or
    not (see the module doc)."""
    from collections import deque

    from dsched.core import Core
    from dsched.http.dashboard_data import DashboardObserver
    from dsched.policy import PolicyConfig, make_policy
    from dsched.server.errors import killed_worker
    from dsched.sim import graphs
    from dsched.state import events as ev
    from dsched.state.machine import SchedulerState

    graph = graphs.merge(n)
    state = SchedulerState(killed_worker=killed_worker)
    observer = DashboardObserver()
    core = Core(state, make_policy("dask", PolicyConfig()), [observer])
    if observed:
        observer.start()
        core.set_observations(observer, observer.observations, transitions=False)
    pending: deque[tuple[str, Any, Any]] = deque()

    def settle(now: float) -> None:
        for address, messages in core.flush(now).out.to_workers.items():
            pending.extend(
                (address, m["key"], m["run_id"]) for m in messages if m["op"] == "compute-task"
            )

    for i in range(workers):
        core.handle(ev.WorkerConnected(f"tcp://127.0.0.1:{10000 + i}", 1), 0.0)
    core.handle(ev.ClientConnected("client"), 0.0)
    settle(0.0)
    tasks = [ev.NewTask(t.key, t.dependencies, b"run-spec", {}) for t in graph.tasks.values()]
    now = 0.0
    gc.collect()  # not the previous run's garbage: a full collection costs 0.1-0.3 s here
    start = time.process_time()
    core.handle(ev.GraphReceived("client", tasks, graph.keys, graph.order), now)
    settle(now)
    while pending:
        now += 0.001
        for _ in range(min(batch, len(pending))):
            address, key, run_id = pending.popleft()
            stimulus_id = f"task-finished-{now}"
            msg = {
                "op": "task-finished",
                "key": key,
                "status": "OK",
                "nbytes": 8,
                "thread": 1,
                "startstops": [{"action": "compute", "start": now, "stop": now + 0.0005}],
                "stimulus_id": stimulus_id,
            }
            core.handle(
                ev.TaskFinished(address, key, run_id, 8, stimulus_id=stimulus_id, msg=msg), now
            )
        settle(now)
    cpu = time.process_time() - start
    assert not observed or observer.index == len(graph), observer.index
    return cpu


def core_benchmark(repeats: int) -> str:
    from dsched.cli import tune_garbage_collector

    tune_garbage_collector()  # as the scheduler process does
    runs: dict[bool, list[float]] = {False: [], True: []}
    for _ in range(repeats):
        for observed in (False, True):
            runs[observed].append(core_run(observed))
    diffs = [on - off for off, on in zip(runs[False], runs[True], strict=True)]
    ratios = [on / off - 1 for off, on in zip(runs[False], runs[True], strict=True)]
    lines = [
        "| dashboard observer | runs | CPU s, median (min-max) | paired median vs stopped |",
        "|---|---:|---:|---:|",
    ]
    for observed, label in ((False, "stopped (no page)"), (True, "started (a page open)")):
        cpu = runs[observed]
        extra = (
            f"+{1e3 * statistics.median(diffs):.1f} ms ({100 * statistics.median(ratios):+.1f}%)"
            if observed
            else ""
        )
        lines.append(
            f"| {label} | {len(cpu)} | {statistics.median(cpu):.3f} "
            f"({min(cpu):.3f}-{max(cpu):.3f}) | {extra} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--schedulers", default="dsched,dask")
    parser.add_argument("--out", type=Path, default=HERE)
    parser.add_argument("--micro", action="store_true", help="only the snapshot micro-benchmark")
    parser.add_argument("--core", action="store_true", help="only the in-process per-task cost")
    parser.add_argument(
        "--summarize", action="store_true", help="only rewrite results.md from results.json"
    )
    args = parser.parse_args()
    if args.summarize:
        runs = json.loads((args.out / "results.json").read_text())["runs"]
        (args.out / "results.md").write_text(summarize(runs))
        print(summarize(runs))
        return
    if args.micro:
        print(micro())
        return
    if args.core:
        print(core_benchmark(args.repeats))
        return
    args.out.mkdir(parents=True, exist_ok=True)
    from dsched.bench.runner import machine_info

    records: list[dict[str, Any]] = []
    schedulers = args.schedulers.split(",")
    for repeat in range(args.repeats):
        for scheduler, pages, page in CONDITIONS:
            if scheduler not in schedulers:
                continue
            record = run_one(scheduler, pages, page, repeat)
            records.append(record)
            print(json.dumps(record), flush=True)
            (args.out / "results.json").write_text(
                json.dumps(
                    {"machine": machine_info(), "command": sys.argv, "runs": records}, indent=1
                )
            )
    (args.out / "results.md").write_text(summarize(records))
    print(summarize(records))


if __name__ == "__main__":
    main()
