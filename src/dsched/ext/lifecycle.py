"""Cluster lifecycle: ``restart`` and ``retire_workers``, driven by events, never polled.

Theory of operation
-------------------
**restart** (Dask's ``Scheduler.restart``): every client lets go of every key (the
``Restart`` state event: running tasks are freed, clients told to reset), workers without a
nanny are removed, and every nanny is asked to ``kill`` its worker (an ``Rpc`` effect with
the restart's timeout); a nanny that fails or times out has its worker removed. The request
is answered once every nanny replied and, with ``wait_for_workers``, once as many workers as
before are registered again and none of the old ones remains: a parked request, re-checked
on each ``WorkerConnected`` / ``WorkerDisconnected``, failed with Dask's ``TimeoutError``
text by a timer. ``restarts`` counts started restarts and ``restarting`` tells whether one is
running: graph intake, which runs in a thread, drops a graph that a restart overtook.

**retire_workers**: the workers stop taking tasks and the keys only they hold are copied to
other running workers (the ``RetireWorkers`` state event sends ``acquire-replicas``). The
request is parked until no key is left only on them (re-checked on each ``AddKeys`` and
worker removal); a timer repeats ``RetireWorkers`` every second (tasks still finishing there
make new unique data, a recipient may fail a fetch), and after four connect timeouts the
rest is left to be recomputed. Then the workers are removed as an expected loss, and the
reply maps each address to its identity. Without ``workers`` or ``names``, the workers are
those ``workers_to_close`` picks from the other fields (``n``, ``target``, ``minimum``,
``memory_ratio``; ``ext/adaptive.py``), as Dask's ``retire_workers(**kwargs)``.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Set
from dataclasses import dataclass, field
from typing import Any, ClassVar

from dsched.ext.adaptive import workers_to_close
from dsched.ext.protocol import (
    CancelTimer,
    Effect,
    Effects,
    Extension,
    Fail,
    Log,
    Reply,
    Request,
    Rpc,
    SetTimer,
    Stimulus,
)
from dsched.ext.pubsub import PubSub
from dsched.state import events as ev
from dsched.state.machine import WorkerState

RETIRE_RETRY_INTERVAL = 1.0
# retire_workers' fields that choose the workers through workers_to_close(), as Dask's.
WORKERS_TO_CLOSE_FIELDS = frozenset({"memory_ratio", "n", "minimum", "target"})


@dataclass
class _Restart:
    request: int
    stimulus_id: str
    timeout: float
    wait_for_workers: bool
    old: frozenset[str]
    n_workers: int
    kills_pending: set[str] = field(default_factory=set)
    results: dict[str, str] = field(default_factory=dict)
    waiting: bool = False  # every nanny answered; waiting for the workers to return


@dataclass
class _Retire:
    request: int
    addresses: list[str]
    stimulus_id: str
    retired: dict[str, Any]
    close: bool


def worker_identity(ws: WorkerState) -> dict[str, Any]:
    """What ``identity`` and ``retire_workers`` report of a worker, from its registration."""
    info = ws.info
    return {
        "type": "Worker",
        "id": info.get("server_id", ws.address),
        "host": ws.host,
        "resources": ws.resources,
        "local_directory": info.get("local_directory", ""),
        "name": ws.name,
        "nthreads": ws.nthreads,
        "memory_limit": ws.memory_limit,
        "services": info.get("services", {}),
        "status": ws.status,
        "nanny": info.get("nanny"),
    }


class Lifecycle(Extension):
    name = "lifecycle"
    rpc_ops: ClassVar = {"restart": "restart", "retire_workers": "retire_workers"}
    observes = frozenset({ev.WorkerConnected, ev.WorkerDisconnected, ev.AddKeys})

    def __init__(
        self,
        pubsub: PubSub,
        connect_timeout: float = 30.0,
        busy_workers: Callable[[], Set[str]] = frozenset,
    ) -> None:
        self.pubsub = pubsub
        self.connect_timeout = connect_timeout
        # Workers that workers_to_close must not pick (P2P shuffles' participants: Dask's
        # ShuffleSchedulerPlugin.valid_workers_downscaling).
        self.busy_workers = busy_workers
        self.restarts = 0
        self._restarts: dict[int, _Restart] = {}
        self._retires: dict[int, _Retire] = {}

    @property
    def restarting(self) -> bool:
        return bool(self._restarts)

    # ------------------------------------------------------------------ restart
    def restart(self, request: Request, now: float) -> Effects:
        args = request.args
        stimulus_id = str(args.get("stimulus_id") or f"restart-{now}")
        timeout = float(args.get("timeout", 30) or 30)
        workers = self.state.workers
        job = _Restart(
            request.id,
            stimulus_id,
            timeout,
            bool(args.get("wait_for_workers", True)),
            frozenset(workers),
            len(workers),
        )
        self.restarts += 1
        self._restarts[request.id] = job
        effects: list[Effect] = [
            Log("info", f"restarting: releasing every key and every worker ({stimulus_id})"),
            Stimulus(ev.Restart(stimulus_id)),
        ]
        for address, ws in list(workers.items()):
            nanny = ws.info.get("nanny")
            if nanny:
                job.kills_pending.add(address)
                effects.append(
                    Rpc(
                        str(nanny),
                        {"op": "kill", "reason": stimulus_id},
                        ("kill", request.id, address),
                        timeout=timeout,
                    )
                )
            else:
                effects.append(Log("warning", f"worker {address} has no nanny: closing it"))
                effects.append(Stimulus(ev.WorkerDisconnected(address, True, stimulus_id)))
                job.results[address] = "removed"
        effects.extend(self._restart_progress(job, now))
        return effects

    def _restart_progress(self, job: _Restart, now: float) -> list[Effect]:
        if job.kills_pending or job.request not in self._restarts:
            return []
        if not job.wait_for_workers or self._workers_back(job):
            return [*self._end_restart(job, now), Reply(job.request, job.results)]
        if job.waiting:
            return []
        job.waiting = True
        return [SetTimer(("restart-wait", job.request), now + job.timeout)]

    def _end_restart(self, job: _Restart, now: float) -> list[Effect]:
        del self._restarts[job.request]
        effects: list[Effect] = list(
            self.pubsub.publish(
                "all", {"action": "restart-workers", "workers": sorted(job.old)}, now
            )
        )
        effects.append(CancelTimer(("restart-wait", job.request)))
        return effects

    def _workers_back(self, job: _Restart) -> bool:
        workers = self.state.workers
        return len(workers) >= job.n_workers and not (job.old & workers.keys())

    # ------------------------------------------------------------------ retire
    def retire_workers(self, request: Request, now: float) -> Effects:
        args = request.args
        workers = self.state.workers
        stimulus_id = str(args.get("stimulus_id") or f"retire-workers-{now}")
        selected: Any = args.get("workers")
        names = args.get("names")
        # Dask passes any other field to workers_to_close() when no worker is named.
        to_close = {k: v for k, v in args.items() if k in WORKERS_TO_CLOSE_FIELDS}
        if (names is not None or selected is not None) and to_close:
            return [
                Fail(
                    request.id,
                    TypeError(
                        "Parameters for workers_to_close() are mutually exclusive with "
                        f"names and workers: {to_close}"
                    ),
                )
            ]
        if args.get("key") is not None:
            # A pickled grouping function is user code: the pure core never runs it.
            return [
                Fail(
                    request.id,
                    TypeError(
                        "dsched: retire_workers(key=...) is not supported; ask "
                        "workers_to_close(key=...) and retire those workers"
                    ),
                )
            ]
        if names is not None:
            wanted = {str(name) for name in names}
            selected = [ws.address for ws in workers.values() if str(ws.name) in wanted]
        elif selected is None:
            busy = self.busy_workers()
            chosen = workers_to_close(
                list(workers.values()),
                allowed=lambda candidates: [ws for ws in candidates if ws.address not in busy],
                **to_close,
            )
            selected = [ws.address for ws in chosen]
        addresses = [a for a in dict.fromkeys(selected or ()) if a in workers]
        # Actors cannot be moved: Dask's RetireWorker leaves a worker holding any running.
        refused = [
            Log(
                "warning",
                f"Tried retiring worker {a}, but it holds actor(s) "
                f"{sorted(map(str, (ts.key for ts in workers[a].actors)))}, which can't be "
                "moved. The worker will not be retired.",
            )
            for a in addresses
            if workers[a].actors
        ]
        addresses = [a for a in addresses if not workers[a].actors]
        if not addresses:
            return [*refused, Reply(request.id, {})]
        others = [
            ws for ws in workers.values() if ws.address not in addresses and ws.status == "running"
        ]
        if not others and self.state.unique_keys_on(addresses):
            return [
                *refused,
                Log("warning", f"not retiring {addresses}: no other running worker for its data"),
                Reply(request.id, {}),
            ]
        job = _Retire(
            request.id,
            addresses,
            stimulus_id,
            {a: worker_identity(workers[a]) for a in addresses},
            bool(args.get("remove", True) or args.get("close_workers", True)),
        )
        self._retires[request.id] = job
        effects: list[Effect] = [
            *refused,
            Log("info", f"retiring workers {addresses} ({stimulus_id})"),
            Stimulus(ev.RetireWorkers(addresses, stimulus_id)),
        ]
        if not self.state.unique_keys_on(addresses):
            return effects + self._end_retire(job)
        return [
            *effects,
            SetTimer(("retire-retry", request.id), now + RETIRE_RETRY_INTERVAL),
            SetTimer(("retire-deadline", request.id), now + 4 * self.connect_timeout),
        ]

    def _end_retire(self, job: _Retire) -> list[Effect]:
        del self._retires[job.request]
        effects: list[Effect] = [
            CancelTimer(("retire-retry", job.request)),
            CancelTimer(("retire-deadline", job.request)),
        ]
        if job.close:
            effects += [
                Stimulus(ev.WorkerDisconnected(a, True, job.stimulus_id))
                for a in job.addresses
                if a in self.state.workers
            ]
        effects.append(Reply(job.request, job.retired))
        return effects

    # ------------------------------------------------------------------ observations
    def on_event(self, event: ev.Event, now: float) -> Effects:
        effects: list[Effect] = []
        for job in list(self._retires.values()):
            if not self.state.unique_keys_on(job.addresses):
                effects += self._end_retire(job)
        if isinstance(event, ev.WorkerConnected | ev.WorkerDisconnected):
            for restart in list(self._restarts.values()):
                effects += self._restart_progress(restart, now)
        return effects

    def on_rpc_reply(
        self, token: Hashable, reply: Any, error: BaseException | None, now: float
    ) -> Effects:
        if not isinstance(token, tuple) or token[0] != "kill":
            return []
        request: int = token[1]
        address: str = token[2]
        job = self._restarts.get(request)
        if job is None or address not in job.kills_pending:
            return []
        job.kills_pending.discard(address)
        effects: list[Effect] = []
        if error is None:
            job.results[address] = "OK"
        else:
            job.results[address] = "timed out"
            effects.append(Log("error", f"the nanny of {address} did not restart it: {error!r}"))
            if address in self.state.workers:
                effects.append(Stimulus(ev.WorkerDisconnected(address, True, job.stimulus_id)))
        return effects + self._restart_progress(job, now)

    def on_timer(self, token: Hashable, now: float) -> Effects:
        if not isinstance(token, tuple):
            return []
        kind: str = token[0]
        request: int = token[1]
        if kind == "restart-wait":
            job = self._restarts.get(request)
            if job is None:
                return []
            missing = job.n_workers - len(self.state.workers)
            effects = self._end_restart(job, now)
            effects.append(
                Fail(
                    request,
                    TimeoutError(
                        f"Waited for {job.n_workers} worker(s) to reconnect after restarting "
                        f"but, after {job.timeout}s, {missing} have not returned."
                    ),
                )
            )
            return effects
        retire = self._retires.get(request)
        if retire is None:
            return []
        if kind == "retire-retry":
            return [
                Stimulus(ev.RetireWorkers(retire.addresses, retire.stimulus_id)),
                SetTimer(("retire-retry", request), now + RETIRE_RETRY_INTERVAL),
            ]
        pending = self.state.unique_keys_on(retire.addresses)
        return [
            Log(
                "warning",
                f"retiring {retire.addresses}: {len(pending)} keys still only there; "
                "they will be recomputed",
            ),
            *self._end_retire(retire),
        ]

