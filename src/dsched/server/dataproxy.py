"""The data proxy: ``gather``, ``scatter``, ``update_data`` and ``broadcast`` through the
scheduler.

Theory of operation
-------------------
A Client that does not talk to workers directly moves data through the scheduler: gather
fetches keys from their holders with the workers' ``get_data`` (payloads stay opaque
``Serialized`` objects: the scheduler never deserializes user data), scatter places data on
running workers with ``update_data`` and then records it in the task state (``DataPlaced``),
and broadcast sends one RPC to many workers or nannies. These are the only handlers that do
I/O on behalf of a request; each one is an ``async`` function of the request's fields.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections import defaultdict
from collections.abc import Iterable
from typing import Any

from dask.utils import parse_timedelta

from dsched.comm import CommClosedError
from dsched.core import inbound
from dsched.server.errors import pickled_exception
from dsched.server.ops import RpcOp, call
from dsched.server.reactor import Reactor
from dsched.wire import ProtocolError

logger = logging.getLogger("dsched.scheduler")

GATHER_ATTEMPTS = 3
BUSY_RETRY_DELAYS = (0.0, 0.05, 0.2, 0.5)  # a worker answering "busy" is asked again


class DataProxy:
    def __init__(self, reactor: Reactor) -> None:
        self.reactor = reactor
        self.state = reactor.core.state
        self.pool = reactor.pool

    def rpc_ops(self) -> dict[str, RpcOp]:
        return {
            "gather": call(self.gather),
            "scatter": call(self.scatter),
            "update_data": call(self.update_data),
            "broadcast": call(self.broadcast),
        }

    # ------------------------------------------------------------------ gather
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
        for _attempt in range(GATHER_ATTEMPTS):
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
        for delay in BUSY_RETRY_DELAYS:
            await asyncio.sleep(delay)  # a back-off, not a poll: "busy" asks us to wait
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

    # ------------------------------------------------------------------ scatter
    def running_workers(self, restrict: Iterable[str] | None) -> list[str]:
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

    async def scatter(
        self,
        data: dict[Any, Any],
        workers: Iterable[str] | None = None,
        client: str | None = None,
        broadcast: bool | int = False,
        timeout: float = 2,
        **_: Any,
    ) -> list[Any]:
        restrict = None if workers is None else list(workers)
        wait = float(parse_timedelta(timeout)) if timeout else 0.0
        await self.reactor.wait_for(lambda: bool(self.running_workers(restrict)), wait)
        candidates = self.running_workers(restrict)
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

    def update_data(
        self, who_has: dict[Any, Any], nbytes: dict[Any, int], client: str | None = None, **_: Any
    ) -> None:
        self.reactor.handle(inbound.data_placed(client, who_has, nbytes))

    # ------------------------------------------------------------------ broadcast
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
            record = self.reactor.workers.get(address)
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
