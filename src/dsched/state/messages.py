"""The messages the state machine sends, as typed records: one ``TypedDict`` per op.

Theory of operation
-------------------
The state machine never sends anything itself: it appends messages to an ``Outbox``
(``dsched.state.outbox``), per worker address and per client id. Those messages are what
``distributed``'s workers and clients read off their batched streams, so their fields and
field names are Dask's (``distributed/scheduler.py``, ``worker.py``, ``client.py``). Each op
is a ``TypedDict`` with a ``Literal`` ``op`` field, grouped by direction: ``WorkerMessage``
(scheduler -> worker stream) and ``ClientMessage`` (scheduler -> client stream) are their
unions. ``Outbox.send_worker`` / ``send_client`` take those unions, so a producer's dict
literal is checked by mypy against its op's record, and a consumer (the reactor, the
simulator, the zero worker, the tracer) that tests ``msg["op"] == "compute-task"`` gets the
record narrowed to ``ComputeTask``.

Zero runtime cost: a ``TypedDict`` is a plain ``dict`` at run time; producers keep writing
dict literals (annotated, never constructed through the class), consumers keep indexing.

Messages that extensions build (``dsched.ext.protocol.ToWorker`` / ``ToClient``: their own
ops, e.g. ``lock-granted``) are opaque to the state machine; they travel through the same
per-peer lists (``Outbox.send_worker_raw`` / ``send_client_raw``) typed as the unions, and
every consumer ignores ops it does not know.

Adding an op: add a record here, add it to its direction's union, and build it as an
annotated literal where it is sent.
"""

from __future__ import annotations

from typing import Any, Literal, NotRequired, TypedDict

Key = Any

# ---------------------------------------------------------------- scheduler -> worker


class ComputeTask(TypedDict):
    op: Literal["compute-task"]
    key: Key
    run_id: int
    priority: tuple[float, ...]
    stimulus_id: str
    who_has: dict[Key, tuple[str, ...]]
    nbytes: dict[Key, int]
    run_spec: object
    resource_restrictions: dict[str, float] | None
    actor: bool
    annotations: Any
    span_id: None


class FreeKeys(TypedDict):
    op: Literal["free-keys"]
    keys: list[Key]
    stimulus_id: str


class StealRequest(TypedDict):
    op: Literal["steal-request"]
    key: Key
    stimulus_id: str


class AcquireReplicas(TypedDict):
    op: Literal["acquire-replicas"]
    who_has: dict[Key, list[str]]
    nbytes: dict[Key, int]
    stimulus_id: str


class RemoveReplicas(TypedDict):
    op: Literal["remove-replicas"]
    keys: list[Key]
    stimulus_id: str


class RefreshWhoHas(TypedDict):
    op: Literal["refresh-who-has"]
    who_has: dict[Key, list[str]]
    stimulus_id: str


class RemoveWorker(TypedDict):
    op: Literal["remove-worker"]
    worker: str
    stimulus_id: str


class WorkerStatusChange(TypedDict):
    op: Literal["worker-status-change"]
    status: str
    stimulus_id: str


WorkerMessage = (
    ComputeTask
    | FreeKeys
    | StealRequest
    | AcquireReplicas
    | RemoveReplicas
    | RefreshWhoHas
    | RemoveWorker
    | WorkerStatusChange
)

# ---------------------------------------------------------------- scheduler -> client


class KeyInMemory(TypedDict):
    op: Literal["key-in-memory"]
    key: Key
    type: NotRequired[object]


class TaskErred(TypedDict):
    op: Literal["task-erred"]
    key: Key
    exception: object
    traceback: object


class LostData(TypedDict):
    op: Literal["lost-data"]
    key: Key


class CancelledKeys(TypedDict):
    op: Literal["cancelled-keys"]
    keys: list[Key]
    reason: str | None
    msg: NotRequired[str | None]


class Restart(TypedDict):
    op: Literal["restart"]


class TaskRetried(TypedDict):
    op: Literal["task-retried"]
    key: Key


ClientMessage = KeyInMemory | TaskErred | LostData | CancelledKeys | Restart | TaskRetried
