"""The scheduler server: the slim asyncio shell around the pure core.

Theory of operation
-------------------
``Scheduler`` builds the core (state machine, policy, extensions) and the shell's parts,
each with one job, then listens:

* ``reactor``: drives the core tick by tick and carries out its effects (``reactor.py``);
* ``streams``: clients' and workers' batched streams (``streams.py``);
* ``data``: gather / scatter / broadcast through the scheduler (``dataproxy.py``);
* the op registry, here: ``rpc_ops`` maps every RPC op to one handler (``ops.py``): the
  shell's own (identity, heartbeats, registration, which turns the comm into a stream), the
  op providers' (the data proxy, ...) and every op an extension serves, routed to the
  core. There are no special cases outside it: an accepted comm reads a request, looks its
  op up, writes the reply, and repeats.

Adding an RPC is adding it to an extension's ``rpc_ops`` (pure, testable without a loop);
only handlers that must do I/O for the request live here.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import time
import uuid
from collections import defaultdict
from collections.abc import Awaitable, Callable, Iterable
from typing import Any, Protocol

import dask
from dask.utils import parse_timedelta

import dsched
from dsched.comm import CommClosedError, ConnectionPool, TLSSettings, listen
from dsched.comm.tcp import Comm, Listener
from dsched.core import Core, inbound
from dsched.ext.lifecycle import Lifecycle, worker_identity
from dsched.ext.p2p import P2PShuffles
from dsched.ext.registry import CONFIG_DEFAULTS, default_extensions
from dsched.ext.task_stream import TaskStream
from dsched.policy.protocol import Policy, wanted_events
from dsched.server.adaptive import AdaptiveOps
from dsched.server.dataproxy import DataProxy
from dsched.server.errors import error_reply, killed_worker
from dsched.server.forwarding import Forwarding
from dsched.server.ops import TAKEN_OVER, OpProvider, RpcOp, call
from dsched.server.plugins import Plugins
from dsched.server.policy_process import dask_policy_config
from dsched.server.reactor import Reactor, Tracer
from dsched.server.remote_code import RemoteCode
from dsched.server.report import PerformanceReport
from dsched.server.streams import StreamOps, Streams
from dsched.state import InvariantError
from dsched.state import events as ev
from dsched.state.machine import SchedulerState
from dsched.wire import ProtocolError

logger = logging.getLogger("dsched.scheduler")

# Dask's heartbeat schedule: workers heartbeat more slowly as the cluster grows.
_HEARTBEAT_STEPS = ((10, 0.5), (50, 1.0), (200, 2.0))

# The largest message a peer may send (frames and header together). Dask has no such cap;
# dsched cuts off a peer announcing more before buffering any of it. Set with the Dask
# config key ``dsched.max-message-size`` (environment: DASK_DSCHED__MAX_MESSAGE_SIZE=64MiB)
# or ``dsched scheduler --max-message-size 64MiB``.
MAX_MESSAGE_SIZE_KEY = "dsched.max-message-size"
DEFAULT_MAX_MESSAGE_SIZE = "2GiB"
WATCHDOG_INTERVAL = 1.0
# register_nanny: the nanny writes one status message on the comm once its worker is up.
NANNY_STATUS_TIMEOUT = 60



def heartbeat_interval(n_workers: int) -> float:
    for limit, interval in _HEARTBEAT_STEPS:
        if n_workers <= limit:
            return interval
    return n_workers / 200 + 1


def max_message_size_from_config() -> int:
    from dask.utils import parse_bytes

    return int(parse_bytes(dask.config.get(MAX_MESSAGE_SIZE_KEY, DEFAULT_MAX_MESSAGE_SIZE)))


def _rss_bytes() -> int:
    """This process's resident set size (for soak reports); 0 if unknown."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


class Service(Protocol):
    """A server started and stopped with the scheduler on its loop, such as the HTTP
    server (``dsched.http.HttpServer``, a layer above this one, handed in by the caller)."""

    async def start(self, scheduler: Scheduler) -> int: ...  # the port it listens on
    async def stop(self) -> None: ...


class Scheduler:
    def __init__(
        self,
        policy: Policy,
        *,
        host: str = "127.0.0.1",
        port: int = 8786,
        allowed_failures: int | None = None,
        idle_timeout: float | None = None,
        worker_ttl: float | None = None,
        validate: bool = False,
        max_message_bytes: int | None = None,
        protocol: str | None = None,
        tls: TLSSettings | None = None,
        http: Service | None = None,
    ) -> None:
        # TLS as distributed does it: from distributed.comm.tls.* and require-encryption
        # unless given; protocol None listens on tls:// when encryption is required.
        self.tls = TLSSettings.from_security() if tls is None else tls
        self.protocol = self.tls.listen_protocol(protocol)
        self.max_message_bytes = (
            max_message_size_from_config() if max_message_bytes is None else max_message_bytes
        )
        # A peer must complete its handshake within distributed.comm.timeouts.connect.
        self.handshake_timeout = float(
            parse_timedelta(dask.config.get("distributed.comm.timeouts.connect"))
        )
        if allowed_failures is None:
            allowed_failures = int(dask.config.get("distributed.scheduler.allowed-failures"))
        if worker_ttl is None:
            ttl = dask.config.get("distributed.scheduler.worker-ttl")
            worker_ttl = parse_timedelta(ttl) if ttl else None
        self.host = host
        self.port = port
        self.idle_timeout = idle_timeout
        self.worker_ttl = worker_ttl
        self.id = f"Scheduler-{uuid.uuid4()}"
        self.started = time.time()
        state = SchedulerState(
            killed_worker=killed_worker,
            allowed_failures=allowed_failures,
            wants=wanted_events(policy),
            bandwidth=dask_policy_config().bandwidth,
            transition_log_length=int(
                dask.config.get("distributed.admin.low-level-log-length")
            ),
        )
        config = {key: dask.config.get(key, default) for key, default in CONFIG_DEFAULTS.items()}
        self.core = Core(state, policy, default_extensions(config), validate=validate)
        self.state = state
        # Outgoing RPCs to tls:// workers and nannies present the scheduler certificate.
        self.pool = ConnectionPool(
            ssl_context=self.tls.connect_context, require_encryption=self.tls.require_encryption
        )
        self.reactor = Reactor(self.core, self.pool)
        lifecycle = self.core.extensions["lifecycle"]
        assert isinstance(lifecycle, Lifecycle)
        self.streams = Streams(
            self.reactor,
            StreamOps(self.reactor),
            lifecycle,
            lambda: heartbeat_interval(len(self.reactor.workers)),
        )
        self.data = DataProxy(self.reactor)
        task_stream = self.core.extensions["task-stream"]
        assert isinstance(task_stream, TaskStream)
        self.report = PerformanceReport(task_stream)
        self.forwarding = Forwarding(
            self.reactor,
            self.identity,
            lambda address: self.streams.remove_worker(
                address, expected=False, reason="restart-workers"
            ),
        )
        self._listener: Listener | None = None
        self._stopped = asyncio.Event()
        self._last_activity = time.time()
        # Worker, nanny and scheduler plugins; run_on_scheduler and feed (the facade).
        self.plugins = Plugins(self)
        self.streams.worker_plugins = self.plugins.worker_plugins
        self.remote_code = RemoteCode(self.plugins, self._stopped)
        # adaptive_target, workers_to_close, check_idle (RPCs and HTTP routes alike).
        self.adaptive = AdaptiveOps(state, self.plugins, self.started)
        self.rpc_ops = self._rpc_ops()
        # identity()["services"]: name -> port (Dask's "dashboard": the HTTP server).
        self.http = http
        self.services: dict[str, int] = {}
        # Awaited first when the scheduler closes (the preloads' teardown).
        self.close_hooks: list[Callable[[], Awaitable[None]]] = []

    @property
    def trace(self) -> Tracer | None:
        return self.reactor.trace

    @trace.setter
    def trace(self, recorder: Tracer | None) -> None:
        """``dsched scheduler --trace FILE``: the recorder sees policy rounds, flushes,
        graphs, workers and task results."""
        self.reactor.trace = recorder
        self.core.policy_observer = None if recorder is None else recorder.policy

    # ------------------------------------------------------------------ the op registry
    def _rpc_ops(self) -> dict[str, RpcOp]:
        ops: dict[str, RpcOp] = {
            "register-client": self._register_client,
            "register-worker": self._register_worker,
            "register_nanny": self._register_nanny,
            "close": self._close_comm,
            "identity": call(self.identity),
            "heartbeat_worker": call(self.heartbeat_worker),
            "unregister": call(self.unregister),
            "retry": call(self.retry),
            "versions": call(self.versions),
            "terminate": call(self.terminate),
            "dsched_info": call(self.dsched_info),
            "subscribe_worker_status": self._subscribe_worker_status,
        }
        providers: list[OpProvider] = [
            self.data,
            self.forwarding,
            self.plugins,
            self.remote_code,
            self.report,
            self.adaptive,
        ]
        served = [
            *(provider.rpc_ops().items() for provider in providers),
            ((op, self._extension_op(op)) for op in self.core.rpc_ops),
        ]
        for items in served:
            for op, handler in items:
                if op in ops:
                    raise ValueError(f"RPC op {op!r} is served twice")
                ops[op] = handler
        return ops

    def _extension_op(self, op: str) -> RpcOp:
        request = self.reactor.request

        async def handler(comm: Comm, args: dict[str, Any]) -> Any:
            # A parked request (a lock acquire that waits) whose caller leaves is dropped:
            # cancelling it tells the extension (Core.drop_request).
            answer = asyncio.ensure_future(request(op, comm.peer_address, args))
            lost = asyncio.ensure_future(comm.wait_lost())
            try:
                await asyncio.wait({answer, lost}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                lost.cancel()
            if not answer.done():
                answer.cancel()
                raise CommClosedError(f"{comm.peer_address} left while {op!r} was waiting")
            return answer.result()

        return handler

    # ------------------------------------------------------------------ lifecycle
    @property
    def address(self) -> str:
        if self._listener is None:
            raise RuntimeError("the scheduler has not started")
        return self._listener.address

    async def start(self) -> None:
        self._listener = await listen(
            self.host,
            self.port,
            self._on_comm,
            handshake_timeout=self.handshake_timeout,
            max_message_bytes=self.max_message_bytes,
            ssl_context=self.tls.listen_context if self.protocol == "tls" else None,
            require_encryption=self.tls.require_encryption,
        )
        if self.http is not None:
            self.services["dashboard"] = await self.http.start(self)
        self.reactor.spawn(self._watchdog())
        logger.info("dsched %s scheduler at %s", dsched.__version__, self.address)

    async def finished(self) -> None:
        await self._stopped.wait()

    async def close(self, reason: str = "scheduler-close") -> None:
        if self._stopped.is_set():
            return
        logger.info("closing the scheduler: %s", reason)
        for hook in self.close_hooks:  # preloads' dask_teardown (cli.py)
            await hook()
        await self.plugins.close()  # scheduler plugins' before_close and close hooks
        reactor = self.reactor
        reactor.flush()
        if reactor.trace is not None:
            reactor.trace.close()
        for address, record in list(reactor.workers.items()):
            with contextlib.suppress(CommClosedError, OSError):
                record.comm.write([{"op": "close", "reason": reason}, {"op": "close-stream"}])
            reactor.workers.pop(address, None)
        for comm in list(reactor.clients.values()):
            # Abort without a "stream-closed" message, as Dask does: on "stream-closed" a
            # Client stops listening but stays "running" with its futures pending forever;
            # a dropped connection makes it cancel them and try to reconnect.
            comm.abort()
        reactor.clients.clear()
        if self._listener is not None:
            await self._listener.stop()
        await self.pool.close()
        if self.http is not None:
            await self.http.stop()
        reactor.cancel_timers()
        self.streams.close()
        self._stopped.set()

    def write_scheduler_file(self, path: str) -> None:
        info = {
            "type": "Scheduler",
            "id": self.id,
            "address": self.address,
            "services": dict(self.services),
            "started": self.started,
            "workers": {},
        }
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(tmp, "w") as f:
            json.dump(info, f, indent=2)
        os.replace(tmp, path)  # readers never see a half-written file

    async def _watchdog(self) -> None:
        """Remove workers that stopped heartbeating; close when idle for idle_timeout."""
        while True:
            await asyncio.sleep(WATCHDOG_INTERVAL)
            now = time.time()
            workers = self.reactor.workers
            if self.worker_ttl:
                for address, record in list(workers.items()):
                    if now - record.last_seen > self.worker_ttl:
                        logger.warning(
                            "worker %s missed heartbeats for %.0f s",
                            address,
                            now - record.last_seen,
                        )
                        self.streams.remove_worker(
                            address, expected=False, reason="worker-ttl-timed-out"
                        )
            self.streams.freezer.when_idle(len(self.state.tasks))
            busy = self.reactor.clients or any(ws.processing for ws in self.state.workers.values())
            if busy:
                self._last_activity = now
            elif self.idle_timeout and now - self._last_activity > self.idle_timeout:
                logger.info("idle for %.0f s: shutting down", self.idle_timeout)
                await self.close(reason="idle-timeout")
                return

    # ------------------------------------------------------------------ connections
    async def _on_comm(self, comm: Comm) -> None:
        try:
            while True:
                request = await comm.read()
                if not isinstance(request, dict) or not isinstance(request.get("op"), str):
                    self._reject(
                        comm, f"expected a request dict with an 'op', got {request!r:.200}"
                    )
                    return
                op = request.pop("op")
                wants_reply = request.pop("reply", True)
                close_after = request.pop("close", False)
                request.pop("serializers", None)
                result = await self._call(op, request, comm)
                if result is TAKEN_OVER:
                    return
                if wants_reply:
                    comm.write(result)
                if close_after:
                    return
        except CommClosedError:
            pass
        except ProtocolError as exc:
            logger.warning(
                "protocol error from %s: %s; closing that connection", comm.peer_address, exc
            )
        finally:
            comm.abort()

    async def _call(self, op: str, request: dict[str, Any], comm: Comm) -> Any:
        handler = self.rpc_ops.get(op)
        if handler is None:
            logger.warning("unknown operation %r from %s", op, comm.peer_address)
            return error_reply(ValueError(f"dsched does not support the operation {op!r}"))
        try:
            return await handler(comm, request)
        except CommClosedError:
            raise  # the connection is gone: nobody to reply to
        except Exception as exc:
            logger.warning("operation %r from %s failed: %r", op, comm.peer_address, exc)
            return error_reply(exc)

    def _reject(self, comm: Comm, why: str) -> None:
        logger.warning("bad request from %s: %s; closing that connection", comm.peer_address, why)
        with contextlib.suppress(CommClosedError, OSError):
            comm.write(error_reply(ValueError(why)))

    async def _register_client(self, comm: Comm, request: dict[str, Any]) -> Any:
        await self.streams.client_stream(comm, request)
        return TAKEN_OVER

    async def _register_worker(self, comm: Comm, request: dict[str, Any]) -> Any:
        await self.streams.worker_stream(comm, request)
        return TAKEN_OVER

    async def _register_nanny(self, comm: Comm, request: dict[str, Any]) -> Any:
        async with self.plugins.nanny_starting() as nanny_plugins:
            comm.write({"status": "OK", "nanny-plugins": nanny_plugins})
            with contextlib.suppress(asyncio.TimeoutError, CommClosedError):
                await asyncio.wait_for(comm.read(), NANNY_STATUS_TIMEOUT)
        return TAKEN_OVER

    async def _subscribe_worker_status(self, comm: Comm, request: dict[str, Any]) -> Any:
        """Dask's ``subscribe_worker_status``: the reply is the identity (workers without
        ``metrics`` and ``last_seen``); from then on the comm carries the worker status feed
        (``ext/worker_status.py``) until it closes."""
        identity = self.identity()
        for worker in identity["workers"].values():
            worker.pop("metrics", None)
            worker.pop("last_seen", None)
        comm.write(identity)
        feed = f"worker-status-{uuid.uuid4()}"
        reactor = self.reactor
        reactor.feeds[feed] = comm
        reactor.stream(feed, "subscribe-worker-status", {})
        try:
            await comm.wait_lost()
        finally:
            del reactor.feeds[feed]
            reactor.handle(ev.ClientDisconnected(feed))  # the feed forgets its subscriber
        return TAKEN_OVER

    async def _close_comm(self, comm: Comm, request: dict[str, Any]) -> Any:
        comm.write("OK")
        return TAKEN_OVER

    # ------------------------------------------------------------------ the shell's RPCs
    def identity(self, n_workers: int = -1) -> dict[str, Any]:
        state_workers = self.state.workers
        workers = {}
        if n_workers:
            chosen = list(self.reactor.workers.items())
            if n_workers > 0:
                chosen = chosen[:n_workers]
            for address, record in chosen:
                ws = state_workers.get(address)
                if ws is None:
                    continue
                workers[address] = {
                    **worker_identity(ws),
                    "last_seen": record.last_seen,
                    "metrics": record.metrics,
                }
        return {
            "type": "Scheduler",
            "id": self.id,
            "address": self.address,
            "services": dict(self.services),
            "started": self.started,
            "n_workers": len(state_workers),
            "total_threads": sum(ws.nthreads for ws in state_workers.values()),
            "total_memory": sum(ws.memory_limit or 0 for ws in state_workers.values()),
            "workers": workers,
        }

    def heartbeat_worker(self, address: str, metrics: Any = None, **_: Any) -> dict[str, Any]:
        record = self.reactor.workers.get(address)
        now = time.time()
        if record is None:
            return {"status": "missing"}
        record.last_seen = now
        if metrics:
            record.metrics = metrics
            bandwidth = inbound.reported_bandwidth(metrics)
            if bandwidth is not None:
                self.reactor.handle(ev.BandwidthReported(address, bandwidth))
        return {
            "status": "OK",
            "time": now,
            "heartbeat-interval": heartbeat_interval(len(self.reactor.workers)),
        }

    def unregister(self, address: str, expected: bool = False, **_: Any) -> str:
        if address not in self.reactor.workers:
            return "already-removed"
        self.streams.remove_worker(address, expected=expected, reason="unregister")
        return "OK"

    def retry(self, keys: Iterable[Any], client: str | None = None) -> tuple[Any, ...]:
        return tuple(self.reactor.handle(ev.RetryKeys(client or "", inbound.keys(keys))) or ())

    def versions(self, packages: Iterable[str] | None = None) -> dict[str, Any]:
        from distributed.versions import get_versions

        return get_versions(packages=packages)

    async def terminate(self, **_: Any) -> str:
        self.reactor.spawn(self.close(reason="terminate"))
        return "OK"

    def dsched_info(self) -> dict[str, Any]:
        """dsched's own summary of its state (tests and tools use it)."""
        states: dict[str, int] = defaultdict(int)
        for ts in self.state.tasks.values():
            states[ts.state] += 1
        # Check every invariant once, on demand (tests ask this after injecting faults).
        try:
            self.state.validate()
            valid, invalid_reason = True, ""
        except InvariantError as exc:
            logger.error("validate() failed: %r", exc)
            valid, invalid_reason = False, repr(exc)[:2000]
        return {
            "tasks": len(self.state.tasks),
            "clients": len(self.reactor.clients),
            "workers": len(self.state.workers),
            "states": dict(states),
            "version": dsched.__version__,
            "valid": valid,
            "invalid_reason": invalid_reason,
            "rss": _rss_bytes(),
            # Transfer bandwidth estimate, bytes/s (configured, then from heartbeats).
            "bandwidth": self.state.bandwidth,
            "parked_requests": self.core.parked_requests,
            "p2p": self._p2p_info(),
        }

    def _p2p_info(self) -> dict[str, int]:
        """What the P2P extension still holds (all zero once every shuffle is forgotten)."""
        p2p = self.core.extensions["p2p"]
        assert isinstance(p2p, P2PShuffles)
        return {
            "active": len(p2p.active),
            "runs": sum(len(runs) for runs in p2p.runs.values()),
            "specs": len(p2p.specs),
            "pinned": len(p2p.original_restrictions),
            "barriers": len(p2p.barriers),
        }
