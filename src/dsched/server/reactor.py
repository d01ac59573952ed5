"""The reactor: the asyncio side of the core, one tick at a time.

Theory of operation
-------------------
Every input (a decoded stream message, an RPC served by an extension, a timer, an RPC
reply) is handed to the ``Core`` with the wall-clock time, and the first input of a loop
iteration schedules one ``flush`` with ``call_soon``. The flush runs the core's state <->
policy loop, then carries out what came out of it: each peer's messages written as one
batch, workers closed, answers delivered to the RPCs waiting for them, RPCs to workers and
nannies started (their replies become inputs again), timers set or cancelled. So messages
are coalesced per peer per iteration and the policy runs at most once per iteration.

An RPC served by an extension waits on a future keyed by its request id; the extension
answers it now or later (a parked request), never by the shell polling.

Shell code that must wait for the cluster to reach a state (scatter waiting for a worker)
calls ``wait_for(condition, timeout)``: the condition is re-checked after every flush, and
costs nothing while nobody waits.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Hashable, Iterable, Mapping, Sequence
from typing import Any, Protocol

from dsched.comm import CommClosedError, ConnectionPool
from dsched.comm.tcp import Comm
from dsched.core import Core, Flush, InternalError
from dsched.ext.protocol import Fail, Rpc, SetTimer
from dsched.graph import GraphIntake
from dsched.policy.protocol import Decision, PolicyEvent
from dsched.server.errors import pickled_exception
from dsched.state import events as ev
from dsched.state.outbox import Outbox
from dsched.wire import LocalProtocolError, ProtocolError

logger = logging.getLogger("dsched.scheduler")

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING}


class Tracer(Protocol):
    """What the shell tells a per-task trace recorder (``dsched.tools.trace.record``,
    installed by ``dsched scheduler --trace FILE``)."""

    def worker(self, address: str, nthreads: int, now: float) -> None: ...
    def graph(
        self,
        client: str,
        intake: GraphIntake,
        wanted: Iterable[Any],
        arrived: float,
        taken_in: float,
    ) -> None: ...
    def policy(
        self, events: Sequence[PolicyEvent], decisions: Sequence[Decision], now: float
    ) -> None: ...
    def outbox(self, out: Outbox, now: float) -> None: ...
    def task_finished(self, worker: str, msg: dict[str, Any], now: float) -> None: ...
    def task_erred(self, worker: str, msg: dict[str, Any], now: float) -> None: ...
    def close(self) -> None: ...


class WorkerRecord:
    """What the shell keeps per worker besides the state machine's view: its stream and
    what its heartbeats say."""

    __slots__ = ("comm", "info", "last_seen", "metrics", "nanny")

    def __init__(self, comm: Comm, info: dict[str, Any], now: float) -> None:
        self.comm = comm
        self.info = info
        self.nanny: str | None = info.get("nanny")
        self.last_seen = now
        self.metrics: dict[str, Any] = info.get("metrics") or {}


class Reactor:
    def __init__(self, core: Core, pool: ConnectionPool) -> None:
        self.core = core
        self.pool = pool
        self.workers: dict[str, WorkerRecord] = {}
        self.clients: dict[str, Comm] = {}
        # Comms written to like a client's stream that are not clients: the worker status
        # feeds of cluster managers (subscribe_worker_status).
        self.feeds: dict[str, Comm] = {}
        self.trace: Tracer | None = None
        self._conditions: list[tuple[Callable[[], bool], asyncio.Future[None]]] = []
        self._flush_scheduled = False
        self._waiting: dict[int, asyncio.Future[Any]] = {}
        self._timers: dict[tuple[str, Hashable], asyncio.TimerHandle] = {}
        self._background: set[asyncio.Task[Any]] = set()

    # ------------------------------------------------------------------ inputs
    def handle(self, event: ev.Event) -> Any:
        reply = self.core.handle(event, time.time())
        self._schedule()
        return reply

    def stream(self, peer: str, op: str, msg: dict[str, Any]) -> None:
        self.core.stream(peer, op, msg, time.time())
        self._schedule()

    async def request(self, op: str, peer: str, args: Mapping[str, Any]) -> Any:
        """An RPC served by an extension: its reply value, or its error raised."""
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        request = self.core.request(op, peer, args, time.time())
        self._waiting[request] = future
        self._schedule()
        try:
            return await future
        except asyncio.CancelledError:
            self._waiting.pop(request, None)
            self.core.drop_request(request, time.time())
            self._schedule()
            raise

    def spawn(self, coro: Awaitable[Any]) -> None:
        task = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def wait_for(self, condition: Callable[[], bool], timeout: float) -> bool:
        """Wait until ``condition()`` holds after a flush; False at the deadline."""
        if condition():
            return True
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        entry = (condition, future)
        self._conditions.append(entry)
        try:
            async with asyncio.timeout(timeout):
                await future
        except TimeoutError:
            return condition()
        finally:
            if entry in self._conditions:
                self._conditions.remove(entry)
        return True

    # ------------------------------------------------------------------ the tick
    def _schedule(self) -> None:
        if not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self.flush)

    def flush(self) -> None:
        self._flush_scheduled = False
        try:
            result = self.core.flush(time.time())
        except InternalError as exc:
            self.log_internal_error(exc, exc.keys)
            return
        self._carry_out(result)
        if self._conditions:
            for condition, future in list(self._conditions):
                if not future.done() and condition():
                    future.set_result(None)

    def _carry_out(self, result: Flush) -> None:
        out = result.out
        for level, text in out.logs:
            logger.log(_LEVELS.get(level, logging.ERROR), text)
        for address, msgs in out.to_workers.items():
            record = self.workers.get(address)
            if record is not None:
                self.write_batch(record.comm, msgs, worker=address)
        for client, client_msgs in out.to_clients.items():
            comm = self.clients.get(client) or self.feeds.get(client)
            if comm is not None:
                self.write_batch(comm, client_msgs)
        if self.trace is not None:
            self.trace.outbox(out, time.time())
        for address in out.close_workers:
            # In-flight RPCs to a removed worker (a gather from a frozen worker, say) fail
            # now rather than hang: gather then tries other holders or reports the keys lost.
            self.pool.discard(address)
            record = self.workers.pop(address, None)
            if record is not None:
                self.write(record.comm, [{"op": "close", "reason": "scheduler-remove-worker"}])
                self.spawn(record.comm.close())
        for answer in result.answers:
            future = self._waiting.pop(answer.request, None)
            if future is None or future.done():
                continue
            if isinstance(answer, Fail):
                future.set_exception(answer.exception)
            else:
                future.set_result(answer.value)
        for extension, rpc in result.rpcs:
            self.spawn(self._rpc(extension, rpc))
        loop = asyncio.get_running_loop()
        for extension, timer in result.timers:
            handle = self._timers.pop((extension, timer.token), None)
            if handle is not None:
                handle.cancel()
            if isinstance(timer, SetTimer):
                self._timers[extension, timer.token] = loop.call_later(
                    max(0.0, timer.at - time.time()), self._timer_fired, extension, timer.token
                )

    def _timer_fired(self, extension: str, token: Hashable) -> None:
        self._timers.pop((extension, token), None)
        self.core.timer(extension, token, time.time())
        self._schedule()

    async def _rpc(self, extension: str, rpc: Rpc) -> None:
        reply: Any = None
        error: BaseException | None = None
        try:
            async with asyncio.timeout(rpc.timeout):
                reply = await self.pool.rpc(rpc.address, rpc.msg)
        except (OSError, CommClosedError, ProtocolError) as exc:  # TimeoutError too
            error = exc
        self.core.rpc_reply(extension, rpc.token, reply, error, time.time())
        self._schedule()

    # ------------------------------------------------------------------ output
    @staticmethod
    def write(comm: Comm, msg: Any) -> None:
        try:
            comm.write(msg)
        except (CommClosedError, OSError):
            pass  # the reader side of this comm notices and cleans up
        except ProtocolError:
            logger.exception("could not encode a message for %s", comm.peer_address)

    def write_batch(self, comm: Comm, msgs: list[Any], worker: str | None = None) -> None:
        """Write one peer's batch of the tick. If something in it cannot be encoded (nothing
        was written then), the batch goes message by message, and each message that still
        cannot be encoded fails its task instead of vanishing: a compute-task errs the task
        (as if the worker had reported the error), a client message about a key becomes a
        task-erred for that key. Either way the client hears of it and nothing hangs."""
        try:
            comm.write(msgs)
            return
        except (CommClosedError, OSError):
            return  # the reader side of this comm notices and cleans up
        except LocalProtocolError:
            pass
        for msg in msgs:
            try:
                comm.write([msg])
            except (CommClosedError, OSError):
                return
            except LocalProtocolError as exc:
                self._unencodable(comm, msg, exc, worker)

    def _unencodable(
        self, comm: Comm, msg: Any, exc: LocalProtocolError, worker: str | None
    ) -> None:
        op = msg.get("op") if isinstance(msg, dict) else None
        key = msg.get("key") if isinstance(msg, dict) else None
        logger.error(
            "could not encode a %r message for %s (key %r): %s; failing the task",
            op,
            comm.peer_address,
            key,
            exc,
        )
        error = RuntimeError(f"dsched could not send {op!r} for {key!r}: {exc}")
        if worker is not None and op == "compute-task":
            event = ev.TaskErred(
                worker,
                key,
                msg.get("run_id"),
                pickled_exception(error),
                None,
                repr(error),
                stimulus_id="unencodable-compute-task",
            )
            self.handle(event)
        elif worker is None and key is not None and op != "task-erred":
            failed = {
                "op": "task-erred",
                "key": key,
                "exception": pickled_exception(error),
                "traceback": None,
            }
            self.write(comm, [failed])

    def log_internal_error(self, exc: BaseException, keys: Iterable[Any] = ()) -> None:
        """Our own bug: logged loudly, with the story of the keys involved."""
        stories: list[tuple[Any, Any]] = []
        for key in list(keys)[:10]:
            try:
                stories.append((key, self.core.story(key)[-20:]))
            except TypeError:  # what the peer sent as a key may not even be hashable
                stories.append((key, "not a key"))
        logger.error(
            "internal error (a bug in dsched, not the peer's fault): %r; stories: %r",
            exc,
            stories,
            exc_info=exc,
        )

    def cancel_timers(self) -> None:
        for handle in self._timers.values():
            handle.cancel()
        self._timers.clear()
        for task in list(self._background):
            task.cancel()
