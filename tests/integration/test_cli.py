"""``dsched scheduler`` as deployments start it: flags, files, signals."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from distributed import Client

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]

DSCHED = [sys.executable, "-m", "dsched"]
# The HTTP server starts even without the dashboard: keep it on 127.0.0.1, on a free port.
LOCAL_HTTP = ["--dashboard-address", "127.0.0.1:0"]


def wait_for(predicate, timeout: float = 20.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def start(tmp_path: Path, *flags: str) -> tuple[subprocess.Popen[str], Path]:
    log = tmp_path / "scheduler.log"
    proc = subprocess.Popen(
        [*DSCHED, "scheduler", "--host", "127.0.0.1", *LOCAL_HTTP, *flags],
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
        text=True,
    )
    return proc, log


def stop(proc: subprocess.Popen[str]) -> None:
    if proc.poll() is None:
        proc.kill()
        proc.wait(10)


def test_version_flag():
    out = subprocess.run(
        [*DSCHED, "scheduler", "--version"], check=False, capture_output=True, text=True
    )
    assert out.returncode == 0
    assert out.stdout.startswith("dsched ")


def test_scheduler_file_pid_file_and_clean_sigterm(tmp_path):
    scheduler_file = tmp_path / "scheduler.json"
    pid_file = tmp_path / "scheduler.pid"
    proc, log = start(
        tmp_path,
        "--port", "0",
        "--scheduler-file", str(scheduler_file),
        "--pid-file", str(pid_file),
        "--no-dashboard",
    )  # fmt: skip
    try:
        wait_for(scheduler_file.exists, what="the scheduler file")
        info = json.loads(scheduler_file.read_text())
        assert info["type"] == "Scheduler"
        assert info["address"].startswith("tcp://127.0.0.1:")
        assert int(pid_file.read_text()) == proc.pid
        with Client(info["address"], timeout=20) as client:
            assert client.scheduler_info()["address"] == info["address"]
        # The address is printed the way dask prints it, for scripts that scrape the log.
        assert f"Scheduler at:   {info['address']}" in log.read_text()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0
        assert not pid_file.exists()
    finally:
        stop(proc)


def test_sigint_shuts_down_and_closes_workers(tmp_path):
    scheduler_file = tmp_path / "scheduler.json"
    proc, _ = start(tmp_path, "--port", "0", "--scheduler-file", str(scheduler_file))
    worker = None
    try:
        wait_for(scheduler_file.exists, what="the scheduler file")
        address = json.loads(scheduler_file.read_text())["address"]
        worker = subprocess.Popen(
            [sys.executable, "-m", "distributed.cli.dask_worker", address, "--nthreads", "1",
             "--no-dashboard", "--host", "127.0.0.1", "--no-nanny"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
        with Client(address, timeout=20) as client:
            client.wait_for_workers(1, timeout=30)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(20) == 0
        # Workers never outlive their scheduler: dsched tells them to close.
        assert worker.wait(30) is not None
    finally:
        stop(proc)
        if worker is not None:
            stop(worker)


def test_idle_timeout_stops_an_unused_scheduler(tmp_path):
    proc, log = start(tmp_path, "--port", "0", "--idle-timeout", "1s")
    try:
        assert proc.wait(30) == 0
        assert "idle" in log.read_text()
    finally:
        stop(proc)


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--protocol", "ucx"], "not supported"),
        (["--preload", "no_such_preload_module"], "No module named 'no_such_preload_module'"),
        (["--policy", "no-such-policy"], "unknown policy"),
    ],
)
def test_unsupported_options_fail_with_a_clear_message(tmp_path, flags, message):
    out = subprocess.run(
        [*DSCHED, "scheduler", "--host", "127.0.0.1", *LOCAL_HTTP, "--port", "0", *flags],
        check=False,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.returncode != 0
    assert message in out.stderr


def test_port_in_use_fails_instead_of_hanging(tmp_path):
    scheduler_file = tmp_path / "scheduler.json"
    first, _ = start(tmp_path, "--port", "0", "--scheduler-file", str(scheduler_file))
    try:
        wait_for(scheduler_file.exists, what="the scheduler file")
        port = json.loads(scheduler_file.read_text())["address"].rsplit(":", 1)[1]
        out = subprocess.run(
            [*DSCHED, "scheduler", "--host", "127.0.0.1", *LOCAL_HTTP, "--port", port],
            check=False,
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert out.returncode != 0
        assert "address already in use" in out.stderr.lower() or "errno 98" in out.stderr.lower()
    finally:
        stop(first)
