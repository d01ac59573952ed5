"""Batched streams: a client's or a worker's long-lived connection, read until it closes.

Theory of operation
-------------------
``register-client`` and ``register-worker`` turn their comm into a stream. Each read is a
batch (a list of message dicts); each message is dispatched in order through the op
registry's stream table (``ops.StreamOps``): a decoder into a state event, an extension's
stream op, or an awaited special (``update-graph``, whose intake runs in a thread so a big
graph does not stall heartbeats, and which hands a big graph to the state machine in parts,
one per loop iteration (``dsched.state.slicing``); the client's stream waits for it, which
keeps that client's messages in order while every other peer keeps being served).

Whose fault: a message that cannot be decoded (``RemoteProtocolError``, ``ValueError``)
gets a warning in the log and, from a client, an ``error`` message on its stream (the
Client logs it; a worker has no handler for ``error`` and would close its stream, losing
its data, over a message we could not read), and the stream goes on with the next message:
nothing was applied. Anything else raised while applying a
message is a bug of ours: logged loudly with the story of the keys involved, and the stream
is closed (the peer reconnects or is removed, which brings the state back to something
consistent) instead of carrying on over half-applied state.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from dask.utils import parse_timedelta

from dsched.comm import CommClosedError
from dsched.comm.tcp import Comm
from dsched.core import inbound
from dsched.ext.lifecycle import Lifecycle
from dsched.graph import GraphIntake, GraphIntakeError, intake_update_graph
from dsched.server.collector import GraphFreezer
from dsched.server.errors import pickled_exception
from dsched.server.reactor import Reactor, WorkerRecord
from dsched.state import events as ev
from dsched.state.slicing import graph_parts
from dsched.wire import RemoteProtocolError

logger = logging.getLogger("dsched.scheduler")

# Stream messages one peer's stream handles before letting the loop serve the others (and
# flush): about 25 ms of state-machine work.
MESSAGES_PER_TURN = 1000

StreamHandler = Callable[[str, dict[str, Any]], Awaitable[None] | None]


class StreamOps:
    """The stream half of the op registry: op -> handler(peer, msg), per kind of peer."""

    def __init__(self, reactor: Reactor) -> None:
        self.reactor = reactor
        self.client: dict[str, StreamHandler] = {}
        self.worker: dict[str, StreamHandler] = {}
        for table, decoders in (
            (self.client, inbound.CLIENT_DECODERS),
            (self.worker, inbound.WORKER_DECODERS),
        ):
            for op, decoder in decoders.items():
                table[op] = self._decoded(decoder)
        for op in reactor.core.stream_ops:
            handler = self._extension(op)
            for table in (self.client, self.worker):
                if op in table:
                    raise ValueError(f"stream op {op!r} is served twice")
                table[op] = handler

    def _decoded(self, decoder: inbound.Decoder) -> StreamHandler:
        handle = self.reactor.handle

        def handler(peer: str, msg: dict[str, Any]) -> None:
            event = decoder(peer, msg)
            if event is not None:
                handle(event)

        return handler

    def _extension(self, op: str) -> StreamHandler:
        stream = self.reactor.stream

        def handler(peer: str, msg: dict[str, Any]) -> None:
            stream(peer, op, msg)

        return handler


def stream_messages(batch: Any) -> list[dict[str, Any]]:
    """A stream read is a list of message dicts; a bare dict or "OK" are allowed too."""
    if isinstance(batch, dict):
        return [batch]
    if batch == "OK":
        return []
    if isinstance(batch, list | tuple) and all(isinstance(m, dict) for m in batch):
        return list(batch)
    raise RemoteProtocolError(f"expected a list of message dicts, got {batch!r:.200}")


class Streams:
    def __init__(
        self, reactor: Reactor, ops: StreamOps, lifecycle: Lifecycle, heartbeat: Callable[[], float]
    ) -> None:
        self.reactor = reactor
        self.ops = ops
        self.lifecycle = lifecycle
        self.heartbeat_interval = heartbeat
        self._intake = ThreadPoolExecutor(1, thread_name_prefix="dsched-graph-intake")
        self.freezer = GraphFreezer()
        # Worker plugins (name -> pickled bytes) shipped to every registering worker; the
        # scheduler shares its plugin registry's dict here.
        self.worker_plugins: dict[str, bytes] = {}
        ops.client["update-graph"] = self.update_graph

    def close(self) -> None:
        self._intake.shutdown(wait=False, cancel_futures=True)

    async def run(
        self, comm: Comm, peer: str, table: dict[str, StreamHandler], *, tell_peer: bool
    ) -> None:
        """Read a batched stream until it closes, dispatching each message in order;
        ``tell_peer``: send bad messages' errors to the peer too (clients)."""
        since_yield = 0
        while True:
            batch = await comm.read()
            try:
                messages = stream_messages(batch)
            except RemoteProtocolError as exc:
                self._peer_error(comm, peer, str(exc), tell_peer)
                comm.abort()
                return
            for msg in messages:
                since_yield += 1
                if since_yield >= MESSAGES_PER_TURN:
                    # A read of buffered data does not suspend: a peer that keeps sending
                    # (many workers finishing short tasks) would keep the loop to itself.
                    since_yield = 0
                    await asyncio.sleep(0)
                op = msg.get("op")
                if op == "close-stream":
                    return
                handler = table.get(op) if isinstance(op, str) else None
                if handler is None:
                    self._peer_error(comm, peer, f"ignoring unknown stream op {op!r}", tell_peer)
                    continue
                try:
                    result = handler(peer, msg)
                    if result is not None:
                        await result
                except (RemoteProtocolError, ValueError, TypeError) as exc:
                    self._peer_error(comm, peer, f"{op!r}: {exc}", tell_peer)
                except Exception as exc:
                    try:
                        keys = msg.get("keys") or ([msg["key"]] if "key" in msg else [])
                        self.reactor.log_internal_error(exc, keys if isinstance(keys, list) else ())
                    finally:
                        comm.abort()  # whatever the log did: the peer must not hang
                    return

    @staticmethod
    def _peer_error(comm: Comm, peer: str, why: str, tell_peer: bool) -> None:
        logger.warning("bad stream message from %s: %s", peer, why)
        if tell_peer:
            with contextlib.suppress(CommClosedError, OSError):
                comm.write([{"op": "error", "exception": why}])

    # ------------------------------------------------------------------ clients
    async def client_stream(self, comm: Comm, request: dict[str, Any]) -> None:
        client = str(request.get("client"))
        comm.name = f"client {client}"
        # The first write must be exactly this list: the Client asserts on it.
        comm.write([{"op": "stream-start"}])
        reactor = self.reactor
        reactor.clients[client] = comm
        reactor.handle(ev.ClientConnected(client))
        logger.info("client %s connected from %s", client, comm.peer_address)
        try:
            await self.run(comm, client, self.ops.client, tell_peer=True)
        finally:
            if reactor.clients.get(client) is comm:
                del reactor.clients[client]
                reactor.handle(ev.ClientDisconnected(client))
                logger.info("client %s disconnected", client)

    async def update_graph(self, client: str, msg: dict[str, Any]) -> None:
        with self.freezer.graph_coming():
            await self._update_graph(client, msg)

    async def _update_graph(self, client: str, msg: dict[str, Any]) -> None:
        keys = list(msg.get("keys") or ())
        arrived = time.time()
        restarts_before = self.lifecycle.restarts
        loop = asyncio.get_running_loop()
        try:
            tracing = self.reactor.trace is not None
            intake, parts = await loop.run_in_executor(
                self._intake, _take_in, self.freezer, client, keys, msg, tracing
            )
        except GraphIntakeError as exc:
            logger.info("graph from %s failed: %r", client, exc.exception)
            self.reactor.handle(
                ev.GraphFailed(client, keys, pickled_exception(exc.exception), None)
            )
            return
        except Exception as exc:
            logger.exception("graph intake from %s failed", client)
            self.reactor.handle(ev.GraphFailed(client, keys, pickled_exception(exc), None))
            return
        big = len(parts) > 1
        parts.reverse()
        while parts:
            # Popped, so that each part's specs are freed once the state has taken it in.
            part = parts.pop()
            if part.part:
                # One loop iteration between parts: heartbeats and every other peer are
                # served while a big graph comes in (dsched.state.slicing).
                await asyncio.sleep(0)
            if self.lifecycle.restarting or self.lifecycle.restarts != restarts_before:
                # A restart overtook this graph (the RPC travels on another comm, and the
                # stream batches for up to 10 ms; the client blocks in restart() until it
                # returns, so a graph arriving meanwhile was sent before it): the client
                # has cancelled these futures and forgotten them, so nobody would ever
                # release them. The restart dropped the parts already taken in.
                logger.info("dropping a graph from %s submitted before a restart", client)
                return
            self.reactor.handle(part)
            if big:
                self.freezer.freeze()
        trace = self.reactor.trace
        if trace is not None and tracing:
            trace.graph(client, intake, keys, arrived, time.time())

    # ------------------------------------------------------------------ workers
    async def worker_stream(self, comm: Comm, request: dict[str, Any]) -> None:
        now = time.time()
        problem = inbound.registration_problem(request)
        if problem is not None:
            logger.warning("rejecting register-worker from %s: %s", comm.peer_address, problem)
            comm.write({"status": "error", "message": problem, "time": now})
            return
        reactor = self.reactor
        address = str(request["address"])
        comm.name = f"worker {address}"
        name = request.get("name", address)
        taken = {str(r.info.get("name")) for r in reactor.workers.values()}
        if address in reactor.workers or str(name) in taken:
            why = f"name taken, {name}" if str(name) in taken else f"address taken, {address}"
            comm.write({"status": "error", "message": why, "time": now})
            return
        record = WorkerRecord(comm, dict(request), now)
        reactor.workers[address] = record
        event = inbound.worker_connected(request)
        reactor.handle(event)
        if reactor.trace is not None:
            reactor.trace.worker(address, event.nthreads, now)
        comm.write(
            {
                "status": "OK",
                "time": now,
                "heartbeat-interval": self.heartbeat_interval(),
                "worker-plugins": self.worker_plugins,
            }
        )
        logger.info("worker %s registered (%s threads)", address, request.get("nthreads"))
        table = self.ops.worker
        if reactor.trace is not None:
            table = self._traced(table)
        expected = False
        try:
            await self.run(comm, address, table, tell_peer=False)
            expected = True  # the worker said close-stream: it is leaving on purpose
        finally:
            if reactor.workers.get(address) is record:
                self.remove_worker(address, expected=expected, reason="worker-closed")

    def _traced(self, table: dict[str, StreamHandler]) -> dict[str, StreamHandler]:
        """The worker table with the tracer's hooks on task-finished and task-erred."""
        trace = self.reactor.trace
        assert trace is not None
        traced = dict(table)
        finished, erred = table["task-finished"], table["task-erred"]

        def task_finished(peer: str, msg: dict[str, Any]) -> Awaitable[None] | None:
            trace.task_finished(peer, msg, time.time())
            return finished(peer, msg)

        def task_erred(peer: str, msg: dict[str, Any]) -> Awaitable[None] | None:
            trace.task_erred(peer, msg, time.time())
            return erred(peer, msg)

        traced["task-finished"] = task_finished
        traced["task-erred"] = task_erred
        return traced

    def remove_worker(self, address: str, *, expected: bool, reason: str) -> None:
        if address not in self.reactor.workers:
            return
        logger.info("removing worker %s (%s)", address, reason)
        self.reactor.handle(ev.WorkerDisconnected(address, expected=expected, stimulus_id=reason))


def _take_in(
    freezer: GraphFreezer, client: str, keys: list[Any], msg: dict[str, Any], tracing: bool
) -> tuple[GraphIntake, list[ev.GraphReceived]]:
    """Run in the intake thread: the graph, as the parts the state machine takes in; the
    intake's own task dict and priorities only for the tracer (they would double the
    specs' lifetime otherwise)."""
    with freezer.intake():
        intake = intake_update_graph(msg, freezer.order)
        fifo_timeout = msg.get("fifo_timeout", 0)
        whole = ev.GraphReceived(
            client,
            list(intake.tasks.values()),
            keys,
            intake.order,
            user_priority=msg.get("user_priority") or 0,
            fifo_timeout=parse_timedelta(fifo_timeout) if fifo_timeout else 0.0,
            submitting_task=msg.get("submitting_task"),
            actors=msg.get("actors") or (),
            shuffle_specs=intake.shuffle_specs,
        )
        parts = graph_parts(whole)
        if len(parts) > 1:
            del whole  # (each part has its own tasks and priorities)
            if not tracing:
                intake.tasks.clear()
                intake.order.clear()
            freezer.freeze()
    return intake, parts
