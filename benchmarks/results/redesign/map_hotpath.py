"""CPU per task of state machine + policy on a client.map-shaped graph (every task wanted).

    PYTHONPATH=<tree>/src python benchmarks/results/redesign/map_hotpath.py

Runs against the tree before the redesign (no ``dsched.core``: the old loop is played here)
and after it (the ``Core`` with the default extensions), so the two can be compared.
"""

from __future__ import annotations

import collections
import time
from typing import Any

from dsched.policy import PolicyConfig, make_policy
from dsched.server.errors import killed_worker
from dsched.state import events as ev
from dsched.state.machine import SchedulerState

try:
    from dsched.core import Core
    from dsched.ext.registry import default_extensions

    REDESIGNED = True
except ImportError:
    REDESIGNED = False

N_TASKS = 20_000
BATCH = 50


def run() -> float:
    state = SchedulerState(killed_worker=killed_worker)
    policy = make_policy("dask", PolicyConfig())
    sent: collections.deque[tuple[str, Any, Any]] = collections.deque()
    if REDESIGNED:
        core = Core(state, policy, default_extensions())

        def handle(event: Any, now: float) -> None:
            core.handle(event, now)

        def flush(now: float) -> None:
            out = core.flush(now).out
            for address, msgs in out.to_workers.items():
                sent.extend(
                    (address, m["key"], m["run_id"]) for m in msgs if m["op"] == "compute-task"
                )

    else:
        from dsched.state.outbox import Outbox

        pending = [Outbox()]

        def handle(event: Any, now: float) -> None:
            state.handle(event, now, pending[0])

        def flush(now: float) -> None:
            out, pending[0] = pending[0], Outbox()
            while out.policy:
                events, out.policy = out.policy, []
                decisions = policy.handle(events, now)
                if decisions:
                    state.handle(ev.PolicyDecisions(decisions), now, out)
            for address, msgs in out.to_workers.items():
                sent.extend(
                    (address, m["key"], m["run_id"]) for m in msgs if m["op"] == "compute-task"
                )

    for i in range(8):
        handle(ev.WorkerConnected(f"tcp://127.0.0.1:{10000 + i}", 1), 0.0)
    handle(ev.ClientConnected("c"), 0.0)
    flush(0.0)
    tasks = [ev.NewTask(f"inc-{i}", (), b"x", {}) for i in range(N_TASKS)]
    order = {task.key: i for i, task in enumerate(tasks)}
    started = time.process_time()
    handle(ev.GraphReceived("c", tasks, [task.key for task in tasks], order), 0.0)
    flush(0.0)
    now = 0.0
    while sent:
        now += 0.001
        for _ in range(min(BATCH, len(sent))):
            address, key, run_id = sent.popleft()
            handle(ev.TaskFinished(address, key, run_id, 8, type=b"int"), now)
        flush(now)
    return (time.process_time() - started) / N_TASKS * 1e6


if __name__ == "__main__":
    label = "redesigned" if REDESIGNED else "before"
    print(f"{label}: {min(run() for _ in range(3)):.1f} us/task")
