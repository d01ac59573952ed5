"""The automaton: every task state and every edge a task may take between two of them.

Theory of operation
-------------------
``EDGES`` is the whole automaton, as data: ``(start, finish) -> when it happens``. Every
change of ``TaskState.state`` goes through ``Engine._move`` (``dsched.state.engine``),
which looks the pair up here and raises ``InvalidTransition`` for an edge that is not
listed; so the table is complete by construction, and the property test
(tests/unit/test_state_properties.py) runs into any edge the code takes that it lacks.
``NEXT`` is the same table indexed for that one lookup per move. A task is created
``released``; ``forgotten`` is final (the task has left ``SchedulerState.tasks``).
``python -m dsched.state.diagram`` draws the table (docs/state-machine.md).

This is not the table of *recommendations* (``Engine._transitions``): a recommendation
``{task: target}`` picks the code that carries it out, which may take one edge, none (the
recommendation went stale) or another (a task recommended ``waiting`` whose input erred
goes to ``erred``); a pair without code goes through ``released``.
"""

from __future__ import annotations

RELEASED = "released"
WAITING = "waiting"
READY = "ready"
NO_WORKER = "no-worker"
PROCESSING = "processing"
MEMORY = "memory"
ERRED = "erred"
FORGOTTEN = "forgotten"

# Every state, in the order of a task's life (the diagram's order).
STATES = (RELEASED, WAITING, READY, NO_WORKER, PROCESSING, MEMORY, ERRED, FORGOTTEN)

# States in which a task needs its inputs (it is one of their ``waiters``).
ACTIVE = frozenset({WAITING, READY, NO_WORKER, PROCESSING})
# States that expect every input in memory.
RUNNABLE = frozenset({READY, NO_WORKER, PROCESSING})

EDGES: dict[tuple[str, str], str] = {
    (RELEASED, WAITING): "needed, waits for its inputs",
    (RELEASED, MEMORY): "a client scattered its data",
    (RELEASED, ERRED): "an input erred, or KilledWorker",
    (RELEASED, FORGOTTEN): "nothing refers to it any more",
    (WAITING, READY): "every input in memory, offered to the policy",
    (WAITING, RELEASED): "no longer needed",
    (WAITING, ERRED): "an input erred",
    (READY, PROCESSING): "assigned, compute-task sent",
    (READY, NO_WORKER): "the policy found no worker for it",
    (READY, RELEASED): "no longer needed, or an input was lost",
    (READY, ERRED): "a lost input erred when recomputed",
    (NO_WORKER, READY): "a worker joined, left or runs again",
    (NO_WORKER, RELEASED): "no longer needed, or an input was lost",
    (NO_WORKER, ERRED): "a lost input erred when recomputed",
    (PROCESSING, PROCESSING): "stolen, sent to the thief",
    (PROCESSING, MEMORY): "task-finished for its run_id",
    (PROCESSING, RELEASED): "not needed, worker lost, stale run, reschedule",
    (PROCESSING, ERRED): "task-erred with no retries left",
    (MEMORY, RELEASED): "no longer needed, or its last replica was lost",
    (MEMORY, ERRED): "an actor whose worker was lost",
    (ERRED, RELEASED): "retried",
    (ERRED, FORGOTTEN): "nothing refers to it any more",
}

# start -> the states a task may move to from there (``Engine._move``'s one lookup).
NEXT: dict[str, frozenset[str]] = {
    state: frozenset(finish for start, finish in EDGES if start == state) for state in STATES
}
