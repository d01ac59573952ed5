"""The scheduler server: the asyncio shell around the pure state machine and policy.

Theory of operation
-------------------
Every accepted connection starts as an RPC comm: read a request, call its handler, write the
reply. ``register-client`` and ``register-worker`` turn their comm into a long-lived batched
stream. Each stream message becomes a state event; ``SchedulerState.handle`` returns an
``Outbox`` which is merged into the tick's pending outbox, and the first message of a tick
schedules one ``_flush`` with ``call_soon``. The flush runs the policy on what accumulated
(the policy's dirty flag is "there are policy events"), feeds its decisions back into the
state machine, then writes each peer's messages as one batch. So messages are coalesced per
peer per loop iteration, and the policy runs at most once per iteration.

``update-graph`` is unpickled and materialized in a worker thread (``graph.intake``) so a big
graph does not stall heartbeats; the client's stream waits for it, which keeps that client's
messages in order while every other peer keeps being served.

The scheduler never deserializes user data: results (``gather``), scattered data and errors
pass through as opaque ``Serialized`` payloads.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import random
import time
import uuid
from collections import defaultdict
from collections.abc import Awaitable, Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import dask
from dask.utils import parse_timedelta

import dsched
from dsched.comm import CommClosedError, ConnectionPool, TLSSettings, listen
from dsched.comm.tcp import Comm, Listener
from dsched.graph import GraphIntakeError, intake_update_graph
from dsched.policy.protocol import Policy, wanted_events
from dsched.server.errors import error_reply, killed_worker, pickled_exception
from dsched.server.policy_process import dask_policy_config
from dsched.state import events as ev
from dsched.state.machine import SchedulerState
from dsched.state.outbox import Outbox
from dsched.trace import TraceRecorder
from dsched.wire import ProtocolError

logger = logging.getLogger("dsched.scheduler")

# Dask's heartbeat schedule: workers heartbeat more slowly as the cluster grows.
_HEARTBEAT_STEPS = ((10, 0.5), (50, 1.0), (200, 2.0))


def heartbeat_interval(n_workers: int) -> float:
    for limit, interval in _HEARTBEAT_STEPS:
        if n_workers <= limit:
            return interval
    return n_workers / 200 + 1


# The largest message a peer may send (frames and header together). Dask has no such cap;
# dsched cuts off a peer announcing more before buffering any of it. Set with the Dask
# config key ``dsched.max-message-size`` (environment: DASK_DSCHED__MAX_MESSAGE_SIZE=64MiB)
# or ``dsched scheduler --max-message-size 64MiB``.
MAX_MESSAGE_SIZE_KEY = "dsched.max-message-size"
DEFAULT_MAX_MESSAGE_SIZE = "2GiB"


def max_message_size_from_config() -> int:
    from dask.utils import parse_bytes

    return int(parse_bytes(dask.config.get(MAX_MESSAGE_SIZE_KEY, DEFAULT_MAX_MESSAGE_SIZE)))


def _key(value: Any) -> Any:
    """A Dask key off the wire (str, bytes, int, float, or tuples of those), else ValueError.

    Checked at the edge so that a peer's garbage never reaches the state machine, where an
    unhashable "key" could fail half-way through a step.
    """
    if type(value) is str:  # nearly every key: skip the walk
        return value
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, tuple):
            stack.extend(item)
        elif not isinstance(item, str | bytes | int | float):
            raise ValueError(f"not a valid key: {value!r:.200}")
    return value


def _keys(value: Any) -> list[Any]:
    if not isinstance(value, list | tuple | set | frozenset):
        raise ValueError(f"expected a list of keys, got {value!r:.200}")
    return [_key(k) for k in value]


def _registration_problem(request: dict[str, Any]) -> str | None:
    """What is wrong with a register-worker request's fields, or None if they are usable."""
    address = request.get("address")
    if not isinstance(address, str) or "://" not in address:
        return f"register-worker needs an address like tcp://host:port, got {address!r:.100}"
    nthreads = request.get("nthreads", 1)
    if nthreads is not None and (not isinstance(nthreads, int) or nthreads < 0):
        return f"nthreads must be a non-negative int, got {nthreads!r:.100}"
    memory_limit = request.get("memory_limit")
    if memory_limit is not None and not isinstance(memory_limit, int | float):
        return f"memory_limit must be a number, got {memory_limit!r:.100}"
    resources = request.get("resources") or {}
    if not isinstance(resources, dict) or not all(
        isinstance(k, str) and isinstance(v, int | float) for k, v in resources.items()
    ):
        return f"resources must map names to numbers, got {resources!r:.100}"
    name = request.get("name")
    if name is not None and not isinstance(name, str | int | float):
        return f"name must be a string or number, got {name!r:.100}"
    status = request.get("status")
    if status is not None and not isinstance(status, str):
        return f"status must be a string, got {status!r:.100}"
    return None


def _client_id(msg: dict[str, Any], default: str) -> str:
    """The client a stream message speaks for: the stream's, or a pseudo-client it names."""
    client = msg.get("client", default)
    if not isinstance(client, str):
        raise ValueError(f"client must be a string, got {client!r:.200}")
    return client


def _rss_bytes() -> int:
    """This process's resident set size (for soak reports); 0 if unknown."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def compute_duration(startstops: Iterable[Any]) -> float | None:
    total = None
    for entry in startstops or ():
        if isinstance(entry, dict) and entry.get("action") == "compute":
            total = (total or 0.0) + float(entry["stop"]) - float(entry["start"])
    return total


def _reported_bandwidth(metrics: Any) -> float | None:
    """A heartbeat's ``metrics["bandwidth"]["total"]`` (the worker's transfer bandwidth
    estimate, bytes/s) if it is a positive number, else None."""
    bandwidth = metrics.get("bandwidth") if isinstance(metrics, dict) else None
    total = bandwidth.get("total") if isinstance(bandwidth, dict) else None
    if isinstance(total, int | float) and not isinstance(total, bool) and total > 0:
        return float(total)
    return None


class WorkerRecord:
    """What the shell keeps per worker besides the state machine's view: its stream and the
    details ``identity`` reports."""

    __slots__ = ("comm", "info", "last_seen", "metrics", "nanny")

    def __init__(self, comm: Comm, info: dict[str, Any], now: float) -> None:
        self.comm = comm
        self.info = info
        self.nanny = info.get("nanny")
        self.last_seen = now
        self.metrics: dict[str, Any] = info.get("metrics") or {}


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
    ) -> None:
        # TLS as distributed does it: from distributed.comm.tls.* and require-encryption
        # unless given; protocol None listens on tls:// when encryption is required.
        self.tls = TLSSettings.from_security() if tls is None else tls
        self.protocol = self.tls.listen_protocol(protocol)
        if max_message_bytes is None:
            max_message_bytes = max_message_size_from_config()
        # A peer must complete its handshake within distributed.comm.timeouts.connect.
        self.handshake_timeout = float(
            parse_timedelta(dask.config.get("distributed.comm.timeouts.connect"))
        )
        self.max_message_bytes = max_message_bytes
        if allowed_failures is None:
            allowed_failures = int(dask.config.get("distributed.scheduler.allowed-failures"))
        if worker_ttl is None:
            ttl = dask.config.get("distributed.scheduler.worker-ttl")
            worker_ttl = parse_timedelta(ttl) if ttl else None
        self.state = SchedulerState(
            killed_worker=killed_worker,
            allowed_failures=allowed_failures,
            wants=wanted_events(policy),
            bandwidth=dask_policy_config().bandwidth,
        )
        self.policy = policy
        self.host = host
        self.port = port
        self.idle_timeout = idle_timeout
        self.worker_ttl = worker_ttl
        self.validate = validate
        # Per-task trace recorder (dsched.trace), set by `dsched scheduler --trace FILE`.
        self.trace: TraceRecorder | None = None
        self.id = f"Scheduler-{uuid.uuid4()}"
        self.started = time.time()
        self.workers: dict[str, WorkerRecord] = {}
        self.clients: dict[str, Comm] = {}
        self.subscriptions: dict[str, set[str]] = defaultdict(set)  # topic -> client ids
        self.events: dict[str, list[tuple[float, Any]]] = defaultdict(list)
        # Outgoing RPCs to tls:// workers and nannies present the scheduler certificate.
        self.pool = ConnectionPool(
            ssl_context=self.tls.connect_context, require_encryption=self.tls.require_encryption
        )
        self._intake = ThreadPoolExecutor(1, thread_name_prefix="dsched-graph-intake")
        self._pending = Outbox()
        self._flush_scheduled = False
        self._listener: Listener | None = None
        self._background: set[asyncio.Task[Any]] = set()
        self._stopped = asyncio.Event()
        self._last_activity = time.time()
        self._restarts = 0  # graphs whose intake straddles a restart are dropped
        self._restarting = False
        self.rpc_handlers: dict[str, Callable[..., Any]] = {
            "identity": self.identity,
            "register_nanny": self.register_nanny,
            "heartbeat_worker": self.heartbeat_worker,
            "unregister": self.unregister,
            "gather": self.gather,
            "scatter": self.scatter,
            "update_data": self.update_data,
            "who_has": self.who_has,
            "has_what": self.has_what,
            "ncores": self.ncores,
            "nthreads": self.ncores,
            "ncores_running": self.ncores_running,
            "nbytes": self.nbytes,
            "processing": self.processing,
            "broadcast": self.broadcast,
            "retry": self.retry,
            "log_event": self.log_event,
            "events": self.get_events,
            "versions": self.versions,
            "terminate": self.terminate,
            "restart": self.restart,
            "retire_workers": self.retire_workers,
            "dsched_info": self.dsched_info,
        }
        self.client_stream_handlers: dict[str, Callable[[str, dict[str, Any]], None]] = {
            "client-desires-keys": self._client_desires_keys,
            "client-releases-keys": self._client_releases_keys,
            "cancel-keys": self._cancel_keys,
            "report-key": self._report_key,
            "close-client": self._close_client,
            "update-data": self._update_data_stream,
            "subscribe-topic": self._subscribe_topic,
            "unsubscribe-topic": self._unsubscribe_topic,
            "heartbeat-client": self._heartbeat_client,
        }
        self.worker_stream_handlers: dict[str, Callable[[str, dict[str, Any]], None]] = {
            "task-finished": self._task_finished,
            "task-erred": self._task_erred,
            "release-worker-data": self._release_worker_data,
            "add-keys": self._add_keys,
            "request-refresh-who-has": self._request_refresh_who_has,
            "long-running": self._long_running,
            "reschedule": self._reschedule,
            "worker-status-change": self._worker_status_change,
            "log-event": self._log_event_stream,
            "keep-alive": lambda worker, msg: None,
            "steal-response": self._steal_response,
        }

    # ------------------------------------------------------------------ lifecycle
    @property
    def address(self) -> str:
        assert self._listener is not None, "the scheduler has not started"
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
        self._spawn(self._watchdog())
        logger.info("dsched %s scheduler at %s", dsched.__version__, self.address)

    async def finished(self) -> None:
        await self._stopped.wait()

    async def close(self, reason: str = "scheduler-close") -> None:
        if self._stopped.is_set():
            return
        logger.info("closing the scheduler: %s", reason)
        self._flush()
        if self.trace is not None:
            self.trace.close()
        for address, record in list(self.workers.items()):
            with contextlib.suppress(CommClosedError, OSError):
                record.comm.write([{"op": "close", "reason": reason}, {"op": "close-stream"}])
            self.workers.pop(address, None)
        for comm in list(self.clients.values()):
            # Abort without a "stream-closed" message, as Dask does: on "stream-closed" a
            # Client stops listening but stays "running" with its futures pending forever;
            # a dropped connection makes it cancel them and try to reconnect.
            comm.abort()
        self.clients.clear()
        if self._listener is not None:
            await self._listener.stop()
        await self.pool.close()
        for task in list(self._background):
            task.cancel()
        self._intake.shutdown(wait=False, cancel_futures=True)
        self._stopped.set()

    def write_scheduler_file(self, path: str) -> None:
        info = {
            "type": "Scheduler",
            "id": self.id,
            "address": self.address,
            "services": {},
            "started": self.started,
            "workers": {},
        }
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(tmp, "w") as f:
            json.dump(info, f, indent=2)
        os.replace(tmp, path)  # readers never see a half-written file

    def _spawn(self, coro: Awaitable[Any]) -> None:
        task = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _watchdog(self) -> None:
        """Remove workers that stopped heartbeating; close when idle for idle_timeout."""
        while True:
            await asyncio.sleep(1.0)
            now = time.time()
            if self.worker_ttl:
                for address, record in list(self.workers.items()):
                    if now - record.last_seen > self.worker_ttl:
                        logger.warning(
                            "worker %s missed heartbeats for %.0f s",
                            address,
                            now - record.last_seen,
                        )
                        self._remove_worker(address, expected=False, reason="worker-ttl-timed-out")
            busy = self.clients or any(ws.processing for ws in self.state.workers.values())
            if busy:
                self._last_activity = now
            elif self.idle_timeout and now - self._last_activity > self.idle_timeout:
                logger.info("idle for %.0f s: shutting down", self.idle_timeout)
                await self.close(reason="idle-timeout")
                return

    # ------------------------------------------------------------------ state + policy
    def _handle(self, event: ev.Event) -> Outbox:
        out = self.state.handle(event, time.time(), self._pending)
        if self.validate:
            self.state.validate()
        if not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)
        return out

    def _flush(self) -> None:
        self._flush_scheduled = False
        out = self._pending
        self._pending = Outbox()
        now = time.time()
        while out.policy:
            policy_events, out.policy = out.policy, []
            decisions = self.policy.handle(policy_events, now)
            if self.trace is not None:
                self.trace.policy(policy_events, decisions, now)
            if decisions:
                self.state.handle(ev.PolicyDecisions(decisions), now, out)
                if self.validate:
                    self.state.validate()
        for level, text in out.logs:
            logger.log(logging.getLevelName(level.upper()), text)
        for address, msgs in out.to_workers.items():
            record = self.workers.get(address)
            if record is not None:
                self._write(record.comm, msgs)
        for client, msgs in out.to_clients.items():
            comm = self.clients.get(client)
            if comm is not None:
                self._write(comm, msgs)
        if self.trace is not None:
            self.trace.outbox(out, time.time())
        for address in out.close_workers:
            # In-flight RPCs to a removed worker (a gather from a frozen worker, say) fail
            # now rather than hang: gather then tries other holders or reports the keys lost.
            self.pool.discard(address)
            record = self.workers.pop(address, None)
            if record is not None:
                self._write(record.comm, [{"op": "close", "reason": "scheduler-remove-worker"}])
                self._spawn(record.comm.close())

    @staticmethod
    def _write(comm: Comm, msg: Any) -> None:
        try:
            comm.write(msg)
        except (CommClosedError, OSError):
            pass  # the reader side of this comm notices and cleans up
        except ProtocolError:
            logger.exception("could not encode a message for %s", comm.peer_address)

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
                if op == "register-client":
                    await self._client_stream(comm, request)
                    return
                if op == "register-worker":
                    await self._worker_stream(comm, request)
                    return
                if op == "close":
                    if wants_reply:
                        comm.write("OK")
                    return
                result = await self._call(op, request, comm)
                if wants_reply:
                    comm.write(result)
                if op == "register_nanny":
                    # The nanny writes one status message on this comm once its worker is up.
                    with contextlib.suppress(asyncio.TimeoutError, CommClosedError):
                        await asyncio.wait_for(comm.read(), 60)
                    return
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
        handler = self.rpc_handlers.get(op)
        if handler is None:
            logger.warning("unknown operation %r from %s", op, comm.peer_address)
            return error_reply(ValueError(f"dsched does not support the operation {op!r}"))
        try:
            result = handler(**request)
            if asyncio.iscoroutine(result):
                result = await result
            return result
        except Exception as exc:
            logger.warning("operation %r from %s failed: %r", op, comm.peer_address, exc)
            return error_reply(exc)

    def _reject(self, comm: Comm, why: str) -> None:
        logger.warning("bad request from %s: %s; closing that connection", comm.peer_address, why)
        with contextlib.suppress(CommClosedError, OSError):
            comm.write(error_reply(ValueError(why)))

    @staticmethod
    def _stream_messages(batch: Any) -> list[dict[str, Any]]:
        """A stream read is a list of message dicts; a bare dict or "OK" are allowed too."""
        if isinstance(batch, dict):
            return [batch]
        if batch == "OK":
            return []
        if isinstance(batch, list | tuple) and all(isinstance(m, dict) for m in batch):
            return list(batch)
        raise ValueError(f"expected a list of message dicts, got {batch!r:.200}")

    async def _run_stream(
        self,
        comm: Comm,
        peer: str,
        handlers: dict[str, Callable[[str, dict[str, Any]], None]],
        special: Callable[[str, dict[str, Any]], Awaitable[None]] | None = None,
    ) -> None:
        """Read a batched stream until it closes, dispatching each message in order."""
        while True:
            batch = await comm.read()
            try:
                messages = self._stream_messages(batch)
            except ValueError as exc:
                self._stream_error(comm, peer, str(exc))
                return
            for msg in messages:
                op = msg.get("op")
                if op == "close-stream":
                    return
                if special is not None and op == "update-graph":
                    await special(peer, msg)
                    continue
                handler = handlers.get(op)  # type: ignore[arg-type]
                if handler is None:
                    logger.info("ignoring unknown stream op %r from %s", op, peer)
                    continue
                try:
                    handler(peer, msg)
                except Exception as exc:
                    logger.exception("stream op %r from %s failed", op, peer)
                    self._stream_error(comm, peer, f"{op!r} failed: {exc!r}", close=False)

    def _stream_error(self, comm: Comm, peer: str, why: str, close: bool = True) -> None:
        logger.warning("bad stream message from %s: %s", peer, why)
        with contextlib.suppress(CommClosedError, OSError):
            comm.write([{"op": "error", "exception": why}])
        if close:
            comm.abort()

    # ------------------------------------------------------------------ clients
    async def _client_stream(self, comm: Comm, request: dict[str, Any]) -> None:
        client = str(request.get("client"))
        comm.name = f"client {client}"
        # The first write must be exactly this list: the Client asserts on it.
        comm.write([{"op": "stream-start"}])
        self.clients[client] = comm
        self._handle(ev.ClientConnected(client))
        logger.info("client %s connected from %s", client, comm.peer_address)
        try:
            await self._run_stream(comm, client, self.client_stream_handlers, self._update_graph)
        finally:
            if self.clients.get(client) is comm:
                del self.clients[client]
                for subscribers in self.subscriptions.values():
                    subscribers.discard(client)
                self._handle(ev.ClientDisconnected(client))
                logger.info("client %s disconnected", client)

    async def _update_graph(self, client: str, msg: dict[str, Any]) -> None:
        keys = list(msg.get("keys") or ())
        arrived = time.time()
        restarts_before = self._restarts
        loop = asyncio.get_running_loop()
        try:
            intake = await loop.run_in_executor(self._intake, intake_update_graph, msg)
        except GraphIntakeError as exc:
            logger.info("graph from %s failed: %r", client, exc.exception)
            self._handle(ev.GraphFailed(client, keys, pickled_exception(exc.exception), None))
            return
        except Exception as exc:
            logger.exception("graph intake from %s failed", client)
            self._handle(ev.GraphFailed(client, keys, pickled_exception(exc), None))
            return
        fifo_timeout = msg.get("fifo_timeout", 0)
        if self._restarting or self._restarts != restarts_before:
            # A restart overtook this graph (the RPC travels on another comm, and the stream
            # batches for up to 10 ms; the client blocks in restart() until it returns, so a
            # graph arriving meanwhile was sent before it): the client has cancelled these
            # futures and forgotten them, so nobody would ever release them.
            logger.info("dropping a graph from %s submitted before a restart", client)
            return
        self._handle(
            ev.GraphReceived(
                client,
                list(intake.tasks.values()),
                keys,
                intake.order,
                user_priority=msg.get("user_priority") or 0,
                fifo_timeout=parse_timedelta(fifo_timeout) if fifo_timeout else 0.0,
                submitting_task=msg.get("submitting_task"),
            )
        )
        if self.trace is not None:
            self.trace.graph(client, intake, keys, arrived, time.time())

    def _client_desires_keys(self, client: str, msg: dict[str, Any]) -> None:
        self._handle(ev.ClientDesiresKeys(_client_id(msg, client), _keys(msg["keys"])))

    def _client_releases_keys(self, client: str, msg: dict[str, Any]) -> None:
        self._handle(ev.ClientReleasesKeys(_client_id(msg, client), _keys(msg["keys"])))

    def _cancel_keys(self, client: str, msg: dict[str, Any]) -> None:
        self._handle(
            ev.CancelKeys(
                _client_id(msg, client),
                _keys(msg["keys"]),
                force=bool(msg.get("force")),
                reason=msg.get("reason"),
                msg=msg.get("msg"),
            )
        )

    def _report_key(self, client: str, msg: dict[str, Any]) -> None:
        self._handle(ev.ReportKey(_client_id(msg, client), _key(msg["key"])))

    def _close_client(self, client: str, msg: dict[str, Any]) -> None:
        self._handle(ev.ClientDisconnected(client))

    def _update_data_stream(self, client: str, msg: dict[str, Any]) -> None:
        self.update_data(msg["who_has"], msg.get("nbytes", {}), _client_id(msg, client))

    def _subscribe_topic(self, client: str, msg: dict[str, Any]) -> None:
        self.subscriptions[str(msg["topic"])].add(client)

    def _unsubscribe_topic(self, client: str, msg: dict[str, Any]) -> None:
        self.subscriptions[str(msg["topic"])].discard(client)

    def _heartbeat_client(self, client: str, msg: dict[str, Any]) -> None:
        pass  # the stream being alive is all we need to know

    # ------------------------------------------------------------------ workers
    async def _worker_stream(self, comm: Comm, request: dict[str, Any]) -> None:
        now = time.time()
        problem = _registration_problem(request)
        if problem is not None:
            logger.warning("rejecting register-worker from %s: %s", comm.peer_address, problem)
            comm.write({"status": "error", "message": problem, "time": now})
            return
        address = str(request["address"])
        comm.name = f"worker {address}"
        name = request.get("name", address)
        taken = {str(r.info.get("name")) for r in self.workers.values()}
        if address in self.workers or str(name) in taken:
            comm.write(
                {
                    "status": "error",
                    "message": f"name taken, {name}"
                    if str(name) in taken
                    else f"address taken, {address}",
                    "time": now,
                }
            )
            return
        info = dict(request)
        record = WorkerRecord(comm, info, now)
        self.workers[address] = record
        self._handle(
            ev.WorkerConnected(
                address,
                int(request.get("nthreads") or 1),
                name=name,
                memory_limit=request.get("memory_limit"),
                resources=request.get("resources") or {},
                status=str(request.get("status") or "running"),
            )
        )
        if self.trace is not None:
            self.trace.worker(address, int(request.get("nthreads") or 1), now)
        comm.write(
            {
                "status": "OK",
                "time": now,
                "heartbeat-interval": heartbeat_interval(len(self.workers)),
                "worker-plugins": {},
            }
        )
        logger.info("worker %s registered (%s threads)", address, request.get("nthreads"))
        expected = False
        try:
            await self._run_stream(comm, address, self.worker_stream_handlers)
            expected = True  # the worker said close-stream: it is leaving on purpose
        finally:
            if self.workers.get(address) is record:
                self._remove_worker(address, expected=expected, reason="worker-closed")

    def _remove_worker(self, address: str, *, expected: bool, reason: str) -> None:
        record = self.workers.get(address)
        if record is None:
            return
        logger.info("removing worker %s (%s)", address, reason)
        self._handle(ev.WorkerDisconnected(address, expected=expected, stimulus_id=reason))

    def _task_finished(self, worker: str, msg: dict[str, Any]) -> None:
        if self.trace is not None:
            self.trace.task_finished(worker, msg, time.time())
        self._handle(
            ev.TaskFinished(
                worker,
                _key(msg["key"]),
                msg.get("run_id"),
                int(msg.get("nbytes") or 0),
                msg.get("type"),
                compute_duration(msg.get("startstops", ())),
            )
        )

    def _task_erred(self, worker: str, msg: dict[str, Any]) -> None:
        if self.trace is not None:
            self.trace.task_erred(worker, msg, time.time())
        self._handle(
            ev.TaskErred(
                worker,
                _key(msg["key"]),
                msg.get("run_id"),
                msg.get("exception"),
                msg.get("traceback"),
                str(msg.get("exception_text", "")),
                str(msg.get("traceback_text", "")),
            )
        )

    def _release_worker_data(self, worker: str, msg: dict[str, Any]) -> None:
        self._handle(ev.ReleaseWorkerData(worker, _key(msg["key"])))

    def _add_keys(self, worker: str, msg: dict[str, Any]) -> None:
        self._handle(ev.AddKeys(worker, _keys(msg.get("keys", ()))))

    def _request_refresh_who_has(self, worker: str, msg: dict[str, Any]) -> None:
        self._handle(ev.RequestRefreshWhoHas(worker, _keys(msg["keys"])))

    def _long_running(self, worker: str, msg: dict[str, Any]) -> None:
        self._handle(ev.LongRunning(worker, _key(msg["key"]), msg.get("run_id")))

    def _reschedule(self, worker: str, msg: dict[str, Any]) -> None:
        self._handle(ev.Reschedule(msg.get("worker", worker), _key(msg["key"])))

    def _steal_response(self, worker: str, msg: dict[str, Any]) -> None:
        state = msg.get("state")
        self._handle(
            ev.StealResponse(
                worker,
                _key(msg["key"]),
                None if state is None else str(state),
                str(msg.get("stimulus_id", "")),
            )
        )

    def _worker_status_change(self, worker: str, msg: dict[str, Any]) -> None:
        self._handle(ev.WorkerStatusChanged(worker, str(msg["status"])))

    def _log_event_stream(self, worker: str, msg: dict[str, Any]) -> None:
        self.log_event(msg["topic"], msg["msg"])

    # ------------------------------------------------------------------ RPC handlers
    def identity(self, n_workers: int = -1) -> dict[str, Any]:
        state_workers = self.state.workers
        workers = {}
        if n_workers:
            chosen = list(self.workers.items())
            if n_workers > 0:
                chosen = chosen[:n_workers]
            for address, record in chosen:
                ws = state_workers.get(address)
                if ws is None:
                    continue
                info = record.info
                workers[address] = {
                    "type": "Worker",
                    "id": info.get("server_id", address),
                    "host": ws.host,
                    "resources": ws.resources,
                    "local_directory": info.get("local_directory", ""),
                    "name": ws.name,
                    "nthreads": ws.nthreads,
                    "memory_limit": ws.memory_limit,
                    "last_seen": record.last_seen,
                    "services": info.get("services", {}),
                    "metrics": record.metrics,
                    "status": ws.status,
                    "nanny": record.nanny,
                }
        return {
            "type": "Scheduler",
            "id": self.id,
            "address": self.address,
            "services": {},
            "started": self.started,
            "n_workers": len(state_workers),
            "total_threads": sum(ws.nthreads for ws in state_workers.values()),
            "total_memory": sum(ws.memory_limit or 0 for ws in state_workers.values()),
            "workers": workers,
        }

    def register_nanny(self, address: str | None = None) -> dict[str, Any]:
        return {"status": "OK", "nanny-plugins": {}}

    def heartbeat_worker(self, address: str, metrics: Any = None, **_: Any) -> dict[str, Any]:
        record = self.workers.get(address)
        now = time.time()
        if record is None:
            return {"status": "missing"}
        record.last_seen = now
        if metrics:
            record.metrics = metrics
            bandwidth = _reported_bandwidth(metrics)
            if bandwidth is not None:
                self._handle(ev.BandwidthReported(address, bandwidth))
        return {
            "status": "OK",
            "time": now,
            "heartbeat-interval": heartbeat_interval(len(self.workers)),
        }

    def unregister(self, address: str, expected: bool = False, **_: Any) -> str:
        if address not in self.workers:
            return "already-removed"
        self._remove_worker(address, expected=expected, reason="unregister")
        return "OK"

    async def gather(self, keys: Iterable[Any], **_: Any) -> dict[str, Any]:
        keys = list(keys)
        holders: dict[Any, list[str]] = {}
        missing = []
        for key in keys:
            ts = self.state.tasks.get(key)
            if ts is None or not ts.who_has:
                missing.append(key)
            else:
                holders[key] = [ws.address for ws in ts.who_has]
        if missing:
            return {"status": "error", "keys": missing}
        data: dict[Any, Any] = {}
        for _attempt in range(3):
            by_worker: dict[str, list[Any]] = defaultdict(list)
            for key, addresses in holders.items():
                if key not in data and addresses:
                    by_worker[random.choice(addresses)].append(key)
            if not by_worker:
                break
            replies = await asyncio.gather(
                *(self._get_data(address, ks) for address, ks in by_worker.items())
            )
            for (address, ks), reply in zip(by_worker.items(), replies, strict=True):
                data.update(reply)
                for key in ks:
                    if key not in reply:
                        holders[key].remove(address)
        failed = [key for key in keys if key not in data]
        if failed:
            logger.warning("could not gather %d keys, e.g. %r", len(failed), failed[0])
            return {"status": "error", "keys": failed}
        return {"status": "OK", "data": data}

    async def _get_data(self, address: str, keys: list[Any]) -> dict[Any, Any]:
        """Fetch keys from one worker; the payloads stay opaque Serialized objects."""
        for delay in (0.0, 0.05, 0.2, 0.5):
            await asyncio.sleep(delay)
            try:
                async with self.pool.connection(address) as comm:
                    comm.write({"op": "get_data", "keys": keys, "who": None, "reply": True})
                    reply = await comm.read()
                    if isinstance(reply, dict) and reply.get("status") == "OK":
                        comm.write("OK")  # get_data's second step: the worker waits for it
                        return dict(reply.get("data") or {})
                    if isinstance(reply, dict) and reply.get("status") == "busy":
                        continue
                    return {}
            except (OSError, CommClosedError, ProtocolError) as exc:
                logger.info("get_data from %s failed: %r", address, exc)
                return {}
        return {}

    async def scatter(
        self,
        data: dict[Any, Any],
        workers: Iterable[str] | None = None,
        client: str | None = None,
        broadcast: bool | int = False,
        timeout: float = 2,
        **_: Any,
    ) -> list[Any]:
        deadline = time.time() + (parse_timedelta(timeout) if timeout else 0)
        while True:
            candidates = self._running_workers(workers)
            if candidates or time.time() > deadline:
                break
            await asyncio.sleep(0.05)
        if not candidates:
            raise TimeoutError("No valid workers found")
        keys = list(data)
        placement: dict[str, dict[Any, Any]] = defaultdict(dict)
        if broadcast:
            count = len(candidates) if broadcast is True else min(int(broadcast), len(candidates))
            for key in keys:
                for address in candidates[:count]:
                    placement[address][key] = data[key]
        else:
            for i, key in enumerate(keys):
                placement[candidates[i % len(candidates)]][key] = data[key]
        who_has: dict[Any, list[str]] = defaultdict(list)
        nbytes: dict[Any, int] = {}

        async def send(address: str, payload: dict[Any, Any]) -> None:
            reply = await self.pool.rpc(
                address,
                {"op": "update_data", "data": payload, "stimulus_id": f"scatter-{time.time()}"},
            )
            if not isinstance(reply, dict) or reply.get("status") != "OK":
                raise RuntimeError(f"scatter to {address} failed: {reply!r:.200}")
            nbytes.update(reply.get("nbytes") or {})
            for key in payload:
                who_has[key].append(address)

        await asyncio.gather(*(send(a, p) for a, p in placement.items()))
        self.update_data(who_has, nbytes, client)
        return keys

    def _running_workers(self, restrict: Iterable[str] | None) -> list[str]:
        wanted = None if restrict is None else {str(w) for w in restrict}
        return [
            ws.address
            for ws in self.state.workers.values()
            if ws.status == "running"
            and (
                wanted is None
                or ws.address in wanted
                or ws.host in wanted
                or str(ws.name) in wanted
            )
        ]

    def update_data(
        self, who_has: dict[Any, Any], nbytes: dict[Any, int], client: str | None = None, **_: Any
    ) -> None:
        if not isinstance(who_has, dict) or not isinstance(nbytes, dict):
            raise ValueError("who_has and nbytes must be maps")
        placed = {_key(k): [str(a) for a in _keys(v)] for k, v in who_has.items()}
        sizes = {_key(k): int(v) for k, v in nbytes.items()}
        if client is not None and not isinstance(client, str):
            raise ValueError(f"client must be a string, got {client!r:.200}")
        self._handle(ev.DataPlaced(client, placed, sizes))

    def who_has(self, keys: Iterable[Any] | None = None) -> dict[Any, list[str]]:
        tasks = self.state.tasks
        if keys is None:
            keys = list(tasks)
        return {
            key: [ws.address for ws in tasks[key].who_has] if key in tasks else [] for key in keys
        }

    def has_what(self, workers: Iterable[str] | None = None) -> dict[str, list[Any]]:
        state_workers = self.state.workers
        if workers is None:
            workers = list(state_workers)
        return {
            w: [ts.key for ts in state_workers[w].has_what] if w in state_workers else []
            for w in workers
        }

    def ncores(self, workers: Iterable[str] | None = None) -> dict[str, int]:
        state_workers = self.state.workers
        if workers is None:
            workers = list(state_workers)
        return {w: state_workers[w].nthreads for w in workers if w in state_workers}

    def ncores_running(self, workers: Iterable[str] | None = None) -> dict[str, int]:
        running = self._running_workers(None)
        return {w: n for w, n in self.ncores(workers).items() if w in running}

    def nbytes(self, keys: Iterable[Any] | None = None, summary: bool = True) -> dict[Any, int]:
        tasks = self.state.tasks
        if keys is None:
            keys = [k for k, ts in tasks.items() if ts.who_has]
        result = {k: tasks[k].nbytes for k in keys if k in tasks}
        if summary:
            from dask.utils import key_split

            totals: dict[str, int] = defaultdict(int)
            for key, size in result.items():
                totals[key_split(key)] += size
            return dict(totals)
        return result

    def processing(self, workers: Iterable[str] | None = None) -> dict[str, list[Any]]:
        state_workers = self.state.workers
        if workers is None:
            workers = list(state_workers)
        return {
            w: [ts.key for ts in state_workers[w].processing] if w in state_workers else []
            for w in workers
        }

    async def broadcast(
        self,
        msg: dict[str, Any],
        workers: Iterable[str] | None = None,
        hosts: Iterable[str] | None = None,
        nanny: bool = False,
        on_error: str = "raise",
        **_: Any,
    ) -> dict[str, Any]:
        addresses = list(self.state.workers) if workers is None else [str(w) for w in workers]
        if hosts is not None:
            host_set = {str(h) for h in hosts}
            addresses += [ws.address for ws in self.state.workers.values() if ws.host in host_set]
        targets: dict[str, str] = {}
        for address in dict.fromkeys(addresses):
            record = self.workers.get(address)
            if record is None:
                continue
            target = record.nanny if nanny else address
            if target:
                targets[address] = target

        async def send(target: str) -> Any:
            try:
                return await self.pool.rpc(target, dict(msg))
            except Exception as exc:
                if on_error == "raise":
                    raise
                if on_error == "return":
                    return exc
                if on_error == "return_pickle":
                    return pickled_exception(exc)
                return None

        replies = await asyncio.gather(*(send(t) for t in targets.values()))
        return {
            address: reply
            for address, reply in zip(targets, replies, strict=True)
            if not (on_error == "ignore" and reply is None)
        }

    def retry(self, keys: Iterable[Any], client: str | None = None) -> tuple[Any, ...]:
        out = self._handle(ev.RetryKeys(client or "", list(keys)))
        return tuple(out.reply or ())

    def log_event(self, topic: str | Iterable[str], msg: Any) -> None:
        now = time.time()
        topics = [topic] if isinstance(topic, str) else list(topic)
        for name in topics:
            self.events[name].append((now, msg))
            del self.events[name][:-10_000]  # bounded history
            for client in self.subscriptions.get(name, ()):
                comm = self.clients.get(client)
                if comm is not None:
                    self._write(comm, [{"op": "event", "topic": name, "event": (now, msg)}])

    def get_events(self, topic: str | None = None) -> Any:
        if topic is not None:
            return tuple(self.events.get(topic, ()))
        return {name: tuple(items) for name, items in self.events.items()}

    def versions(self, packages: Iterable[str] | None = None) -> dict[str, Any]:
        from distributed.versions import get_versions

        return get_versions(packages=packages)

    async def terminate(self, **_: Any) -> str:
        self._spawn(self.close(reason="terminate"))
        return "OK"

    async def restart(
        self,
        timeout: float = 30,
        wait_for_workers: bool = True,
        stimulus_id: str | None = None,
        **_: Any,
    ) -> dict[str, str]:
        """Forget every task, then restart every worker through its nanny (workers without
        one are closed), as Dask's ``Scheduler.restart`` does."""
        self._restarting = True
        try:
            return await self._restart_workers(timeout, wait_for_workers, stimulus_id)
        finally:
            self._restarting = False

    async def _restart_workers(
        self, timeout: float, wait_for_workers: bool, stimulus_id: str | None
    ) -> dict[str, str]:
        stimulus_id = stimulus_id or f"restart-{time.time()}"
        timeout = float(parse_timedelta(timeout))
        logger.info("restarting: releasing every key and every worker (%s)", stimulus_id)
        self._restarts += 1
        self._handle(ev.Restart(stimulus_id))
        old = dict(self.workers)
        n_workers = len(old)
        results: dict[str, str] = {}
        for address, record in old.items():
            if not record.nanny:
                logger.warning("worker %s has no nanny: closing it instead", address)
                self._remove_worker(address, expected=True, reason=stimulus_id)
                results[address] = "removed"

        async def kill(address: str, nanny: str) -> None:
            try:
                async with asyncio.timeout(timeout):
                    await self.pool.rpc(nanny, {"op": "kill", "reason": stimulus_id})
                results[address] = "OK"
            except (OSError, CommClosedError, ProtocolError) as exc:  # TimeoutError too
                logger.error("nanny %s did not restart its worker: %r", nanny, exc)
                results[address] = "timed out"
                self._remove_worker(address, expected=True, reason=stimulus_id)

        await asyncio.gather(
            *(kill(a, r.nanny) for a, r in old.items() if r.nanny and a not in results)
        )
        self.log_event("all", {"action": "restart-workers", "workers": list(old)})
        if not wait_for_workers:
            return results
        deadline = time.time() + timeout
        while (len(self.workers) < n_workers or old.keys() & self.workers.keys()) and (
            time.time() < deadline
        ):
            await asyncio.sleep(0.05)
        if len(self.workers) < n_workers:
            raise TimeoutError(
                f"Waited for {n_workers} worker(s) to reconnect after restarting but, after "
                f"{timeout}s, {n_workers - len(self.workers)} have not returned."
            )
        return results

    async def retire_workers(
        self,
        workers: Iterable[str] | None = None,
        *,
        names: Iterable[Any] | None = None,
        close_workers: bool = True,
        remove: bool = True,
        stimulus_id: str | None = None,
        n: int | None = None,
        **_: Any,
    ) -> dict[str, Any]:
        """Move the data that only these workers hold to other workers, then close them.

        The data moves the way Dask moves it: the scheduler asks a running worker to fetch
        each key (``acquire-replicas``) and waits until the workers report the replicas
        (``add-keys``). Without ``workers``/``names``/``n`` nothing is retired.
        """
        stimulus_id = stimulus_id or f"retire-workers-{time.time()}"
        if names is not None:
            wanted = {str(name) for name in names}
            workers = [ws.address for ws in self.state.workers.values() if str(ws.name) in wanted]
        elif workers is None and n:
            workers = list(self.state.workers)[: int(n)]
        addresses = [a for a in dict.fromkeys(workers or ()) if a in self.state.workers]
        if not addresses:
            return {}
        others = [
            ws for ws in self.state.workers.values()
            if ws.address not in addresses and ws.status == "running"
        ]  # fmt: skip
        if not others and self.state.unique_keys_on(addresses):
            logger.warning("not retiring %s: no other running worker for its data", addresses)
            return {}
        info = self.identity()["workers"]
        retired = {a: info.get(a, {}) for a in addresses}
        logger.info("retiring workers %s (%s)", addresses, stimulus_id)
        deadline = time.time() + float(
            parse_timedelta(dask.config.get("distributed.comm.timeouts.connect")) * 4
        )
        while True:
            # Repeated: tasks still finishing on a retiring worker make new unique data,
            # and a recipient may fail a fetch.
            self._handle(ev.RetireWorkers(addresses, stimulus_id))
            for _ in range(20):
                await asyncio.sleep(0.05)
                if not self.state.unique_keys_on(addresses):
                    break
            # Tasks still running there are rescheduled when the worker goes (an expected
            # loss: it does not count towards KilledWorker).
            pending = self.state.unique_keys_on(addresses)
            if not pending:
                break
            if time.time() > deadline:
                logger.warning(
                    "retiring %s: %d keys still only there; they will be recomputed",
                    addresses,
                    len(pending),
                )
                break
        if remove or close_workers:
            for address in addresses:
                self._remove_worker(address, expected=True, reason=stimulus_id)
        return retired

    def dsched_info(self) -> dict[str, Any]:
        """dsched's own summary of its state (tests and tools use it)."""
        states: dict[str, int] = defaultdict(int)
        for ts in self.state.tasks.values():
            states[ts.state] += 1
        # Check every invariant once, on demand (tests ask this after injecting faults).
        try:
            self.state.validate()
            valid, invalid_reason = True, ""
        except AssertionError as exc:
            logger.error("validate() failed: %r", exc)
            valid, invalid_reason = False, repr(exc)[:2000]
        return {
            "tasks": len(self.state.tasks),
            "clients": len(self.clients),
            "workers": len(self.state.workers),
            "states": dict(states),
            "version": dsched.__version__,
            "valid": valid,
            "invalid_reason": invalid_reason,
            "rss": _rss_bytes(),
            # Transfer bandwidth estimate, bytes/s (configured, then from heartbeats).
            "bandwidth": self.state.bandwidth,
        }
