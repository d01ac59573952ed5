"""``dsched.deploy.Scheduler``: a dsched scheduler for Dask's cluster managers.

Theory of operation
-------------------
Cluster managers build their scheduler from a spec, ``cls(**options)``, await it, and talk
to it at ``external_address or address`` (``SpecCluster._start``, distributed/deploy/
spec.py); dask-jobqueue passes ``protocol``, ``dashboard_address``, ``security`` and
``interface`` plus the user's ``scheduler_options``; ``LocalCluster`` passes ``host``,
``port``, ``services``, ``service_kwargs``, ``dashboard`` and ``blocked_handlers`` too.
Dask's own ``distributed.Scheduler`` runs in the manager's process; dsched runs
``python -m dsched scheduler`` as a subprocess instead, with the same options turned into
its command line, so this class is a ``distributed.deploy.spec.ProcessInterface``
(``address``, ``external_address``, ``status`` as ``distributed.core.Status``, ``start``,
``close``, ``finished``, awaitable, an async context manager), like Dask's
``SubprocessScheduler``.

Options are Dask's ``Scheduler`` keywords. Each one is translated to a flag, to the
scheduler process's Dask configuration, or refused with a ``ValueError`` saying why and
what to do instead (``OPTIONS_REFUSED`` below); an unknown keyword is a ``TypeError``, as
for any Python callable. The subprocess inherits this process's Dask configuration
(``DASK_INTERNAL_INHERIT_CONFIG``, as Dask's nannies pass it on), so a
``dask.config.set`` around the cluster reaches the scheduler as it would reach an
in-process one, and this process's ``sys.path`` (as ``PYTHONPATH``), so it can unpickle
the graphs of functions this process imports.

The address is learnt from the scheduler file that ``--scheduler-file`` makes the process
write once it listens (the caller's file if one was given, else one in a private
temporary directory that also holds the process's log and any TLS material written from
in-memory PEM). Until then ``start`` waits on two conditions: the file holds an address,
or the process exited (then the error carries the tail of its log). A watcher notes
when the process exits by itself (the ``terminate`` RPC, ``--idle-timeout``): the status
becomes ``closed``, so ``SpecCluster`` stops asking a dead scheduler to retire workers.
``close`` sends SIGTERM (the scheduler closes its comms and plugins in order), waits,
and kills only if it must. Processes are stopped by their own PID only; one still
running when the interpreter exits is terminated by an ``atexit`` hook.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import json
import logging
import os
import shutil
import signal
import sys
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import dask
from distributed.core import Status
from distributed.deploy.spec import ProcessInterface
from distributed.security import Security

logger = logging.getLogger("dsched.deploy")

# How long the scheduler may take to listen, and to exit after SIGTERM.
START_TIMEOUT_S = 60.0
CLOSE_TIMEOUT_S = 20.0
_POLL_INTERVAL_S = 0.05
LOG_TAIL_LINES = 30
# Dask's dashboard port when no dashboard address is given (distributed/node.py).
DEFAULT_DASHBOARD_PORT = 8787

# Options of distributed.Scheduler that a scheduler in another process cannot take:
# option -> why, and what to use instead.
OPTIONS_REFUSED: dict[str, str] = {
    "services": "dsched serves no extra tornado services; its HTTP server is --dashboard-address",
    "service_kwargs": "dsched serves no extra tornado services",
    "extensions": "dsched's extensions are built in (dsched.ext); a scheduler plugin in a "
    "preload (preload=...) can add behaviour",
    "plugins": "plugin objects cannot be handed to another process; register them from a "
    "preload (preload=..., scheduler.add_plugin) or with Client.register_plugin",
    "blocked_handlers": "dsched has no blocked handlers",
    "jupyter": "dsched does not start a Jupyter server",
    "contact_address": "dsched advertises the address it listens on",
    "transition_counter_max": "dsched has no transition counter limit",
}
# Values of refused options that mean "not used" (what LocalCluster passes by default).
_UNSET_VALUES: tuple[Any, ...] = (None, False, (), [], {})

_running: set[asyncio.subprocess.Process] = set()


@atexit.register
def _terminate_leftovers() -> None:
    """A scheduler whose cluster was never closed does not outlive this interpreter."""
    for process in list(_running):
        if process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(process.pid, signal.SIGTERM)


def _security(security: Security | Mapping[str, Any] | bool | None) -> Security | None:
    if security is None or security is False:
        return None
    if security is True:
        temporary: Security = Security.temporary()  # type: ignore[no-untyped-call]
        return temporary
    if isinstance(security, Security):
        return security
    if isinstance(security, Mapping):
        return Security(**security)  # type: ignore[no-untyped-call]
    raise TypeError(f"security must be a Security object or a dict, got {security!r:.100}")


def _host_only(host: str) -> str:
    """The host part of ``tls://10.0.0.1:8786``-style values: ``10.0.0.1``."""
    location = host.partition("://")[2] if "://" in host else host
    if location.startswith("["):
        return location[1:].partition("]")[0]
    return location.rpartition(":")[0] if location.count(":") == 1 else location


class Scheduler(ProcessInterface):
    """A dsched scheduler process for ``SpecCluster``, ``LocalCluster`` and dask-jobqueue.

    ``SpecCluster(scheduler={"cls": dsched.deploy.Scheduler, "options": {...}}, ...)`` or
    dask-jobqueue's ``scheduler_cls=dsched.deploy.Scheduler``. The options are
    distributed.Scheduler's; dsched's own are ``policy`` (``--policy``) and
    ``start_timeout``.
    """

    def __init__(
        self,
        *,
        host: str | None = None,
        port: int | None = 0,
        interface: str | None = None,
        protocol: str | None = None,
        security: Security | Mapping[str, Any] | bool | None = None,
        dashboard_address: str | None = None,
        dashboard: bool | None = None,
        http_prefix: str | None = "/",
        scheduler_file: str | None = None,
        idle_timeout: float | str | None = None,
        worker_ttl: float | str | None = None,
        allowed_failures: int | None = None,
        validate: bool | None = None,
        preload: str | Sequence[str] | None = None,
        preload_argv: str | Sequence[str] | Sequence[Sequence[str]] = (),
        policy: str | None = None,
        start_timeout: float = START_TIMEOUT_S,
        **dask_only: Any,
    ) -> None:
        unknown = sorted(set(dask_only) - set(OPTIONS_REFUSED))
        if unknown:
            raise TypeError(f"dsched.deploy.Scheduler got unexpected keyword argument(s) {unknown}")
        for option, value in dask_only.items():
            if not any(value is unset or value == unset for unset in _UNSET_VALUES):
                raise ValueError(
                    f"dsched.deploy.Scheduler does not support {option}={value!r:.80}: "
                    f"{OPTIONS_REFUSED[option]}"
                )
        self.protocol = (protocol or "").removesuffix("://") or None
        if self.protocol not in (None, "tcp", "tls"):
            raise ValueError(
                f"dsched.deploy.Scheduler cannot listen on {protocol!r}: dsched runs in its "
                "own process and speaks tcp:// and tls:// (use protocol='tcp' or 'tls'; "
                "LocalCluster(processes=False) picks tcp:// for that reason)"
            )
        self.host = host
        self.port = port
        self.interface = interface
        self.security = _security(security)
        self.dashboard_address = dashboard_address
        self.dashboard = dashboard
        self.http_prefix = http_prefix
        self.scheduler_file = scheduler_file
        self.idle_timeout = idle_timeout
        self.worker_ttl = worker_ttl
        self.allowed_failures = allowed_failures
        self.validate = validate
        self.preload = [preload] if isinstance(preload, str) else list(preload or ())
        self.preload_argv = preload_argv
        self.policy = policy
        self.start_timeout = start_timeout
        self.process: asyncio.subprocess.Process | None = None
        self._workdir: Path | None = None
        self._watcher: asyncio.Task[None] | None = None
        self._closing = False
        super().__init__()  # type: ignore[no-untyped-call]

    # ------------------------------------------------------------------ the command line
    def _dashboard_address(self) -> str:
        if self.dashboard_address is not None:
            return self.dashboard_address
        # Dask: no address is port 8787 on the scheduler's host (all hosts without one).
        host = _host_only(self.host or "")
        return f"{host}:{DEFAULT_DASHBOARD_PORT}" if host else f":{DEFAULT_DASHBOARD_PORT}"

    def _tls_arguments(self, workdir: Path) -> list[str]:
        security = self.security
        if security is None:
            return []
        arguments = []
        for flag, attribute in (
            ("--tls-ca-file", "tls_ca_file"),
            ("--tls-cert", "tls_scheduler_cert"),
            ("--tls-key", "tls_scheduler_key"),
        ):
            value: str | None = getattr(security, attribute)
            if not value:
                continue
            if "-----BEGIN" in value:
                # In-memory PEM (Security.temporary()): the process reads files.
                path = workdir / f"{attribute}.pem"
                path.write_text(value)
                path.chmod(0o600)
                arguments += [flag, str(path)]
            else:
                arguments += [flag, value]
        return arguments

    def _preload_arguments(self) -> list[str]:
        arguments = [item for name in self.preload for item in ("--preload", name)]
        argv: Any = self.preload_argv
        if isinstance(argv, str):
            argv = [argv]
        if argv and not isinstance(argv[0], str):
            # One argv per preload: the command line has one shared list, as Dask's CLI.
            distinct = {tuple(a) for a in argv}
            if len(distinct) > 1:
                raise ValueError(
                    "dsched.deploy.Scheduler: one preload_argv list for every preload, "
                    f"as `dask scheduler` takes them; got {argv!r}"
                )
            argv = list(next(iter(distinct))) if distinct else []
        if argv and not self.preload:
            raise ValueError("dsched.deploy.Scheduler: preload_argv without a preload")
        return arguments + (["--", *argv] if argv else [])

    def command(self, scheduler_file: Path, workdir: Path) -> list[str]:
        """``python -m dsched scheduler ...`` for these options."""
        command = [
            sys.executable,
            "-m",
            "dsched",
            "scheduler",
            "--host",
            self.host or "",
            "--port",
            str(self.port or 0),
            "--scheduler-file",
            str(scheduler_file),
            "--dashboard-address",
            self._dashboard_address(),
        ]
        dashboard = self.dashboard
        if dashboard is None:
            dashboard = self.dashboard_address is not None
        command.append("--dashboard" if dashboard else "--no-dashboard")
        if self.http_prefix not in (None, "", "/"):
            command += ["--dashboard-prefix", str(self.http_prefix)]
        if self.protocol:
            command += ["--protocol", self.protocol]
        if self.interface:
            command += ["--interface", self.interface]
        if self.idle_timeout:
            command += ["--idle-timeout", str(self.idle_timeout)]
        if self.validate:
            command.append("--validate")
        if self.policy:
            command += ["--policy", self.policy]
        command += self._tls_arguments(workdir)
        return command + self._preload_arguments()

    def environment(self) -> dict[str, str]:
        """This process's environment and Dask configuration, plus the options that are
        configuration keys of the scheduler."""
        overrides: dict[str, Any] = {}
        if self.worker_ttl is not None:
            overrides["distributed.scheduler.worker-ttl"] = self.worker_ttl
        if self.allowed_failures is not None:
            overrides["distributed.scheduler.allowed-failures"] = self.allowed_failures
        if self.security is not None and self.security.require_encryption:
            overrides["distributed.comm.require-encryption"] = True
        with dask.config.set(overrides):
            inherited = dask.config.serialize(dask.config.global_config)
        # The scheduler unpickles graphs, so it must import what this process imports (an
        # in-process scheduler would): this process's sys.path, as multiprocessing's spawn
        # hands it to a child.
        path = [entry for entry in sys.path if entry and os.path.exists(entry)]
        return {
            **os.environ,
            "DASK_INTERNAL_INHERIT_CONFIG": inherited,
            "PYTHONPATH": os.pathsep.join(dict.fromkeys(path)),
        }

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        self._workdir = workdir = Path(tempfile.mkdtemp(prefix="dsched-deploy-"))
        scheduler_file = Path(self.scheduler_file or workdir / "scheduler.json")
        with contextlib.suppress(FileNotFoundError):
            scheduler_file.unlink()  # a stale file from an earlier run is not our address
        command = self.command(scheduler_file, workdir)
        self.log_path = workdir / "scheduler.log"
        logger.info("starting %s", " ".join(command))
        with open(self.log_path, "wb") as log:
            # Its own session: a Ctrl-C meant for this process does not kill the scheduler
            # before the cluster manager has retired its workers.
            self.process = await asyncio.create_subprocess_exec(
                *command,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                env=self.environment(),
                start_new_session=True,
            )
        _running.add(self.process)
        # One waiter for the process's exit, shared by start-up and the watcher.
        exited = asyncio.ensure_future(self.process.wait())
        try:
            self.address = await self._wait_for_address(scheduler_file, exited)
        except BaseException:
            await self._stop_process()
            self._remove_workdir()
            raise
        self._watcher = asyncio.ensure_future(self._watch(self.process, exited))
        logger.info("dsched scheduler at %s (pid %d)", self.address, self.process.pid)
        await super().start()  # type: ignore[no-untyped-call]

    async def _wait_for_address(self, scheduler_file: Path, exited: asyncio.Future[int]) -> str:
        assert self.process is not None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.start_timeout
        while True:
            address = _read_address(scheduler_file)
            if address is not None:
                return address
            if self.process.returncode is not None:
                raise RuntimeError(
                    f"the dsched scheduler exited with status {self.process.returncode} "
                    f"before listening:\n{self.log_tail()}"
                )
            if loop.time() > deadline:
                raise RuntimeError(
                    f"the dsched scheduler did not listen within {self.start_timeout:g} s:\n"
                    f"{self.log_tail()}"
                )
            # Until the process exits or the poll interval passes, whichever comes first.
            await asyncio.wait({exited}, timeout=_POLL_INTERVAL_S)

    async def _watch(
        self, process: asyncio.subprocess.Process, exited: asyncio.Future[int]
    ) -> None:
        returncode = await exited
        _running.discard(process)
        if self.status == Status.running and not self._closing:
            # Not closed by us: the terminate RPC, --idle-timeout, or a crash.
            if returncode:
                logger.warning(
                    "the dsched scheduler at %s exited with status %s:\n%s",
                    self.address,
                    returncode,
                    self.log_tail(),
                )
            else:
                logger.info("the dsched scheduler at %s exited", self.address)
            self.status = Status.closed
            self._event_finished.set()

    def log_tail(self, lines: int = LOG_TAIL_LINES) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except (AttributeError, OSError):
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])

    async def _stop_process(self) -> None:
        process = self.process
        if process is None or process.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            process.terminate()
        try:
            await asyncio.wait_for(process.wait(), CLOSE_TIMEOUT_S)
        except TimeoutError:
            logger.warning("the dsched scheduler (pid %d) ignored SIGTERM: killing", process.pid)
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            await process.wait()
        _running.discard(process)

    def _remove_workdir(self) -> None:
        if self._workdir is not None:
            shutil.rmtree(self._workdir, ignore_errors=True)
            self._workdir = None

    async def close(self) -> None:
        self._closing = True
        await self._stop_process()
        if self._watcher is not None:
            await self._watcher
        self._remove_workdir()
        await super().close()  # type: ignore[no-untyped-call]


def _read_address(scheduler_file: Path) -> str | None:
    """The address in a scheduler file, or None while it is missing or half-written."""
    try:
        content = json.loads(scheduler_file.read_text())
    except (OSError, ValueError):
        return None
    address = content.get("address") if isinstance(content, dict) else None
    return address if isinstance(address, str) else None
