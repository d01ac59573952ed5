"""Replicas on purpose: ``replicate``, ``rebalance`` and the active memory manager.

Theory of operation
-------------------
All three change where data lives, never what is computed, with the worker operations
Dask uses: a worker copies keys from their holders with the ``gather`` RPC (an ``Rpc``
effect; its reply says which keys failed), and a replica is dropped with
``DropReplicas`` (the scheduler forgets it at once and sends ``remove-replicas``; never a
key's last replica; a worker that must keep it answers ``add-keys``). Copies that
arrived are recorded with ``AddKeys``, as if the worker had said so.

**replicate(keys, n, workers, branching_factor, delete)** (Dask's ``Scheduler.replicate``):
on the running workers among ``workers`` (addresses, or hosts matched as substrings, like
``workers_list``), each key ends up on ``n`` of them (all by default). Unknown keys raise
``KeyError``; keys held nowhere give ``{"status": "partial-fail", "keys": [...]}``; ``n``
0 raises ``ValueError``. With ``delete``, replicas beyond ``n`` among those workers are
dropped first. Then rounds of copies: each key short of replicas is copied to at most
``branching_factor`` new workers per holder, and the request is answered (``None``) once
every key has its replicas or was forgotten. A round starts once the previous one's
copies are recorded (a timer due at once: the next turn of the loop). Where Dask picks
recipients and droppers with ``random.sample``, dsched picks the workers with the least
(recipients) or most (droppers) managed memory; and a round in which no copy succeeded
ends the request (Dask would retry forever).

**rebalance(keys, workers)**: Dask's algorithm (``_rebalance_find_msgs``): workers above
the mean memory by more than half the sender-recipient gap (and above ``sender-min``)
send their least recently computed keys (dsched has no insertion order per worker: the
oldest tasks first) to the workers farthest below it (under ``recipient-max``) that lack
them, until both sides are within the gap; then the recipients ``gather`` them and the
senders drop them. The memory measure is *managed* memory (the sizes of the keys a
worker holds): dsched has no workers' process memory in its pure state, so
``distributed.worker.memory.rebalance.measure`` is not read. Keys not in memory anywhere
give ``partial-fail`` (only when ``keys`` were named, as in Dask).

**The active memory manager** (``amm_handler(method)`` with ``start``, ``stop``,
``run_once``, ``running``): Dask's ``ReduceReplicas`` policy, the one of Dask's default
configuration. Each key in memory on more than ``max(1, waiters)`` workers (waiters
counted per worker they run on, below 20) loses the excess replicas, from the workers with
the most managed memory, paused or retiring ones first, never from a worker running a
task that needs it, never an actor. It runs every
``distributed.scheduler.active-memory-manager.interval`` (a timer) while started; started
at start-up when ``...active-memory-manager.start`` is true (Dask's default). The first
timer is armed when the first worker connects (the extension has no start-up hook).
"""

from __future__ import annotations

import heapq
from collections import defaultdict
from collections.abc import Hashable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

from dask.utils import parse_timedelta

from dsched.ext.protocol import (
    CancelTimer,
    Effect,
    Effects,
    Extension,
    Fail,
    Reply,
    Request,
    Rpc,
    SetTimer,
    Stimulus,
)
from dsched.ext.pubsub import PubSub
from dsched.state import events as ev
from dsched.state.edges import MEMORY
from dsched.state.records import Key, TaskState, WorkerState

AMM_TIMER = ("amm",)


def managed_memory(ws: WorkerState) -> int:
    """Bytes of the keys ``ws`` holds (Dask's ``ws.memory.managed``)."""
    return sum(ts.nbytes for ts in ws.has_what)


def is_actor(ts: TaskState) -> bool:
    """Actors are never replicated, dropped or moved (Dask's AMM and rebalance)."""
    return ts.actor


@dataclass
class _Copies:
    """One request's copies in flight: ``gather`` RPCs by recipient."""

    request: int
    stimulus_id: str
    pending: set[str] = field(default_factory=set)
    failed: set[Key] = field(default_factory=set)
    arrived: int = 0


@dataclass
class _Replicate(_Copies):
    tasks: set[TaskState] = field(default_factory=set)
    workers: set[WorkerState] = field(default_factory=set)
    n: int = 1
    branching_factor: int = 2
    key_count: int = 0


@dataclass
class _Rebalance(_Copies):
    moves: list[tuple[str, str, Key]] = field(default_factory=list)  # sender, recipient, key
    report_failed: bool = False


class MemoryManager(Extension):
    name = "memory"
    rpc_ops: ClassVar = {
        "replicate": "replicate",
        "rebalance": "rebalance",
        "amm_handler": "amm_handler",
    }
    observes = frozenset({ev.WorkerConnected})

    def __init__(
        self,
        pubsub: PubSub | None = None,
        *,
        amm_start: bool = True,
        amm_interval: float = 2.0,
        sender_min: float = 0.3,
        recipient_max: float = 0.6,
        half_gap: float = 0.05,
    ) -> None:
        self.pubsub = pubsub
        self.amm_running = amm_start
        self.amm_interval = amm_interval
        self._amm_armed = False
        self.sender_min = sender_min
        self.recipient_max = recipient_max
        self.half_gap = half_gap
        self._jobs: dict[int, _Replicate | _Rebalance] = {}

    @classmethod
    def from_config(cls, values: Mapping[str, Any], pubsub: PubSub | None = None) -> MemoryManager:
        prefix = "distributed.scheduler.active-memory-manager."
        rebalance = "distributed.worker.memory.rebalance."
        return cls(
            pubsub,
            amm_start=bool(values[prefix + "start"]),
            amm_interval=float(parse_timedelta(values[prefix + "interval"])),
            sender_min=float(values[rebalance + "sender-min"]),
            recipient_max=float(values[rebalance + "recipient-max"]),
            half_gap=float(values[rebalance + "sender-recipient-gap"]) / 2,
        )

    def _log(self, topic: str, msg: dict[str, Any], now: float) -> list[Effect]:
        return [] if self.pubsub is None else self.pubsub.publish(topic, msg, now)

    def _running_workers(self, selected: Iterable[str] | None) -> set[WorkerState]:
        workers = self.state.workers
        if selected is None:
            chosen = set(workers.values())
        else:
            chosen = set()
            for name in selected:
                if ":" in str(name):
                    chosen.add(workers[name])  # KeyError for an unknown worker, as Dask
                else:
                    chosen.update(ws for a, ws in workers.items() if str(name) in a)
        return {ws for ws in chosen if ws.status == "running"}

    # ------------------------------------------------------------------ replicate
    def replicate(self, request: Request, now: float) -> Effects:
        args = request.args
        stimulus_id = str(args.get("stimulus_id") or f"replicate-{now}")
        branching_factor = int(args.get("branching_factor", 2) or 0)
        if branching_factor <= 0:
            return [Fail(request.id, AssertionError("branching_factor must be positive"))]
        try:  # Dask's order of checks: workers, n, then keys
            workers = self._running_workers(args.get("workers"))
            n = len(workers) if args.get("n") is None else min(int(args["n"]), len(workers))
            if n == 0:
                raise ValueError("Can not use replicate to delete data")
            tasks = {self.state.tasks[k] for k in args.get("keys") or ()}
        except (KeyError, ValueError) as exc:
            return [Fail(request.id, exc)]
        missing = [ts.key for ts in tasks if not ts.who_has]
        if missing:
            return [Reply(request.id, {"status": "partial-fail", "keys": missing})]
        effects: list[Effect] = []
        if args.get("delete", True):
            memory = {ws: managed_memory(ws) for ws in workers}
            drops: dict[str, list[Key]] = defaultdict(list)
            for ts in tasks:
                holders = ts.who_has & workers
                if len(holders) > n and not is_actor(ts):
                    ranked = sorted(holders, key=lambda ws: (-memory[ws], ws.id))
                    for ws in ranked[: len(holders) - n]:
                        drops[ws.address].append(ts.key)
            effects += [
                Stimulus(ev.DropReplicas(a, keys, stimulus_id)) for a, keys in drops.items()
            ]
        job = _Replicate(
            request.id,
            stimulus_id,
            tasks={ts for ts in tasks if not is_actor(ts)},
            workers=workers,
            n=n,
            branching_factor=branching_factor,
            key_count=len(tasks),
        )
        self._jobs[request.id] = job
        effects += self._replicate_round(job, now)
        return effects

    def _replicate_round(self, job: _Replicate, now: float) -> list[Effect]:
        tasks = self.state.tasks
        live = {ws for ws in job.workers if self.state.workers.get(ws.address) is ws}
        memory = {ws: managed_memory(ws) for ws in live}
        gathers: dict[str, dict[Key, list[str]]] = defaultdict(dict)
        for ts in list(job.tasks):
            n_missing = job.n - len(ts.who_has & live)
            if tasks.get(ts.key) is not ts or ts.state != MEMORY or n_missing <= 0:
                job.tasks.discard(ts)  # forgotten, lost, or replicated enough
                continue
            count = min(n_missing, job.branching_factor * len(ts.who_has))
            ranked = sorted(live - ts.who_has, key=lambda ws: (memory[ws], ws.id))
            for ws in ranked[:count]:
                gathers[ws.address][ts.key] = [w.address for w in ts.who_has]
                memory[ws] += ts.nbytes
        if not gathers:
            del self._jobs[job.request]
            msg = {
                "action": "replicate",
                "workers": sorted(ws.address for ws in job.workers),
                "key-count": job.key_count,
                "branching-factor": job.branching_factor,
            }
            return [*self._log("all", msg, now), Reply(job.request, None)]
        job.arrived = 0
        return self._gather(job, gathers, now)

    def _gather(
        self, job: _Copies, gathers: Mapping[str, dict[Key, list[str]]], now: float
    ) -> list[Effect]:
        effects: list[Effect] = []
        for address, who_has in gathers.items():
            job.pending.add(address)
            token = ("gather", job.request, address, tuple(who_has))
            effects.append(Rpc(address, {"op": "gather", "who_has": who_has}, token))
        return effects

    # ------------------------------------------------------------------ rebalance
    def rebalance(self, request: Request, now: float) -> Effects:
        args = request.args
        stimulus_id = str(args.get("stimulus_id") or f"rebalance-{now}")
        workers = self.state.workers
        try:
            selected = (
                list(workers.values())
                if args.get("workers") is None
                else [workers[a] for a in args["workers"]]
            )
        except KeyError as exc:
            return [Fail(request.id, exc)]
        keys: set[Key] | None = None
        if args.get("keys") is not None:
            keys = set(args["keys"])
            if not keys:
                return [Reply(request.id, {"status": "OK"})]
            tasks = self.state.tasks
            missing = [k for k in keys if k not in tasks or not tasks[k].who_has]
            if missing:
                return [Reply(request.id, {"status": "partial-fail", "keys": missing})]
        if not selected:
            return [Reply(request.id, {"status": "OK"})]
        moves = self.rebalance_moves(keys, selected)
        if not moves:
            msg = {"action": "rebalance", "senders": 0, "recipients": 0, "moved_keys": 0}
            return [*self._log("all", msg, now), Reply(request.id, {"status": "OK"})]
        job = _Rebalance(
            request.id,
            stimulus_id,
            moves=[(s.address, r.address, ts.key) for s, r, ts in moves],
            report_failed=keys is not None,
        )
        self._jobs[request.id] = job
        gathers: dict[str, dict[Key, list[str]]] = defaultdict(dict)
        for sender, recipient, ts in moves:
            gathers[recipient.address].setdefault(ts.key, []).append(sender.address)
        return self._gather(job, gathers, now)

    def rebalance_moves(
        self, keys: set[Key] | None, workers: Iterable[WorkerState]
    ) -> list[tuple[WorkerState, WorkerState, TaskState]]:
        """Dask's ``_rebalance_find_msgs`` on managed memory: (sender, recipient, task)."""
        memory = [(ws, managed_memory(ws)) for ws in workers]
        mean = sum(m for _, m in memory) // len(memory)
        senders: list[Any] = []
        recipients: list[Any] = []
        for ws, used in memory:
            if ws.memory_limit:
                half_gap = int(self.half_gap * ws.memory_limit)
                sender_min = self.sender_min * ws.memory_limit
                recipient_max = self.recipient_max * ws.memory_limit
            else:
                half_gap, sender_min, recipient_max = 0, 0.0, float("inf")
            if ws.has_what and used >= mean + half_gap and used >= sender_min:
                most = mean - used
                oldest_first = iter(sorted(ws.has_what, key=lambda ts: ts.id))
                senders.append((most, most + half_gap, ws.id, ws, oldest_first))
            elif used < mean - half_gap and used < recipient_max:
                most = used - mean
                recipients.append((most, most + half_gap, ws.id, ws))
        moves: list[tuple[WorkerState, WorkerState, TaskState]] = []
        if not senders or not recipients:
            return moves
        heapq.heapify(senders)
        heapq.heapify(recipients)
        while senders and recipients:
            snd_max, snd_min, _, snd_ws, tasks = senders[0]
            for ts in tasks:
                if (keys is not None and ts.key not in keys) or is_actor(ts):
                    continue
                nbytes = ts.nbytes
                if nbytes + snd_max > 0:
                    continue
                skipped = []
                use = False
                while recipients and not use:
                    rec_max, rec_min, _, rec_ws = recipients[0]
                    if nbytes + rec_max > 0:
                        break
                    use = ts not in rec_ws.has_what
                    if not use:
                        skipped.append(heapq.heappop(recipients))
                for entry in skipped:
                    heapq.heappush(recipients, entry)
                if not use:
                    continue
                moves.append((snd_ws, rec_ws, ts))
                snd_max += nbytes
                snd_min += nbytes
                rec_max += nbytes
                rec_min += nbytes
                if snd_min < 0:
                    heapq.heapreplace(senders, (snd_max, snd_min, snd_ws.id, snd_ws, tasks))
                else:
                    heapq.heappop(senders)
                if rec_min < 0:
                    heapq.heapreplace(recipients, (rec_max, rec_min, rec_ws.id, rec_ws))
                else:
                    heapq.heappop(recipients)
                break
            else:
                heapq.heappop(senders)
        return moves

    def _end_rebalance(self, job: _Rebalance, now: float) -> list[Effect]:
        del self._jobs[job.request]
        to_senders: dict[str, list[Key]] = defaultdict(list)
        to_recipients: dict[str, int] = defaultdict(int)
        for sender, recipient, key in job.moves:
            to_recipients[recipient] += 1
            if key not in job.failed:
                to_senders[sender].append(key)
        effects: list[Effect] = [
            Stimulus(ev.DropReplicas(a, keys, job.stimulus_id)) for a, keys in to_senders.items()
        ]
        msg = {
            "action": "rebalance",
            "senders": {a: len(keys) for a, keys in to_senders.items()},
            "recipients": dict(to_recipients),
            "moved_keys": len(job.moves),
        }
        effects += self._log("all", msg, now)
        if job.failed and job.report_failed:
            effects.append(Reply(job.request, {"status": "partial-fail", "keys": list(job.failed)}))
        else:
            effects.append(Reply(job.request, {"status": "OK"}))
        return effects

    # ------------------------------------------------------------------ copies arriving
    def on_rpc_reply(
        self, token: Hashable, reply: Any, error: BaseException | None, now: float
    ) -> Effects:
        if not isinstance(token, tuple) or token[0] != "gather":
            return []
        _, request, address, keys = token
        job = self._jobs.get(request)
        if job is None or address not in job.pending:
            return []
        job.pending.discard(address)
        failed: set[Key] = set(keys)
        if error is None and isinstance(reply, dict) and address in self.state.workers:
            if reply.get("status") == "OK":
                failed = set()
            elif reply.get("status") == "partial-fail":
                failed = set(reply.get("keys") or ()) & failed
        effects: list[Effect] = []
        arrived = [k for k in keys if k not in failed]
        if arrived:
            job.arrived += len(arrived)
            effects.append(Stimulus(ev.AddKeys(address, arrived, job.stimulus_id)))
        job.failed |= failed
        if job.pending:
            return effects
        if isinstance(job, _Rebalance):
            return effects + self._end_rebalance(job, now)
        if not job.arrived:  # nothing copied this round: stop rather than retry forever
            job.tasks.clear()
        # The next round once the copies are recorded (the AddKeys above are applied
        # after this returns): at once, on the next turn of the loop.
        return [*effects, SetTimer(("replicate-round", job.request), now)]

    # ------------------------------------------------------------------ the AMM
    def amm_handler(self, request: Request, now: float) -> Effects:
        method = request.args.get("method")
        if method == "start":
            if self.amm_running:
                return [Reply(request.id, None)]
            self.amm_running = True
            return [*self._arm(now), Reply(request.id, None)]
        if method == "stop":
            self.amm_running = False
            self._amm_armed = False
            return [CancelTimer(AMM_TIMER), Reply(request.id, None)]
        if method == "run_once":
            return [*self.reduce_replicas(now), Reply(request.id, None)]
        if method == "running":
            return [Reply(request.id, self.amm_running)]
        return [Fail(request.id, AssertionError(f"unknown amm_handler method {method!r}"))]

    def _arm(self, now: float) -> list[Effect]:
        if self._amm_armed or not self.amm_running:
            return []
        self._amm_armed = True
        return [SetTimer(AMM_TIMER, now + self.amm_interval)]

    def on_event(self, event: ev.Event, now: float) -> Effects:
        return self._arm(now)

    def on_timer(self, token: Hashable, now: float) -> Effects:
        if isinstance(token, tuple) and token[0] == "replicate-round":
            job = self._jobs.get(token[1])
            return self._replicate_round(job, now) if isinstance(job, _Replicate) else []
        if token != AMM_TIMER:
            return []
        self._amm_armed = False
        if not self.amm_running:
            return []
        return [*self.reduce_replicas(now), *self._arm(now)]

    def reduce_replicas(self, now: float) -> list[Effect]:
        """One run of Dask's ReduceReplicas policy, its drops enacted."""
        workers = self.state.workers.values()
        replicated = {
            ts for ws in workers for ts in ws.has_what if len(ts.who_has) > 1 and ts.state == MEMORY
        }
        if not replicated:
            return []
        memory = {ws: managed_memory(ws) for ws in workers}
        drops: dict[str, list[Key]] = defaultdict(list)
        for ts in sorted(replicated, key=lambda ts: ts.id):
            waiters = len(ts.waiters)
            if 1 < waiters < 20:
                waiters = len({w.processing_on or w for w in ts.waiters})
            pending: set[WorkerState] = set()
            for _ in range(len(ts.who_has) - max(1, waiters)):
                ws = self._dropper(ts, pending, memory)
                if ws is None:
                    break
                pending.add(ws)
                memory[ws] = max(0, memory[ws] - ts.nbytes)
                drops[ws.address].append(ts.key)
        stimulus_id = f"active_memory_manager-{now}"
        return [Stimulus(ev.DropReplicas(a, keys, stimulus_id)) for a, keys in drops.items()]

    @staticmethod
    def _dropper(
        ts: TaskState, pending: set[WorkerState], memory: Mapping[WorkerState, int]
    ) -> WorkerState | None:
        """Dask's ``_find_dropper`` with no candidates given."""
        if len(ts.who_has) - len(pending) < 2 or is_actor(ts):
            return None
        candidates = ts.who_has - pending
        running_dependents = candidates & {
            w.processing_on for w in ts.waiters if w.processing_on is not None
        }
        candidates -= running_dependents
        if not candidates:
            return None
        choice = max(candidates, key=lambda ws: (ws.status != "running", memory[ws], ws.id))
        if (
            len(candidates) == 1
            and choice.status == "running"
            and running_dependents
            and all(ws.status != "running" for ws in running_dependents)
        ):
            return None
        return choice
