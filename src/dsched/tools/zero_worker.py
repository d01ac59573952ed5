"""``dsched zero-worker``: simulated Dask workers that complete every task at once.

Theory of operation
-------------------
One process runs ``count`` simulated workers on one asyncio loop. Each simulated worker is
what the scheduler sees of a ``dask worker`` (protocol.md §5): its own listening address on
127.0.0.1 (the scheduler connects there for ``get_data``), a ``register-worker`` stream, and
``heartbeat_worker`` RPCs on a second comm at the interval the scheduler asks for.

A ``compute-task`` is answered with ``task-finished`` right away: the task is not run, its
dependencies are claimed to be local already (no transfer), the reported ``nbytes`` is a
small constant and ``startstops`` holds one zero-length ``compute`` entry. The worker
remembers which keys it "holds", so ``get_data`` answers with a placeholder value (serialized
as a real worker serializes results, so a Client's ``gather`` receives it), ``free-keys`` and
``remove-replicas`` drop keys (answered with ``release-worker-data``), and ``steal-request``
reports the key's state (``memory`` or ``None``, the task having already completed).

So a makespan measured with zero workers is the scheduler's and the protocol's cost alone.
Outgoing stream messages of one loop iteration are coalesced into one batch per worker.

Built on ``dsched.comm`` (framing, codec, handshake): the payloads of ``compute-task``
(``run_spec``) stay opaque bytes and are never unpickled.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import pickle
import signal
import threading
import time
from collections.abc import Callable
from typing import Any, cast

from dsched.comm import Comm, CommClosedError, connect, listen
from dsched.comm.tcp import Listener
from dsched.state.messages import (
    AcquireReplicas,
    ComputeTask,
    FreeKeys,
    RemoveReplicas,
    StealRequest,
)
from dsched.wire import ProtocolError, Serialized

__all__ = ["ZeroWorker", "add_parser", "placeholder_payload", "run_zero_workers"]

logger = logging.getLogger("dsched.zero_worker")

DEFAULT_NBYTES = 28  # sys.getsizeof of a small int, what a real worker reports for one
PLACEHOLDER_VALUE: Any = None
CONNECT_TIMEOUT_S = 30.0


def placeholder_payload(value: Any = PLACEHOLDER_VALUE) -> Serialized:
    """``value`` serialized exactly as a real worker's ``get_data`` reply carries a result."""
    from distributed.protocol.serialize import serialize_and_split

    # distributed's serialization functions are not annotated (no-untyped-call).
    header, frames = serialize_and_split(  # type: ignore[no-untyped-call]
        value, serializers=("dask", "pickle"), on_error="raise"
    )
    return Serialized(dict(header), [bytes(f) for f in frames])


def _metrics() -> dict[str, Any]:
    """A heartbeat ``metrics`` map with every field the stock scheduler reads."""
    return {
        "task_counts": {},
        "bandwidth": {"total": 100_000_000, "workers": {}, "types": {}},
        "digests_total_since_heartbeat": {},
        "managed_bytes": 0,
        "spilled_bytes": {"memory": 0, "disk": 0},
        "transfer": {
            "incoming_bytes": 0,
            "incoming_count": 0,
            "incoming_count_total": 0,
            "outgoing_bytes": 0,
            "outgoing_count": 0,
            "outgoing_count_total": 0,
        },
        "event_loop_interval": 0.02,
        "cpu": 0.0,
        "memory": 0,
        "time": time.time(),
        "host_net_io": {"read_bps": 0.0, "write_bps": 0.0},
        "host_disk_io": {"read_bps": 0.0, "write_bps": 0.0},
        "num_fds": 0,
    }


class ZeroWorker:
    """One simulated worker (see the module docstring)."""

    def __init__(
        self,
        scheduler_address: str,
        name: str,
        *,
        host: str = "127.0.0.1",
        nthreads: int = 1,
        nbytes: int = DEFAULT_NBYTES,
        payload: Serialized | None = None,
        versions: dict[str, Any] | None = None,
    ) -> None:
        self.scheduler_address = scheduler_address
        self.name = name
        self.host = host
        self.nthreads = nthreads
        self.nbytes = nbytes
        self.payload = payload if payload is not None else placeholder_payload()
        self.type_bytes = pickle.dumps(type(PLACEHOLDER_VALUE))
        self.typename = type(PLACEHOLDER_VALUE).__name__
        self.versions = versions or {"host": {}, "packages": {}}
        self.address = ""
        self.data: set[Any] = set()  # keys this worker pretends to hold
        self.tasks_completed = 0
        self.heartbeat_interval = 0.5
        self._listener: Listener | None = None
        self._stream: Comm | None = None
        self._outgoing: list[dict[str, Any]] = []
        self._flush_scheduled = False
        self._closed = asyncio.Event()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._thread = threading.get_ident()
        # Incoming stream messages by op, each handler typed with its op's record
        # (dsched.state.messages; the dispatch trusts the op, as a real worker does).
        self.handlers: dict[str, Callable[[Any], None]] = {
            "compute-task": self._compute_task,
            "free-keys": self._free_keys,
            "remove-replicas": self._free_keys,
            "acquire-replicas": self._acquire_replicas,
            "steal-request": self._steal_request,
            "cancel-compute": lambda msg: None,
            "refresh-who-has": lambda msg: None,
            "remove-worker": lambda msg: None,  # no peers to forget: we never fetch
            "worker-status-change": lambda msg: None,
        }

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        """Listen, register with the scheduler, and start the stream and heartbeats."""
        self._listener = await listen(self.host, 0, self._serve_rpc)
        self.address = self._listener.address
        comm = await connect(self.scheduler_address, timeout=CONNECT_TIMEOUT_S)
        comm.name = f"zero-worker {self.name} stream"
        now = time.time()
        comm.write(
            {
                "op": "register-worker",
                "reply": False,
                "address": self.address,
                "status": "init",
                "nthreads": self.nthreads,
                "name": self.name,
                "now": now,
                "resources": {},
                "memory_limit": None,
                "local_directory": "",
                "services": {},
                "nanny": None,
                "pid": os.getpid(),
                "versions": self.versions,
                "metrics": _metrics(),
                "extra": {},
                "stimulus_id": f"worker-connect-{now}",
                "server_id": f"ZeroWorker-{self.name}",
            }
        )
        reply = await comm.read()
        if not isinstance(reply, dict) or reply.get("status") != "OK":
            comm.abort()
            await self._listener.stop()
            raise RuntimeError(f"{self.name}: registration refused: {reply!r:.300}")
        self.heartbeat_interval = float(reply.get("heartbeat-interval") or 0.5)
        self._stream = comm
        self._send(
            {
                "op": "worker-status-change",
                "status": "running",
                "stimulus_id": f"worker-status-change-{time.time()}",
            }
        )
        self._spawn(self._read_stream(comm))
        self._spawn(self._heartbeats())

    async def finished(self) -> None:
        await self._closed.wait()

    async def close(self, reason: str = "zero-worker-close") -> None:
        """Leave like a real worker: say closing, close the stream, stop listening."""
        if self._closed.is_set():
            return
        self._closed.set()
        stream = self._stream
        if stream is not None and not stream.closed:
            with contextlib.suppress(CommClosedError, OSError):
                stream.write(
                    [
                        *self._take_outgoing(),
                        {
                            "op": "worker-status-change",
                            "status": "closing",
                            "stimulus_id": f"{reason}-{time.time()}",
                        },
                        {"op": "close-stream"},
                    ]
                )
            await stream.close()
        if self._listener is not None:
            await self._listener.stop()
        current = asyncio.current_task()
        for task in list(self._tasks):
            if task is not current:
                task.cancel()

    def _spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # ------------------------------------------------------------------ stream
    def _send(self, msg: dict[str, Any]) -> None:
        self._outgoing.append(msg)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)

    def _take_outgoing(self) -> list[dict[str, Any]]:
        msgs, self._outgoing = self._outgoing, []
        self._flush_scheduled = False
        return msgs

    def _flush(self) -> None:
        msgs = self._take_outgoing()
        if not msgs or self._stream is None:
            return
        # On failure the stream reader notices and closes this worker.
        with contextlib.suppress(CommClosedError, OSError):
            self._stream.write(msgs)

    async def _read_stream(self, comm: Comm) -> None:
        reason = "scheduler-connection-broken"
        try:
            while True:
                batch = await comm.read()
                messages = batch if isinstance(batch, tuple | list) else (batch,)
                for msg in messages:
                    if not isinstance(msg, dict):
                        continue
                    op = msg.get("op")
                    if op == "close":
                        reason = str(msg.get("reason", "scheduler-close"))
                        return
                    if op == "close-stream":
                        return
                    handler = self.handlers.get(op)  # type: ignore[arg-type]
                    if handler is None:
                        logger.debug("%s: ignoring stream op %r", self.name, op)
                        continue
                    handler(msg)
        except (CommClosedError, ProtocolError, OSError):
            pass
        finally:
            logger.info("%s: closing (%s)", self.name, reason)
            self._spawn(self.close(reason))

    def _compute_task(self, msg: ComputeTask) -> None:
        key = msg["key"]
        self.data.add(key)
        self.tasks_completed += 1
        now = time.time()
        self._send(
            {
                "op": "task-finished",
                "status": "OK",
                "key": key,
                "run_id": msg.get("run_id"),
                "nbytes": self.nbytes,
                "type": self.type_bytes,
                "typename": self.typename,
                "metadata": {},
                "thread": self._thread,
                "startstops": ({"action": "compute", "start": now, "stop": now},),
                "stimulus_id": f"task-finished-{now}",
            }
        )

    def _free_keys(self, msg: FreeKeys | RemoveReplicas) -> None:
        stimulus_id = msg.get("stimulus_id", f"free-keys-{time.time()}")
        data = self.data
        for key in msg.get("keys", ()):
            if key in data:
                data.discard(key)
                self._send({"op": "release-worker-data", "key": key, "stimulus_id": stimulus_id})

    def _acquire_replicas(self, msg: AcquireReplicas) -> None:
        keys = [key for key in msg.get("who_has", {}) if key not in self.data]
        self.data.update(keys)
        if keys:
            self._send(
                {
                    "op": "add-keys",
                    "keys": keys,
                    "stimulus_id": msg.get("stimulus_id", f"acquire-{time.time()}"),
                }
            )

    def _steal_request(self, msg: StealRequest) -> None:
        # Every task this worker was given has completed already: it is in memory, or was
        # forgotten after free-keys (a real worker then reports None too).
        key = msg["key"]
        self._send(
            {
                "op": "steal-response",
                "key": key,
                "state": "memory" if key in self.data else None,
                "stimulus_id": msg.get("stimulus_id"),
            }
        )

    # ------------------------------------------------------------------ heartbeats
    async def _heartbeats(self) -> None:
        comm: Comm | None = None
        try:
            while not self._closed.is_set():
                await asyncio.sleep(self.heartbeat_interval)
                if comm is None or comm.closed:
                    comm = await connect(self.scheduler_address, timeout=CONNECT_TIMEOUT_S)
                    comm.name = f"zero-worker {self.name} heartbeat"
                comm.write(
                    {
                        "op": "heartbeat_worker",
                        "reply": True,
                        "address": self.address,
                        "now": time.time(),
                        "metrics": _metrics(),
                        "executing": {},
                        "extensions": {},
                    }
                )
                reply = await comm.read()
                if not isinstance(reply, dict) or reply.get("status") == "missing":
                    logger.warning("%s: scheduler does not know us any more", self.name)
                    self._spawn(self.close("heartbeat-missing"))
                    return
                interval = reply.get("heartbeat-interval")
                if interval:
                    self.heartbeat_interval = float(interval)
        except (CommClosedError, ProtocolError, OSError):
            if not self._closed.is_set():
                self._spawn(self.close("heartbeat-failed"))
        finally:
            if comm is not None:
                comm.abort()

    # ------------------------------------------------------------------ RPC server
    async def _serve_rpc(self, comm: Comm) -> None:
        try:
            while True:
                request = await comm.read()
                if not isinstance(request, dict):
                    return
                op = request.get("op")
                wants_reply = request.get("reply", True)
                if op == "close":
                    if wants_reply:
                        comm.write("OK")
                    return
                if op == "get_data":
                    data = {
                        key: self.payload for key in request.get("keys", ()) if key in self.data
                    }
                    comm.write({"status": "OK", "data": data})
                    await comm.read()  # the caller acknowledges with "OK"
                    continue
                reply = self._rpc(op, request)
                if wants_reply:
                    comm.write(reply)
                if request.get("close"):
                    return
        except (CommClosedError, ProtocolError, OSError):
            pass
        finally:
            comm.abort()

    def _rpc(self, op: Any, request: dict[str, Any]) -> Any:
        if op == "update_data":
            keys = list(request.get("data") or {})
            self.data.update(keys)
            return {"nbytes": dict.fromkeys(keys, self.nbytes), "status": "OK"}
        if op == "free_keys":  # the RPC carries free-keys' fields
            self._free_keys(cast(FreeKeys, request))
            return "OK"
        if op == "keys":
            return list(self.data)
        if op in ("ping", "identity"):
            return "pong" if op == "ping" else {"type": "ZeroWorker", "id": self.name}
        if op == "terminate":
            self._spawn(self.close("terminate"))
            return "OK"
        logger.info("%s: unsupported rpc %r", self.name, op)
        return None  # what distributed replies to an unknown op


async def run_zero_workers(
    scheduler_address: str,
    count: int,
    *,
    name_prefix: str | None = None,
    nthreads: int = 1,
    nbytes: int = DEFAULT_NBYTES,
    host: str = "127.0.0.1",
    stop: asyncio.Event | None = None,
) -> list[ZeroWorker]:
    """Start ``count`` simulated workers; return them once all stopped (or ``stop`` is set)."""
    from distributed.versions import get_versions

    versions = get_versions()
    payload = placeholder_payload()
    prefix = name_prefix or f"zero-{os.getpid()}"
    workers = [
        ZeroWorker(
            scheduler_address,
            f"{prefix}-{i}",
            host=host,
            nthreads=nthreads,
            nbytes=nbytes,
            payload=payload,
            versions=versions,
        )
        for i in range(count)
    ]
    await asyncio.gather(*(w.start() for w in workers))
    logger.info("%d zero workers registered with %s", count, scheduler_address)
    all_done = asyncio.ensure_future(asyncio.gather(*(w.finished() for w in workers)))
    waiters: list[asyncio.Future[Any]] = [all_done]
    if stop is not None:
        waiters.append(asyncio.ensure_future(stop.wait()))
    await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
    await asyncio.gather(*(w.close("zero-worker-stop") for w in workers))
    for waiter in waiters:
        waiter.cancel()
    return workers


# ---------------------------------------------------------------------- command line
def add_parser(subparsers: Any, name: str) -> None:
    parser = subparsers.add_parser(
        name,
        help="simulated workers that complete every task at once (scheduler benchmarks)",
        description=__doc__.splitlines()[0] if __doc__ else None,
    )
    parser.add_argument("scheduler", help="scheduler address, e.g. tcp://127.0.0.1:8786")
    parser.add_argument("--count", type=int, default=1, help="simulated workers (default 1)")
    parser.add_argument("--nthreads", type=int, default=1, help="threads each one reports")
    parser.add_argument("--nbytes", type=int, default=DEFAULT_NBYTES, help="reported result size")
    parser.add_argument("--host", default="127.0.0.1", help="address each worker listens on")
    parser.add_argument("--name-prefix", default=None, help="worker names are PREFIX-<i>")
    parser.set_defaults(func=main)


def main(args: argparse.Namespace) -> None:
    if args.count < 1:
        raise SystemExit("dsched zero-worker: --count must be at least 1")

    async def run() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        workers = await run_zero_workers(
            args.scheduler,
            args.count,
            name_prefix=args.name_prefix,
            nthreads=args.nthreads,
            nbytes=args.nbytes,
            host=args.host,
            stop=stop,
        )
        logger.info("zero workers done: %d tasks", sum(w.tasks_completed for w in workers))

    asyncio.run(run())
