"""Run workloads against schedulers on fresh clusters, interleaved, and record every run.

For each repeat, for each set-up, for each workload, every scheduler runs once (A B C A B C
...), each on a fresh ``ProcessCluster`` (scheduler + workers), so drift in machine load
spreads over all of them. One run: start the cluster, connect a Client, warm the workers up
(one tiny task), build the graph untimed, then time ``Prepared.run()``; the scheduler
process's CPU seconds are read before and after the timed part and its peak RSS (VmHWM)
after it. A run that fails or times out is recorded with its status and error, never
dropped.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import os
import platform
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

from dsched.bench.workloads import Workload, get_workload, inc
from dsched.testing.cluster import ProcessCluster

__all__ = ["RunRecord", "Setup", "machine_info", "parse_setup", "run_one", "run_suite"]

CLIENT_TIMEOUT_S = 30


@dataclass(frozen=True)
class Setup:
    """``real-<workers>x<threads>`` (dask worker processes) or ``zero-<workers>``."""

    kind: str  # "real" | "zero"
    workers: int
    threads: int = 1

    @property
    def name(self) -> str:
        if self.kind == "zero":
            return f"zero-{self.workers}"
        return f"real-{self.workers}x{self.threads}"


def parse_setup(text: str) -> Setup:
    kind, _, rest = text.partition("-")
    try:
        if kind == "zero":
            return Setup("zero", int(rest or 8))
        if kind == "real":
            workers, _, threads = (rest or "2x1").partition("x")
            return Setup("real", int(workers), int(threads or 1))
    except ValueError:
        pass
    raise ValueError(f"bad set-up {text!r}: use real-<N>x<T> (e.g. real-2x1) or zero-<N>")


@dataclass
class RunRecord:
    workload: str
    scheduler: str
    setup: str
    repeat: int
    status: str  # ok | wrong-result | error | timeout | start-failed
    makespan_s: float | None = None
    tasks: int | None = None
    scheduler_cpu_s: float | None = None
    scheduler_peak_rss_bytes: int | None = None
    # The largest peak RSS of any worker process (real workers only; fresh ones every run).
    worker_peak_rss_bytes: int | None = None
    per_task_ms: float | None = None
    error: str = ""
    started_at: float = field(default_factory=time.time)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _peak_rss_bytes(pid: int) -> int | None:
    """VmHWM: the process's peak resident set size so far (Linux)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _own_peak_rss_bytes() -> int | None:
    return _peak_rss_bytes(os.getpid())


def _workers_peak_rss_bytes(client: Any) -> int | None:
    """The largest VmHWM among the workers (each reads its own, through ``client.run``)."""
    try:
        peaks = client.run(_own_peak_rss_bytes)
    except Exception:
        return None
    values = [v for v in peaks.values() if v]
    return max(values) if values else None


def _cpu_seconds(pid: int) -> float | None:
    try:
        import psutil  # type: ignore[import-untyped]  # no types-psutil installed

        times = psutil.Process(pid).cpu_times()
        return float(times.user + times.system)
    except Exception:
        return None


def run_one(
    workload: Workload,
    scheduler: str,
    setup: Setup,
    repeat: int,
    timeout: float,
    *,
    check: bool = True,
) -> RunRecord:
    """One measurement on a fresh cluster; never raises for a failing run."""
    from distributed import Client

    record = RunRecord(workload.name, scheduler, setup.name, repeat, status="error")
    cluster = ProcessCluster(
        scheduler_kind=scheduler,
        n_workers=setup.workers,
        threads_per_worker=setup.threads,
        worker_kind="zero" if setup.kind == "zero" else "dask",
    )
    try:
        cluster.start()
    except Exception as error:
        record.status = "start-failed"
        record.error = f"{type(error).__name__}: {error}"[:4000]
        return record
    executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="dsched-bench-run")
    client = None
    try:
        assert cluster.address is not None and cluster.scheduler is not None
        pid = cluster.scheduler.popen.pid
        # distributed's Client is not annotated (no-untyped-call), here and in close().
        client = Client(  # type: ignore[no-untyped-call]
            cluster.address, timeout=CLIENT_TIMEOUT_S, set_as_default=False
        )
        client.submit(inc, 0, pure=False).result(timeout=CLIENT_TIMEOUT_S)  # warm-up
        prepared = workload.prepare(client)
        record.tasks = prepared.n_tasks
        cpu_before = _cpu_seconds(pid)
        start = time.perf_counter()
        future = executor.submit(prepared.run)
        try:
            result = future.result(timeout=timeout)
        except concurrent.futures.TimeoutError:
            record.status = "timeout"
            record.error = f"no result within {timeout:g} s"
            return record
        record.makespan_s = time.perf_counter() - start
        cpu_after = _cpu_seconds(pid)
        if cpu_before is not None and cpu_after is not None:
            record.scheduler_cpu_s = cpu_after - cpu_before
        record.scheduler_peak_rss_bytes = _peak_rss_bytes(pid)
        if setup.kind == "real":
            record.worker_peak_rss_bytes = _workers_peak_rss_bytes(client)
        if record.tasks:
            record.per_task_ms = 1e3 * record.makespan_s / record.tasks
        if check and setup.kind == "real":
            try:
                prepared.check(result)
            except AssertionError as error:
                record.status = "wrong-result"
                record.error = str(error)[:4000]
                return record
        record.status = "ok"
    except Exception as error:
        record.status = "error"
        record.error = (f"{type(error).__name__}: {error}\n{traceback.format_exc(limit=5)}")[:4000]
    finally:
        if client is not None:
            with contextlib.suppress(Exception):
                client.close(timeout=10)  # type: ignore[no-untyped-call]
        cluster.close()
        # A timed-out run's thread may still wait on its (now dead) cluster; do not join it.
        executor.shutdown(wait=False, cancel_futures=True)
    return record


def machine_info() -> dict[str, Any]:
    from importlib.metadata import version

    import dsched

    info: dict[str, Any] = {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "dask": version("dask"),
        "distributed": version("distributed"),
        "dsched": dsched.__version__,
    }
    with contextlib.suppress(Exception):
        import psutil

        info["memory_bytes"] = psutil.virtual_memory().total
        info["load_average"] = os.getloadavg()
    return info


class Progress:
    """A one-line progress bar on stderr (plain lines when stderr is not a terminal)."""

    def __init__(self, total: int, stream: Any = None) -> None:
        self.total = total
        self.done = 0
        self.stream = stream or sys.stderr
        self.started = time.monotonic()
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self._lock = threading.Lock()

    def update(self, label: str, outcome: str) -> None:
        with self._lock:
            self.done += 1
            elapsed = time.monotonic() - self.started
            eta = elapsed / self.done * (self.total - self.done)
            width = 30
            filled = int(width * self.done / max(1, self.total))
            bar = "#" * filled + "." * (width - filled)
            line = (
                f"[{bar}] {self.done}/{self.total} {elapsed:5.0f}s eta {eta:4.0f}s  "
                f"{label}: {outcome}"
            )
            if self.tty:
                self.stream.write("\r\x1b[K" + line + ("\n" if self.done == self.total else ""))
            else:
                self.stream.write(line + "\n")
            self.stream.flush()


def plan(
    workloads: Iterable[str], schedulers: Iterable[str], setups: Iterable[Setup], repeats: int
) -> list[tuple[int, Setup, Workload, str]]:
    """The interleaved run order: repeat, set-up, workload, then every scheduler in turn."""
    parsed = [get_workload(name) for name in workloads]
    schedulers, setups = list(schedulers), list(setups)
    order: list[tuple[int, Setup, Workload, str]] = []
    for repeat in range(1, repeats + 1):
        for setup in setups:
            for workload in parsed:
                if setup.kind == "zero" and not workload.zero_ok:
                    continue
                order.extend((repeat, setup, workload, scheduler) for scheduler in schedulers)
    return order


def run_suite(
    runs: list[tuple[int, Setup, Workload, str]],
    timeout: float,
    on_record: Callable[[RunRecord], None],
    progress: Progress | None = None,
) -> list[RunRecord]:
    records = []
    for repeat, setup, workload, scheduler in runs:
        record = run_one(workload, scheduler, setup, repeat, timeout)
        records.append(record)
        on_record(record)
        if progress is not None:
            outcome = (
                f"{record.makespan_s:.3f} s"
                if record.status == "ok" and record.makespan_s is not None
                else record.status
            )
            progress.update(f"{workload.name} {setup.name} {scheduler} #{repeat}", outcome)
    return records
