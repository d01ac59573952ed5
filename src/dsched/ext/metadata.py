"""Task metadata: ``get_metadata`` / ``set_metadata``, a nested dict on the scheduler.

Theory of operation
-------------------
Dask's ``Scheduler.set_metadata(keys, value)`` walks ``task_metadata`` along ``keys[:-1]``
(creating a dict where there is none, or where the value is neither a dict nor a list) and
stores ``value`` under ``keys[-1]``; ``get_metadata(keys, default)`` walks all of them and
answers ``default`` for a missing key, or raises the ``KeyError`` when there is no default
(the client always sends one: ``dask.typing.no_default``, which arrives as its ``__Enum__``
marker). Walking into a value that cannot be indexed raises as in Dask.

Dask pops ``task_metadata[key]`` when the *task* with that key is forgotten. To avoid a cost
per task, this extension does not watch transitions: it remembers, for every top-level
metadata key, the ``TaskState`` it belongs to (``_bound``), and a key whose record is no
longer the one in ``state.tasks`` was forgotten meanwhile, so its metadata is dropped when
it is next looked at (the answer is the same as Dask's, which dropped it earlier). A key
set while no task has it (``"cluster-manager-info"``, or a key submitted later) is bound
when a graph or scattered data creates that task (``GraphReceived`` / ``DataPlaced``: one
look-up per unbound metadata key per graph, nothing when no metadata is set).
"""

from __future__ import annotations

from typing import Any, ClassVar

from dsched.ext.protocol import Effects, Extension, Fail, Reply, Request
from dsched.state import events as ev
from dsched.state.records import Key, TaskState


def is_no_default(value: Any) -> bool:
    """``dask.typing.no_default`` as a Dask client encodes it (an ``__Enum__`` marker)."""
    return (
        isinstance(value, dict)
        and bool(value.get("__Enum__"))
        and value.get("name") == "no_default"
        and value.get("__name__") == "_NoDefault"
    )


class Metadata(Extension):
    name = "metadata"
    rpc_ops: ClassVar = {"get_metadata": "get_metadata", "set_metadata": "set_metadata"}
    observes = frozenset({ev.GraphReceived, ev.DataPlaced})

    def __init__(self) -> None:
        self.metadata: dict[Any, Any] = {}
        self._bound: dict[Key, TaskState] = {}  # top-level key -> the task it belongs to
        self._unbound: set[Key] = set()  # top-level keys no task had when last looked at

    # ------------------------------------------------------------------ the ops
    def set_metadata(self, request: Request, now: float) -> Effects:
        keys = list(request.args["keys"])
        value = request.args.get("value")
        try:
            if not keys:
                raise IndexError("list index out of range")
            self._refresh(keys[0])
            metadata: Any = self.metadata
            for key in keys[:-1]:
                if key not in metadata or not isinstance(metadata[key], dict | list):
                    metadata[key] = {}
                metadata = metadata[key]
            metadata[keys[-1]] = value
            self._track(keys[0])
        except (TypeError, IndexError, KeyError) as exc:
            return [Fail(request.id, exc)]
        return [Reply(request.id, None)]

    def get_metadata(self, request: Request, now: float) -> Effects:
        keys = list(request.args["keys"])
        default = request.args.get("default")
        has_default = "default" in request.args and not is_no_default(default)
        try:
            if keys:
                self._refresh(keys[0])
            metadata: Any = self.metadata
            for key in keys:
                metadata = metadata[key]
        except KeyError as exc:
            if has_default:
                return [Reply(request.id, default)]
            return [Fail(request.id, exc)]
        except (TypeError, IndexError) as exc:
            return [Fail(request.id, exc)]
        return [Reply(request.id, metadata)]

    # ------------------------------------------------------------------ forgetting
    def _refresh(self, key: Key) -> None:
        """Drop ``key``'s metadata if the task it belonged to was forgotten."""
        ts = self._bound.get(key)
        if ts is not None and self.state.tasks.get(key) is not ts:
            del self._bound[key]
            self.metadata.pop(key, None)

    def _track(self, key: Key) -> None:
        if key in self._bound:
            return
        ts = self.state.tasks.get(key)
        if ts is None:
            self._unbound.add(key)
        else:
            self._unbound.discard(key)
            self._bound[key] = ts

    def on_event(self, event: ev.Event, now: float) -> Effects:
        if self._bound:
            for key in [k for k, ts in self._bound.items() if self.state.tasks.get(k) is not ts]:
                self._refresh(key)
        if self._unbound:
            tasks = self.state.tasks
            for key in [k for k in self._unbound if k in tasks]:
                self._unbound.discard(key)
                if key in self.metadata:
                    self._bound[key] = tasks[key]
            self._unbound.intersection_update(self.metadata)
        return []
