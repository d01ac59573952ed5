"""Make docs/dashboard.png: the dsched dashboard's /status page after a computation.

    .venv/bin/python benchmarks/results/dashboard/screenshot.py [docs/dashboard.png]

Starts a dsched scheduler and three `dask worker` processes (2 threads, 2 GiB limit each)
on 127.0.0.1, opens the dashboard's data (as an open page would, so the task stream
records), runs a dask array reduction and a map with a few failing tasks, starts a slower
map, and takes the screenshot with headless Chromium while that one runs. Every process it
started is stopped (by PID) at the end.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import dask.array as da
from distributed import Client

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[2]


def slow(i: int) -> int:
    time.sleep(0.3)
    return i


def flaky(i: int) -> float:
    return 1 / (i % 17)


def main() -> None:
    out = Path(sys.argv[1] if len(sys.argv) > 1 else ROOT / "docs" / "dashboard.png")
    work = Path(tempfile.mkdtemp(prefix="dsched-screenshot-"))
    scheduler_file = work / "scheduler.json"
    env = {**os.environ, "PYTHONPATH": str(HERE)}
    processes = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "dsched",
                "scheduler",
                "--host",
                "127.0.0.1",
                "--port",
                "0",
                "--dashboard-address",
                "127.0.0.1:0",
                "--scheduler-file",
                str(scheduler_file),
            ],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
    ]
    try:
        while not scheduler_file.exists():
            time.sleep(0.1)
        address = json.loads(scheduler_file.read_text())["address"]
        processes += [
            subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "distributed.cli.dask_worker",
                    address,
                    "--host",
                    "127.0.0.1",
                    "--nthreads",
                    "2",
                    "--memory-limit",
                    "2GiB",
                    "--no-dashboard",
                    "--name",
                    f"worker-{i}",
                    "--local-directory",
                    str(work / f"w{i}"),
                ],
                env=env,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            for i in range(3)
        ]
        with Client(address) as client:
            client.wait_for_workers(3)
            port = client.scheduler_info()["services"]["dashboard"]
            url = f"http://127.0.0.1:{port}"
            urllib.request.urlopen(url + "/dashboard/task-stream.json").read()
            x = da.random.random((6000, 6000), chunks=(500, 500)).persist()
            total = (x @ x.T).sum().compute()
            failures = client.map(flaky, range(60))
            client.gather(failures, errors="skip")
            running = client.map(slow, range(120))
            time.sleep(3)
            with tempfile.TemporaryDirectory() as profile:
                subprocess.run(
                    [
                        "chromium",
                        "--headless",
                        "--no-sandbox",
                        "--disable-gpu",
                        "--disable-dev-shm-usage",
                        "--hide-scrollbars",
                        f"--user-data-dir={profile}",
                        "--window-size=1400,1000",
                        "--virtual-time-budget=4000",
                        f"--screenshot={out}",
                        url + "/status",
                    ],
                    check=True,
                    timeout=120,
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
            print(f"{out} written (sum {total:.3g}, {len(running)} tasks still running)")
            del x, failures, running
    finally:
        for process in reversed(processes):
            process.send_signal(signal.SIGTERM)
        for process in processes:
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()


if __name__ == "__main__":
    main()
