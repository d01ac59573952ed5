"""Start a scheduler and ``dask worker`` subprocesses on 127.0.0.1, and stop exactly those.

This is the one place that knows how to launch a cluster; the integration tests,
``examples/demo.py`` and ``benchmarks/quick_compare.py`` all use it, so every one of them
exercises the scheduler the way a user does: as a separate process that unmodified Dask
clients and workers reach over TCP.

Processes are started in their own session so that a Ctrl-C in the terminal reaches only the
controlling script, which then shuts the cluster down in order (workers first, then the
scheduler). Stopping is by PID only: SIGTERM, wait, then SIGKILL.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from distributed import Client

LOCALHOST = "127.0.0.1"

# "dask" is `dask scheduler` as shipped; "dask-inf" is the same with root-task queuing disabled
# (worker-saturation=inf), a common tuning for graphs of many small tasks.
SCHEDULER_KINDS = ("dsched", "dask", "dask-inf")
DASK_SCHEDULER_KINDS = ("dask", "dask-inf")

_POLL_INTERVAL_S = 0.05
# A worker that cannot reach its scheduler for this long exits by itself. This is the safety net
# for the case where the controlling process is SIGKILLed and never gets to run close().
_WORKER_DEATH_TIMEOUT_S = 60


class ClusterStartError(RuntimeError):
    """A scheduler or worker did not come up; the message carries the relevant log tail."""


def scheduler_command(kind: str, scheduler_file: Path, extra_args: Sequence[str] = ()) -> list[str]:
    """The command line that starts a scheduler of ``kind`` on an OS-chosen local port."""
    if kind in DASK_SCHEDULER_KINDS:
        # The module behind `dask scheduler` (dask_cli entry point of distributed 2026.8.0).
        program = ["distributed.cli.dask_scheduler"]
    elif kind == "dsched":
        program = ["dsched", "scheduler"]
    elif kind.startswith("dsched:"):
        # "dsched:<policy>": dsched with a non-default placement policy.
        program = ["dsched", "scheduler", "--policy", kind.partition(":")[2]]
    else:
        raise ValueError(f"unknown scheduler kind {kind!r}; expected one of {SCHEDULER_KINDS}")
    return [
        sys.executable,
        "-m",
        *program,
        "--host",
        LOCALHOST,
        "--port",
        "0",
        "--no-dashboard",
        # The HTTP server starts even without the dashboard (as Dask's does): keep it on
        # 127.0.0.1, on a free port.
        "--dashboard-address",
        f"{LOCALHOST}:0",
        "--scheduler-file",
        str(scheduler_file),
        *extra_args,
    ]


def is_scheduler_kind(kind: str) -> bool:
    """One of SCHEDULER_KINDS, or "dsched:<policy>" (dsched started with --policy <policy>)."""
    return kind in SCHEDULER_KINDS or (kind.startswith("dsched:") and len(kind) > len("dsched:"))


def scheduler_environment_overrides(kind: str) -> dict[str, str]:
    """Environment variables that turn a scheduler process into the requested ``kind``."""
    if kind == "dask-inf":
        return {"DASK_DISTRIBUTED__SCHEDULER__WORKER_SATURATION": "inf"}
    return {}


def worker_command(
    scheduler_address: str, local_directory: Path, *, nthreads: int = 1, nanny: bool = True
) -> list[str]:
    """The command line of one `dask worker` (the module behind the CLI entry point)."""
    return [
        sys.executable,
        "-m",
        "distributed.cli.dask_worker",
        scheduler_address,
        "--host",
        LOCALHOST,
        "--nthreads",
        str(nthreads),
        "--no-dashboard",
        # No memory limit: pausing, spilling or restarting a worker would make runs
        # nondeterministic and has nothing to do with the scheduler under test.
        "--memory-limit",
        "0",
        "--nanny" if nanny else "--no-nanny",
        "--local-directory",
        str(local_directory),
        "--death-timeout",
        str(_WORKER_DEATH_TIMEOUT_S),
    ]


def read_scheduler_address(scheduler_file: Path) -> str | None:
    """The address in a scheduler file, or None while it is missing or still being written."""
    try:
        content = json.loads(scheduler_file.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    address = content.get("address") if isinstance(content, dict) else None
    return address if isinstance(address, str) and address else None


@dataclass
class ManagedProcess:
    """A subprocess we started, with its combined stdout/stderr going to ``log_path``."""

    name: str
    command: list[str]
    popen: subprocess.Popen[bytes]
    log_path: Path

    @classmethod
    def start(
        cls, name: str, command: Sequence[str], log_path: Path, env: Mapping[str, str]
    ) -> ManagedProcess:
        # Logs go to a file, not a pipe: nobody drains a pipe while tests run, and a full pipe
        # would block the child.
        with log_path.open("wb") as log:
            popen = subprocess.Popen(
                list(command),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=dict(env),
                start_new_session=True,
            )
        return cls(name, list(command), popen, log_path)

    def is_running(self) -> bool:
        return self.popen.poll() is None

    def log_tail(self, lines: int = 40) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return "(no log file)"
        return "\n".join(text.splitlines()[-lines:]) or "(empty log)"

    def describe(self, lines: int = 40) -> str:
        state = "running" if self.is_running() else f"exited with code {self.popen.returncode}"
        return f"--- {self.name} (pid {self.popen.pid}, {state}), last lines ---\n" + (
            self.log_tail(lines)
        )

    def request_stop(self) -> None:
        """SIGTERM: dask workers, nannies and schedulers shut down gracefully on it."""
        if self.is_running():
            self.popen.terminate()

    def wait_stopped(self, timeout: float) -> None:
        """Wait for exit after request_stop(); SIGKILL (this PID only) if it takes too long."""
        try:
            self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            self.popen.wait(timeout)


@dataclass
class ProcessCluster:
    """One scheduler and ``n_workers`` ``dask worker`` processes on 127.0.0.1.

    Use as a context manager, or call start() and close(). ``address`` is set once start()
    returns, at which point the scheduler sees all workers running.
    """

    scheduler_kind: str = "dsched"
    n_workers: int = 2
    threads_per_worker: int = 1
    nanny: bool = True
    scheduler_args: Sequence[str] = ()
    # Directories the scheduler and workers must be able to import from, e.g. the directory of a
    # test module whose functions are pickled by reference into tasks.
    extra_pythonpath: Sequence[str | os.PathLike[str]] = ()
    # Extra environment for the scheduler process only, e.g. Dask config such as
    # DASK_DISTRIBUTED__SCHEDULER__WORKER_TTL (applied after the scheduler kind's overrides).
    scheduler_env: Mapping[str, str] = field(default_factory=dict)
    # "dask": n_workers `dask worker` processes. "zero": n_workers simulated workers
    # (`dsched zero-worker`, which completes every task at once) spread over
    # zero_processes processes.
    worker_kind: str = "dask"
    zero_processes: int = 1
    startup_timeout: float = 60.0
    stop_timeout: float = 15.0

    address: str | None = field(default=None, init=False)
    scheduler: ManagedProcess | None = field(default=None, init=False)
    workers: list[ManagedProcess] = field(default_factory=list, init=False)
    _workdir: Path | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        if not is_scheduler_kind(self.scheduler_kind):
            raise ValueError(
                f"unknown scheduler kind {self.scheduler_kind!r}; expected one of {SCHEDULER_KINDS}"
            )
        if self.worker_kind not in ("dask", "zero"):
            raise ValueError(f"unknown worker kind {self.worker_kind!r}; expected dask or zero")

    def __enter__(self) -> ProcessCluster:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def start(self) -> str:
        deadline = time.monotonic() + self.startup_timeout
        self._workdir = Path(tempfile.mkdtemp(prefix=f"dsched-cluster-{self.scheduler_kind}-"))
        try:
            self.address = self._start_scheduler(deadline)
            self._start_workers(self.address)
            self._wait_for_workers(self.address, deadline)
        except BaseException:
            # Also on KeyboardInterrupt: never leave half a cluster behind.
            self.close()
            raise
        return self.address

    def close(self) -> None:
        """Stop the workers, then the scheduler (so workers can unregister), then clean up."""
        for worker in self.workers:
            worker.request_stop()
        for worker in self.workers:
            worker.wait_stopped(self.stop_timeout)
        if self.scheduler is not None:
            self.scheduler.request_stop()
            self.scheduler.wait_stopped(self.stop_timeout)
        if self._workdir is not None:
            shutil.rmtree(self._workdir, ignore_errors=True)
            self._workdir = None

    def describe_processes(self, lines: int = 40) -> str:
        """Log tails of every process, for failure messages."""
        processes = [p for p in [self.scheduler, *self.workers] if p is not None]
        return "\n".join(p.describe(lines) for p in processes)

    def _environment(self, overrides: Mapping[str, str] | None = None) -> dict[str, str]:
        env = dict(os.environ)
        pythonpath = [os.fspath(p) for p in self.extra_pythonpath]
        if env.get("PYTHONPATH"):
            pythonpath.append(env["PYTHONPATH"])
        if pythonpath:
            env["PYTHONPATH"] = os.pathsep.join(pythonpath)
        # Unbuffered so that a process's last words are in its log when it dies.
        env["PYTHONUNBUFFERED"] = "1"
        env.update(overrides or {})
        return env

    def _start_scheduler(self, deadline: float) -> str:
        assert self._workdir is not None
        scheduler_file = self._workdir / "scheduler.json"
        self.scheduler = ManagedProcess.start(
            f"{self.scheduler_kind} scheduler",
            scheduler_command(self.scheduler_kind, scheduler_file, self.scheduler_args),
            self._workdir / "scheduler.log",
            self._environment(
                {**scheduler_environment_overrides(self.scheduler_kind), **self.scheduler_env}
            ),
        )
        while True:
            address = read_scheduler_address(scheduler_file)
            if address is not None:
                return address
            if not self.scheduler.is_running():
                raise ClusterStartError(
                    f"the {self.scheduler_kind} scheduler exited before writing its scheduler "
                    f"file\ncommand: {' '.join(self.scheduler.command)}\n"
                    + self.scheduler.describe()
                )
            if time.monotonic() > deadline:
                raise ClusterStartError(
                    f"the {self.scheduler_kind} scheduler did not write {scheduler_file} within "
                    f"{self.startup_timeout:g} s\n" + self.scheduler.describe()
                )
            time.sleep(_POLL_INTERVAL_S)

    def _start_workers(self, address: str) -> None:
        if self.worker_kind == "zero":
            self._start_zero_workers(address)
            return
        for _ in range(self.n_workers):
            self.add_worker()

    def _start_zero_workers(self, address: str) -> None:
        assert self._workdir is not None
        processes = max(1, min(self.zero_processes, self.n_workers))
        for index in range(processes):
            count = self.n_workers // processes + (index < self.n_workers % processes)
            command = [
                sys.executable,
                "-m",
                "dsched",
                "zero-worker",
                address,
                "--count",
                str(count),
                "--nthreads",
                str(self.threads_per_worker),
                "--name-prefix",
                f"zero-{index}",
            ]
            self.workers.append(
                ManagedProcess.start(
                    f"zero-worker {index}",
                    command,
                    self._workdir / f"zero-worker-{index}.log",
                    self._environment(),
                )
            )

    def add_worker(self) -> ManagedProcess:
        """Start one more `dask worker` (e.g. to replace a killed one); does not wait for it."""
        assert self._workdir is not None and self.address is not None, "start() the cluster first"
        index = len(self.workers)
        local_directory = self._workdir / f"worker-{index}"
        local_directory.mkdir()
        worker = ManagedProcess.start(
            f"worker {index}",
            worker_command(
                self.address,
                local_directory,
                nthreads=self.threads_per_worker,
                nanny=self.nanny,
            ),
            self._workdir / f"worker-{index}.log",
            self._environment(),
        )
        self.workers.append(worker)
        return worker

    def _wait_for_workers(self, address: str, deadline: float) -> None:
        remaining = max(deadline - time.monotonic(), 1.0)
        try:
            client = Client(address, timeout=remaining, set_as_default=False)  # type: ignore[no-untyped-call]
        except OSError as error:
            raise ClusterStartError(
                f"could not connect a Client to {address}: {error}\n" + self.describe_processes()
            ) from error
        with client:
            while True:
                # Short slices, so that a worker or scheduler that died is reported right away
                # instead of after the whole startup timeout.
                try:
                    client.wait_for_workers(self.n_workers, timeout=1.0)
                    return
                except TimeoutError:
                    pass
                dead = [p for p in [self.scheduler, *self.workers] if p and not p.is_running()]
                if dead:
                    raise ClusterStartError(
                        "a cluster process exited during startup\n" + self.describe_processes()
                    )
                if time.monotonic() > deadline:
                    raise ClusterStartError(
                        f"{self.n_workers} workers did not register with {address} within "
                        f"{self.startup_timeout:g} s\n" + self.describe_processes()
                    )
