"""The scheduler's task state machine.

Theory of operation
-------------------
``SchedulerState.handle(event, now) -> Outbox`` is the only entry point. An event (a peer's
message, or the policy's decisions) changes the records and appends to the outbox the
messages that follow from it. Nothing here reads a clock, does I/O or logs: time comes in as
``now``, log lines go out in the outbox.

The package, by job:

* ``records``: ``TaskState`` per key, ``WorkerState`` per worker address, ``ClientState``
  per client id (pseudo-clients such as ``fire-and-forget`` are created on first use).
* ``edges``: the automaton, ``EDGES`` (every allowed change of a task's state, as data;
  drawn by ``python -m dsched.state.diagram`` in docs/state-machine.md).
* ``engine``: the one writer of task states (``_move``: checks the edge, records the
  per-key story, reports it to observers if asked), recommendations and the transitions
  carrying them out, reference counting.
* ``clients``, ``workers``, ``placement``, ``cluster``: the event handlers (mixins over the
  engine), for clients and graphs, workers and task results, policy decisions and
  stealing, restart and retirement.
* ``validate``: ``validate()``, every invariant, raising ``InvariantError``.
* ``machine`` (this module): ``SchedulerState``, which puts them together and dispatches
  events; it re-exports the names other code imports from here.

Task states::

    released --> waiting --> ready --> processing --> memory
        ^           |          |  \\         |            |
        |           |          |   no-worker |            |
        +-----------+----------+------------+------------+--> released --> forgotten
    waiting / ready / no-worker / processing / released --> erred --> released | forgotten

* ``waiting``: needed, some input not in memory (``waiting_on``).
* ``ready``: every input in memory; offered to the policy (``TaskReady``).
* ``no-worker``: the policy found no running worker that may run it (``NoWorker``); offered
  again when a worker is added or starts running, or when one is removed (so that the policy
  can tell it has become unplaceable). A task no worker of the cluster can ever run
  (``Unplaceable``) is also in ``unplaceable``: offered again only when a worker is added,
  and logged once (a warning per batch and reason) rather than at every offer.
* ``processing``: sent to a worker with a fresh ``run_id``; only a result carrying that
  ``run_id`` from that worker counts.

Optional policy events (``wants``, see ``policy.protocol``): ``ReplicaAdded`` /
``ReplicaRemoved`` where a replica appears or goes other than by an assignment's result or a
worker leaving, ``BandwidthMeasured`` when the estimate fed by ``BandwidthReported``
(heartbeats, Dask's rule) moves by more than ``BANDWIDTH_CHANGE``. Each costs one attribute
test when not wanted.

Stimulus ids: a worker's message carries the ``stimulus_id`` of what caused it on the
worker; an event that has one (``event.stimulus_id``) makes it the id of every message and
move it causes, an event without one gets ``"<EventName>-<now>"``.

Every move is remembered in the bounded ``transition_log`` (``story(*keys)``, as
``distributed.Scheduler.story``) and, with ``observe_transitions``, reported in
``Outbox.transitions``. ``validate()`` checks every invariant; tests call it after every
step.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

from dsched.state import events as ev
from dsched.state.clients import ClientEvents
from dsched.state.cluster import ClusterEvents
from dsched.state.edges import (
    ACTIVE,
    EDGES,
    ERRED,
    FORGOTTEN,
    MEMORY,
    NO_WORKER,
    PROCESSING,
    READY,
    RELEASED,
    RUNNABLE,
    STATES,
    WAITING,
)
from dsched.state.engine import (
    FIRE_AND_FORGET,
    TRANSITION_LOG_LENGTH,
    KilledWorkerFactory,
    StoryEntry,
)
from dsched.state.errors import InvalidTransition, InvariantError
from dsched.state.outbox import Outbox
from dsched.state.placement import (
    STEAL_CONFIRM_STATES,
    STEAL_UNDEFINED_STATES,
    PlacementEvents,
)
from dsched.state.records import (
    NOBODY,
    NOWHERE,
    ClientState,
    Key,
    TaskState,
    WorkerState,
    host_of,
)
from dsched.state.validate import Validation
from dsched.state.workers import WorkerEvents

__all__ = [
    "ACTIVE",
    "EDGES",
    "ERRED",
    "FIRE_AND_FORGET",
    "FORGOTTEN",
    "MEMORY",
    "NOBODY",
    "NOWHERE",
    "NO_WORKER",
    "PROCESSING",
    "READY",
    "RELEASED",
    "RUNNABLE",
    "STATES",
    "STEAL_CONFIRM_STATES",
    "STEAL_UNDEFINED_STATES",
    "TRANSITION_LOG_LENGTH",
    "WAITING",
    "ClientState",
    "InvalidTransition",
    "InvariantError",
    "Key",
    "KilledWorkerFactory",
    "SchedulerState",
    "StoryEntry",
    "TaskState",
    "WorkerState",
    "host_of",
]


def stimulus_id_of(event: ev.Event, now: float) -> str:
    """The stimulus id of ``event``'s moves: its own, else one made up from its type."""
    return getattr(event, "stimulus_id", "") or f"{type(event).__name__}-{now}"


class SchedulerState(ClientEvents, WorkerEvents, PlacementEvents, ClusterEvents, Validation):
    # The constructor is Engine's (its parameters are documented there); this class adds the
    # event dispatch, built once per instance from the handler mixins' bound methods.
    @functools.cached_property
    def _handlers(self) -> dict[type, Callable[[Any, Outbox], None]]:
        return {
            ev.ClientConnected: self._client_connected,
            ev.ClientDisconnected: self._client_disconnected,
            ev.GraphReceived: self._graph_received,
            ev.GraphFailed: self._graph_failed,
            ev.ClientDesiresKeys: self._client_desires_keys,
            ev.ClientReleasesKeys: self._client_releases_keys,
            ev.CancelKeys: self._cancel_keys,
            ev.ReportKey: self._report_key,
            ev.DataPlaced: self._data_placed,
            ev.RetryKeys: self._retry_keys,
            ev.WorkerConnected: self._worker_connected,
            ev.WorkerDisconnected: self._worker_disconnected,
            ev.WorkerStatusChanged: self._worker_status_changed,
            ev.TaskFinished: self._task_finished,
            ev.TaskErred: self._task_erred,
            ev.ReleaseWorkerData: self._release_worker_data,
            ev.AddKeys: self._add_keys,
            ev.RequestRefreshWhoHas: self._request_refresh_who_has,
            ev.LongRunning: self._long_running,
            ev.Reschedule: self._reschedule,
            ev.PolicyDecisions: self._policy_decisions,
            ev.StealResponse: self._steal_response,
            ev.BandwidthReported: self._bandwidth_reported,
            ev.Restart: self._restart,
            ev.RetireWorkers: self._retire_workers,
            ev.WorkerResourcesSet: self._worker_resources_set,
            ev.DropReplicas: self._drop_replicas,
            ev.SetWorkerRestrictions: self._set_worker_restrictions,
            ev.DisallowQueuing: self._disallow_queuing,
            ev.RecomputeTasks: self._recompute_tasks,
        }

    def handle(self, event: ev.Event, now: float, out: Outbox | None = None) -> Outbox:
        """Apply one event; its effects are appended to ``out`` (a new Outbox if None).

        The reactor passes the outbox it is collecting for the current tick, which saves
        building and merging one per message; ``out.reply`` is then this event's reply.
        """
        if out is None:
            out = Outbox()
        else:
            out.reply = None
        self._now = now
        self._stimulus_id = stimulus_id_of(event, now)
        self._handlers[type(event)](event, out)
        return out
