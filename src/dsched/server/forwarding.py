"""Diagnostics that the scheduler answers by asking its workers: Dask's replies, forwarded.

Theory of operation
-------------------
``Forwarding`` is an op provider (``rpc_ops()``) of handlers that, like Dask's, do I/O to
the workers or nannies for the request itself, through the reactor's connection pool:

* ``profile``: the workers' ``profile`` RPC, merged with ``distributed.profile.merge``
  (``merge_workers=False``: one profile per worker; workers that fail are left out).
  ``scheduler=True`` returns the scheduler's own profile. Dask 2026.8.0 does not sample its
  own event loop on Python 3.11 (``Server.__init__`` skips ``profile.watch`` there), so it
  returns an empty profile, and so does dsched, which never samples itself.
* ``call_stack(keys)``: follows waiting tasks to their dependencies until it reaches
  processing ones, then asks each worker running some for their stacks (Dask ~7902-7931);
  no keys: every worker, every running task. Workers with nothing running are left out.
* ``logs`` / ``get_logs``: the scheduler's own recent log records. As Dask's ``ServerNode``
  does, a ``DequeHandler`` (``distributed.admin.log-length`` records, formatted with
  ``distributed.admin.log-format``) is attached to the ``dsched.scheduler`` logger; replies
  are newest first, ``(level, text)`` or ``(created, level, text)`` with ``timestamps``.
  ``worker_logs`` forwards ``get_logs`` to the workers (or their nannies).
* ``benchmark_hardware``: the workers' ``benchmark_disk`` and ``benchmark_memory``, then
  ``benchmark_network`` between random pairs, averaged per size (Dask ~7933).
* ``restart_workers``: Dask 2026.8.0's semantics: workers without a nanny are removed
  ("removed"), each nanny is asked to ``kill`` its worker (it starts a new one) within
  ``timeout``; a nanny that fails or times out has its worker removed ("timed out", a
  ``TimeoutError`` with ``on_error="raise"``). The restart is logged to the ``all`` topic
  (and the client's), then, with ``wait_for_workers``, the request waits with
  ``Reactor.wait_for`` (re-checked after every flush, never a sleep loop) until every
  restarted worker is gone and as many workers as before are connected.
* ``get_cluster_state(exclude)``: ``{"scheduler": ..., "workers": {address: the worker's
  dump_state or the repr of its error}, "versions": {"scheduler", "workers"}}`` like Dask's;
  the scheduler part is ``scheduler_state``'s equivalent of ``Scheduler._to_dict`` (the
  fields are listed there). ``dump_cluster_state_to_url`` writes it with Dask's own
  ``cluster_dump.write_state``, so ``DumpArtefact.from_url`` reads it. ``dump_state``
  (Dask's ``Server._to_dict``) is the scheduler part alone.

An error reply from a worker is raised here as the worker's exception (as Dask's ``rpc``
does); the op registry sends it to the caller as an error reply.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import pickle
import random
import threading
import time
import weakref
from collections import defaultdict, deque
from collections.abc import Callable, Collection, Iterable
from functools import partial
from typing import Any

import dask
from dask.utils import parse_timedelta

from dsched.server.ops import RpcOp, call
from dsched.server.reactor import Reactor
from dsched.state.records import ClientState, TaskState, WorkerState

logger = logging.getLogger("dsched.scheduler")

# The peer named in the logs for the events the scheduler itself logs (restart_workers).
_SELF = "scheduler"


class WorkerRpcError(Exception):
    """A worker answered with an error we could not turn back into its exception."""


def raise_error_reply(reply: Any) -> Any:
    """``reply`` itself, or the worker's exception raised (as Dask's ``rpc`` does)."""
    if isinstance(reply, dict) and reply.get("status") == "uncaught-error":
        exception = reply.get("exception")
        if isinstance(exception, bytes | bytearray):
            from distributed.core import clean_exception

            _, exc, _ = clean_exception(exception)
            if exc is not None:
                raise exc
        raise WorkerRpcError(str(reply.get("exception_text") or "error reply"))
    return reply


class DequeHandler(logging.Handler):
    """``distributed.utils.DequeHandler``: keeps the last ``n`` records."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.deque: deque[logging.LogRecord] = deque(maxlen=n)

    def emit(self, record: logging.LogRecord) -> None:
        self.deque.append(record)


class LogBuffer:
    """Dask's ``ServerNode`` log deque for one logger: the last records, for ``get_logs``."""

    def __init__(self, logger_name: str = "dsched.scheduler") -> None:
        self.handler = DequeHandler(int(dask.config.get("distributed.admin.log-length")))
        self.handler.setFormatter(
            logging.Formatter(dask.config.get("distributed.admin.log-format"))
        )
        target = logging.getLogger(logger_name)
        target.addHandler(self.handler)
        weakref.finalize(self, target.removeHandler, self.handler)

    def get_logs(
        self, start: float = 0, n: int | None = None, timestamps: bool = False
    ) -> list[tuple[Any, ...]]:
        """``ServerNode.get_logs``: newest first, at most ``n``, none older than ``start``."""
        handler = self.handler
        out: list[tuple[Any, ...]] = []
        for count, record in enumerate(reversed(handler.deque)):
            if (n and count >= n) or record.created < start:
                break
            if timestamps:
                out.append((record.created, record.levelname, handler.format(record)))
            else:
                out.append((record.levelname, handler.format(record)))
        return out


class Forwarding:
    """The op provider of the diagnostics forwarded to workers (see the module docstring)."""

    def __init__(
        self,
        reactor: Reactor,
        identity: Callable[[], dict[str, Any]],
        remove_worker: Callable[[str], None],
    ) -> None:
        """``identity``: the scheduler's ``identity()`` (the state dump starts from it);
        ``remove_worker(address)``: drop a worker that did not restart (an unexpected loss)."""
        self.reactor = reactor
        self.state = reactor.core.state
        self.pool = reactor.pool
        self.identity = identity
        self.remove_worker = remove_worker
        self.logs = LogBuffer()

    def rpc_ops(self) -> dict[str, RpcOp]:
        return {
            "profile": call(self.profile),
            "call_stack": call(self.call_stack),
            "logs": call(self.get_logs),
            "get_logs": call(self.get_logs),
            "worker_logs": call(self.worker_logs),
            "benchmark_hardware": call(self.benchmark_hardware),
            "restart_workers": call(self.restart_workers),
            "get_cluster_state": call(self.get_cluster_state),
            "dump_state": call(self.dump_state),
            "dump_cluster_state_to_url": call(self.dump_cluster_state_to_url),
        }

    # ------------------------------------------------------------------ worker RPCs
    async def _rpc(self, address: str, msg: dict[str, Any]) -> Any:
        return raise_error_reply(await self.pool.rpc(address, msg))

    def _targets(self, workers: Iterable[str] | None, nanny: bool) -> dict[str, str]:
        """worker address -> where to send (the worker, or its nanny)."""
        addresses = list(self.state.workers) if workers is None else [str(w) for w in workers]
        targets: dict[str, str] = {}
        for address in dict.fromkeys(addresses):
            if address not in self.state.workers:
                continue
            record = self.reactor.workers.get(address)
            target = (record.nanny if record is not None else None) if nanny else address
            if target:
                targets[address] = target
        return targets

    async def _broadcast(
        self,
        msg: dict[str, Any],
        workers: Iterable[str] | None = None,
        *,
        nanny: bool = False,
        on_error: str = "raise",
    ) -> dict[str, Any]:
        """``Scheduler.broadcast`` for these handlers: error replies are errors."""
        targets = self._targets(workers, nanny)

        async def send(target: str) -> Any:
            try:
                return await self._rpc(target, dict(msg))
            except Exception as exc:
                if on_error == "raise":
                    raise
                return exc if on_error == "return" else None

        replies = await asyncio.gather(*(send(t) for t in targets.values()))
        return {
            address: reply
            for address, reply in zip(targets, replies, strict=True)
            if not (on_error == "ignore" and reply is None)
        }

    # ------------------------------------------------------------------ profile, stacks
    async def profile(
        self,
        *,
        workers: Iterable[str] | None = None,
        scheduler: bool = False,
        server: bool = False,
        merge_workers: bool = True,
        start: float | None = None,
        stop: float | None = None,
        key: Any = None,
        **_: Any,
    ) -> dict[str, Any]:
        from distributed import profile as dprofile

        if scheduler:
            return dict(dprofile.create())  # Dask on Python 3.11 does not sample itself
        chosen = list(self.state.workers)
        if workers is not None:
            wanted = set(workers)
            chosen = [w for w in chosen if w in wanted]
        msg = {"op": "profile", "start": start, "stop": stop, "key": key, "server": server}
        results = await asyncio.gather(
            *(self._rpc(w, dict(msg)) for w in chosen), return_exceptions=True
        )
        if merge_workers:
            good = [r for r in results if not isinstance(r, BaseException)]
            return dict(dprofile.merge(*good))
        return {
            w: r for w, r in zip(chosen, results, strict=True) if not isinstance(r, BaseException)
        }

    async def call_stack(self, keys: Iterable[Any] | None = None, **_: Any) -> dict[str, Any]:
        workers: dict[str, list[Any] | None]
        if keys is not None:
            tasks = self.state.tasks
            stack = list(keys)
            seen: set[Any] = set()
            processing: list[TaskState] = []
            while stack:
                key = stack.pop()
                if key in seen:
                    continue
                seen.add(key)
                ts = tasks[key]  # an unknown key is a KeyError, as in Dask
                if ts.state == "waiting":
                    stack.extend(dts.key for dts in ts.dependencies)
                elif ts.state == "processing":
                    processing.append(ts)
            by_worker: dict[str, list[Any]] = defaultdict(list)
            for ts in processing:
                if ts.processing_on is not None:
                    by_worker[ts.processing_on.address].append(ts.key)
            workers = dict(by_worker)
        else:
            workers = dict.fromkeys(self.state.workers)
        if not workers:
            return {}
        results = await asyncio.gather(
            *(self._rpc(w, {"op": "call_stack", "keys": ks}) for w, ks in workers.items())
        )
        return {w: r for w, r in zip(workers, results, strict=True) if r}

    # ------------------------------------------------------------------ logs
    def get_logs(
        self, start: float = 0, n: int | None = None, timestamps: bool = False, **_: Any
    ) -> list[tuple[Any, ...]]:
        return self.logs.get_logs(start=start or 0, n=n, timestamps=timestamps)

    async def worker_logs(
        self,
        n: int | None = None,
        workers: Iterable[str] | None = None,
        nanny: bool = False,
        **_: Any,
    ) -> dict[str, Any]:
        return await self._broadcast({"op": "get_logs", "n": n}, workers, nanny=nanny)

    # ------------------------------------------------------------------ benchmarks
    async def benchmark_hardware(self, **_: Any) -> dict[str, dict[str, float]]:
        out: dict[str, defaultdict[str, list[float]]] = {
            name: defaultdict(list) for name in ("disk", "memory", "network")
        }
        for mode in ("disk", "memory"):
            result = await self._broadcast({"op": f"benchmark_{mode}"})
            for durations in result.values():
                for size, duration in durations.items():
                    out[mode][size].append(duration)
        workers = list(self.state.workers)
        random.shuffle(workers)
        pairs = list(zip(workers[0::2], workers[1::2], strict=False))  # toolz.partition(2, .)
        responses = await asyncio.gather(
            *(self._rpc(a, {"op": "benchmark_network", "address": b}) for a, b in pairs)
        )
        for durations in responses:
            for size, duration in durations.items():
                out["network"][size].append(duration)
        return {
            mode: {size: sum(ds) / len(ds) for size, ds in sizes.items()}
            for mode, sizes in out.items()
        }

    # ------------------------------------------------------------------ restart_workers
    async def restart_workers(
        self,
        *,
        workers: Iterable[str] | None = None,
        client: str | None = None,
        timeout: float = 30,
        wait_for_workers: bool = True,
        on_error: str = "raise",
        stimulus_id: str | None = None,
        **_: Any,
    ) -> dict[str, str]:
        timeout = float(parse_timedelta(timeout)) if timeout is not None else 30.0
        stimulus_id = stimulus_id or f"restart-workers-{time.time()}"
        state_workers = self.state.workers
        n_workers = len(state_workers)
        if workers is None:
            chosen = list(state_workers)
            logger.info("Restarting all workers (stimulus_id=%r)", stimulus_id)
        else:
            chosen = list(set(workers).intersection(state_workers))
            logger.info(
                "Restarting %d workers: %s (stimulus_id=%r)", len(chosen), chosen, stimulus_id
            )
        old = {address: state_workers[address] for address in chosen}
        nannies = self._targets(chosen, nanny=True)
        no_nanny = [address for address in chosen if address not in nannies]
        if no_nanny:
            logger.warning(
                "Workers %s do not use a nanny and will be terminated without restarting them",
                no_nanny,
            )
            for address in no_nanny:
                self.remove_worker(address)
        out: dict[str, str] = dict.fromkeys(no_nanny, "removed")
        deadline = time.monotonic() + timeout

        async def kill(nanny: str) -> Any:
            async with asyncio.timeout(timeout):
                return await self._rpc(nanny, {"op": "kill", "reason": stimulus_id})

        replies = await asyncio.gather(*(kill(n) for n in nannies.values()), return_exceptions=True)
        bad: list[str] = []
        for address, reply in zip(nannies, replies, strict=True):
            if isinstance(reply, OSError | TimeoutError):
                bad.append(address)
                out[address] = "timed out"
            elif isinstance(reply, BaseException):
                raise reply
            else:
                out[address] = "OK"
        if bad:
            logger.error("Workers %s did not shut down within %ss; force closing", bad, timeout)
            for address in bad:
                if address in self.state.workers:
                    self.remove_worker(address)
            if on_error == "raise":
                raise TimeoutError(
                    f"{len(bad)}/{len(nannies)} nanny worker(s) did not "
                    f"shut down within {timeout}s: {set(bad)}"
                )
        if client:
            await self._log_event(client, {"action": "restart-workers", "workers": chosen})
        await self._log_event(
            "all", {"action": "restart-workers", "workers": chosen, "client": client}
        )
        if not wait_for_workers:
            logger.info("Workers restart finished (did not wait for new workers)")
            return out

        def back() -> bool:
            current = self.state.workers
            # A worker that returns at the same address is a new WorkerState.
            gone = all(current.get(a) is not ws for a, ws in old.items())
            return gone and len(current) >= n_workers

        if await self.reactor.wait_for(back, max(0.0, deadline - time.monotonic())):
            logger.info("Workers restart finished (stimulus_id=%r)", stimulus_id)
            return out
        msg = (
            f"Waited for {len(chosen)} worker(s) to reconnect after restarting but, "
            f"after {timeout}s, {n_workers - len(self.state.workers)} have not returned. "
            "Consider a longer timeout, or `wait_for_workers=False`."
        )
        if no_nanny:
            msg += (
                f" The {len(no_nanny)} worker(s) not using Nannies were just shut "
                "down instead of restarted (restart is only possible with Nannies). If "
                "your deployment system does not automatically re-launch terminated "
                "processes, then those workers will never come back, and `Client.restart` "
                "will always time out. Do not use `Client.restart` in that case."
            )
        if on_error == "raise":
            raise TimeoutError(msg)
        logger.error("%s (stimulus_id=%r)", msg, stimulus_id)
        new_nannies = {
            r.nanny for a, r in self.reactor.workers.items() if r.nanny and a in self.state.workers
        }
        for address, nanny in nannies.items():
            if nanny not in new_nannies:
                out[address] = "timed out"
        return out

    async def _log_event(self, topic: str, msg: dict[str, Any]) -> None:
        await self.reactor.request("log_event", _SELF, {"topic": topic, "msg": msg})

    # ------------------------------------------------------------------ cluster dump
    async def get_cluster_state(self, exclude: Collection[str] = (), **_: Any) -> dict[str, Any]:
        from distributed.versions import get_versions

        exclude = list(exclude or ())
        workers_future = asyncio.gather(
            self._broadcast({"op": "dump_state", "exclude": exclude}, on_error="return"),
            self._broadcast({"op": "versions"}, on_error="ignore"),
        )
        try:
            scheduler = scheduler_state(self.reactor, self.identity(), exclude)
            worker_states, worker_versions = await workers_future
        finally:
            workers_future.cancel()
        return {
            "scheduler": scheduler,
            "workers": {
                k: repr(v) if isinstance(v, BaseException) else v for k, v in worker_states.items()
            },
            "versions": {"scheduler": get_versions(), "workers": worker_versions},
        }

    def dump_state(self, exclude: Collection[str] = (), **_: Any) -> dict[str, Any]:
        """``Server._to_dict``: the scheduler part of the cluster dump alone."""
        return scheduler_state(self.reactor, self.identity(), list(exclude or ()))

    async def dump_cluster_state_to_url(
        self,
        url: str,
        exclude: Collection[str] = (),
        format: str = "msgpack",
        **storage_options: Any,
    ) -> None:
        from distributed import cluster_dump

        await cluster_dump.write_state(
            partial(self.get_cluster_state, exclude),
            url,
            format,  # type: ignore[arg-type]  # checked by write_state
            **storage_options,
        )


# ---------------------------------------------------------------------- the scheduler dump
# Dask's task states (distributed.scheduler.ALL_TASK_STATES), for the groups' counts.
TASK_STATES = (
    "released",
    "waiting",
    "no-worker",
    "queued",
    "processing",
    "memory",
    "erred",
    "forgotten",
)


def _task_repr(ts: TaskState) -> str:
    return f"<TaskState {ts.key!r} {ts.state}>"  # Dask's TaskState repr


def _worker_repr(ws: WorkerState) -> str:  # Dask's WorkerState repr
    name = f", name: {ws.name}" if ws.name != ws.address else ""
    return (
        f"<WorkerState {ws.address!r}{name}, status: {ws.status}, "
        f"memory: {len(ws.has_what)}, processing: {len(ws.processing)}>"
    )


def _client_repr(cs: ClientState) -> str:
    return f"<Client {cs.id!r}>"  # Dask's ClientState repr


def _counts_repr(name: str, states: dict[str, int]) -> str:
    """Dask's TaskGroup / TaskPrefix repr: ``<name: memory: 2, processing: 1>``."""
    return f"<{name}: " + ", ".join(f"{k}: {v}" for k, v in sorted(states.items()) if v) + ">"


def _group_name(key: Any) -> str:
    from distributed.utils import key_split_group

    return str(key_split_group(key))


@functools.lru_cache(maxsize=1024)
def _type_name(value: object) -> str | None:
    """Dask's ``TaskState.type``: the type's name; workers report it pickled."""
    if value is None:
        return None
    if isinstance(value, bytes):
        from dask.utils import typename

        try:
            return str(typename(pickle.loads(value)))
        except Exception:  # a type this process cannot import
            return repr(value)
    return str(value)


def _text(value: object) -> object:
    return value or None


class _Groups:
    """Task groups and prefixes as Dask counts them (name -> state -> count)."""

    def __init__(self, tasks: Iterable[TaskState]) -> None:
        self.group_of: dict[Any, str] = {}
        self.groups: dict[str, dict[str, Any]] = {}
        self.prefixes: dict[str, dict[str, int]] = {}
        for ts in tasks:
            name = self.group_of[ts.key] = _group_name(ts.key)
            group = self.groups.get(name)
            if group is None:
                group = self.groups[name] = {
                    "name": name,
                    "prefix": ts.prefix,
                    "states": dict.fromkeys(TASK_STATES, 0),
                    "nbytes_total": 0,
                    "types": set(),
                    "dependencies": set(),
                }
            group["states"][ts.state] = group["states"].get(ts.state, 0) + 1
            group["nbytes_total"] += ts.nbytes
            if ts.type is not None:
                group["types"].add(_type_name(ts.type))
            group["dependencies"].update(_group_name(d.key) for d in ts.dependencies)
            prefix = self.prefixes.setdefault(ts.prefix, dict.fromkeys(TASK_STATES, 0))
            prefix[ts.state] = prefix.get(ts.state, 0) + 1

    def group_repr(self, ts: TaskState) -> str:
        name = self.group_of[ts.key]
        return _counts_repr(name, self.groups[name]["states"])

    def prefix_repr(self, ts: TaskState) -> str:
        return _counts_repr(ts.prefix, self.prefixes[ts.prefix])

    def to_dict(self) -> dict[str, dict[str, Any]]:
        out = {}
        for name, group in self.groups.items():
            states = group["states"]
            done = not any(states[s] for s in ("released", "waiting", "queued", "processing"))
            out[name] = {
                **group,
                "prefix": _counts_repr(group["prefix"], self.prefixes[group["prefix"]]),
                "types": sorted(group["types"]),
                "dependencies": sorted(d for d in group["dependencies"] if d != name),
                "done": done,
            }
        return out


def _task_dict(ts: TaskState, groups: _Groups, exclude: Collection[str]) -> dict[str, Any]:
    """Dask's ``TaskState._to_dict_no_nest``: the record's fields, other records as reprs."""
    tasks = partial(sorted, key=str)
    worker_restrictions = ts.worker_restrictions
    d: dict[str, Any] = {
        "key": ts.key,
        "state": ts.state,
        "actor": bool(getattr(ts, "actor", False)),  # (the actors work adds the field)
        "annotations": {k: repr(v) for k, v in (ts.annotations or {}).items()},
        "dependencies": tasks(_task_repr(t) for t in ts.dependencies),
        "dependents": tasks(_task_repr(t) for t in ts.dependents),
        "erred_on": sorted(ts.erred_on) or None,
        "exception": None if ts.exception is None else repr(ts.exception),
        "exception_blame": None if ts.exception_blame is None else _task_repr(ts.exception_blame),
        "exception_text": _text(ts.exception_text),
        "group": groups.group_repr(ts),
        "group_key": groups.group_of[ts.key],
        "has_lost_dependencies": False,
        "host_restrictions": None,
        "loose_restrictions": ts.loose_restrictions,
        "metadata": None,
        "nbytes": ts.nbytes if ts.nbytes else -1,
        "prefix": groups.prefix_repr(ts),
        "priority": list(ts.priority),
        "processing_on": None if ts.processing_on is None else _worker_repr(ts.processing_on),
        "resource_restrictions": ts.resource_restrictions,
        "retries": ts.retries,
        "run_id": ts.run_id,
        "suspicious": ts.suspicious,
        "traceback": None if ts.traceback is None else repr(ts.traceback),
        "traceback_text": None,
        "type": _type_name(ts.type),
        "waiters": tasks(_task_repr(t) for t in ts.waiters),
        "waiting_on": tasks(_task_repr(t) for t in ts.waiting_on) or None,
        "who_has": tasks(_worker_repr(w) for w in ts.who_has),
        "who_wants": tasks(_client_repr(c) for c in ts.who_wants),
        "worker_restrictions": None if worker_restrictions is None else sorted(worker_restrictions),
    }
    return {k: v for k, v in d.items() if k not in exclude}


def _worker_dict(
    ws: WorkerState, metrics: dict[str, Any], last_seen: float | None, exclude: Collection[str]
) -> dict[str, Any]:
    """Dask's ``WorkerState._to_dict_no_nest`` (the fields dsched keeps)."""
    info = ws.info
    d: dict[str, Any] = {
        "actors": sorted((_task_repr(t) for t in getattr(ws, "actors", ())), key=str),
        "address": ws.address,
        "executing": {},
        "extra": {},
        "has_what": sorted((_task_repr(ts) for ts in ws.has_what), key=str),
        "host": ws.host,
        "last_seen": last_seen,
        "local_directory": info.get("local_directory", ""),
        "long_running": sorted(
            (_task_repr(ts) for ts in ws.processing if ts.long_running), key=str
        ),
        "memory_limit": ws.memory_limit,
        "metrics": metrics,
        "name": ws.name,
        "nanny": info.get("nanny"),
        "nbytes": sum(ts.nbytes for ts in ws.has_what),
        "nthreads": ws.nthreads,
        "pid": info.get("pid", 0),
        "processing": sorted((_task_repr(ts) for ts in ws.processing), key=str),
        "resources": dict(ws.resources),
        "server_id": info.get("server_id"),
        "services": info.get("services", {}),
        "status": ws.status,
    }
    return {k: v for k, v in d.items() if k not in exclude}


def _memory(
    state_workers: Iterable[WorkerState], metrics: dict[str, dict[str, Any]]
) -> dict[str, int]:
    """Dask's ``MemoryState`` from the heartbeats' metrics (no unmanaged-recent history)."""
    managed = process = spilled = 0
    for ws in state_workers:
        m = metrics.get(ws.address) or {}
        managed += sum(ts.nbytes for ts in ws.has_what)
        process += int(m.get("memory") or 0)
        spilled_bytes = m.get("spilled_bytes")
        if isinstance(spilled_bytes, dict):
            spilled += int(spilled_bytes.get("memory") or 0)
    unmanaged = max(process - managed, 0)
    return {
        "managed": managed,
        "managed_total": managed + spilled,
        "optimistic": managed + unmanaged,
        "process": process,
        "spilled": spilled,
        "unmanaged": unmanaged,
        "unmanaged_old": unmanaged,
        "unmanaged_recent": 0,
    }


def scheduler_state(
    reactor: Reactor, identity: dict[str, Any], exclude: Collection[str] = ()
) -> dict[str, Any]:
    """dsched's faithful equivalent of Dask's ``Scheduler._to_dict(exclude=...)``.

    The same top-level fields as Dask's: ``identity()``'s (type, id, address, services,
    started, n_workers, total_threads, total_memory), ``status``, ``thread_id``,
    ``transition_log`` as Dask's ``(key, start, finish, recommendations, stimulus_id,
    timestamp)`` (dsched does not record recommendations: ``{}``), ``transition_counter``
    (the moves still in the log), ``tasks`` (key -> Dask's TaskState fields, other records
    as Dask's reprs; Dask omits ``run_spec`` too; ``actor``, ``metadata``,
    ``host_restrictions``, ``has_lost_dependencies`` and ``traceback_text`` have their
    defaults), ``task_groups`` (name -> name, prefix, states, nbytes_total, types,
    dependencies, done; no durations or span), ``workers`` (address -> Dask's WorkerState
    fields but occupancy, bandwidth, time_delay, used_resources, needs_what,
    task_prefix_count, memory; ``processing`` is a list), ``clients`` (id -> client_key,
    wants_what), ``memory`` (Dask's MemoryState from the heartbeats' metrics, without the
    recent-unmanaged history), ``events`` (topic -> events and count, where Dask has a
    Topic repr) and ``extensions`` (name -> repr).
    """
    from distributed.utils import recursive_to_dict

    core = reactor.core
    state = core.state
    records = reactor.workers
    metrics = {a: r.metrics for a, r in records.items()}
    d: dict[str, Any] = {k: v for k, v in identity.items() if k != "workers"}
    d["status"] = "running"
    d["thread_id"] = threading.get_ident()
    log: list[tuple[Any, ...]] = [
        (k, a, b, {}, stim, t) for k, a, b, stim, t in state.transition_log
    ]
    d["transition_log"] = log
    d["transition_counter"] = len(log)
    groups = _Groups(state.tasks.values())
    d["tasks"] = {ts.key: _task_dict(ts, groups, exclude) for ts in state.tasks.values()}
    d["task_groups"] = groups.to_dict()
    d["workers"] = {
        a: _worker_dict(
            ws,
            metrics.get(a) or {},
            records[a].last_seen if a in records else None,
            exclude,
        )
        for a, ws in state.workers.items()
    }
    d["clients"] = {
        cid: {"client_key": cid, "wants_what": sorted((_task_repr(t) for t in cs.wants), key=str)}
        for cid, cs in state.clients.items()
    }
    d["memory"] = _memory(state.workers.values(), metrics)
    topics = getattr(core.extensions.get("pubsub"), "topics", {})
    d["events"] = {
        name: {"events": [list(e) for e in topic.events], "count": topic.count}
        for name, topic in topics.items()
    }
    d["extensions"] = {name: repr(ext) for name, ext in core.extensions.items()}
    # As Dask's: tuples become lists, a key that is not hashable then becomes its str.
    return dict(recursive_to_dict({k: v for k, v in d.items() if k not in exclude}))
