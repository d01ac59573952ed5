"""Replaying tasks on the client: ``get_runspec`` and ``get_error_cause``.

Theory of operation
-------------------
``Client.recreate_error_locally(future)`` asks ``get_error_cause(keys)`` for the key to
blame (the first of ``keys`` that has an ``exception_blame``: the task whose own error the
others inherited), then ``get_runspec(key)`` for that task's run_spec, holds its
dependencies with an empty ``update-graph``, gathers them and runs the task in the client
process, where it raises the task's exception. ``recreate_task_locally`` does the same for
any task. Dask answers ``ToPickle(ts.run_spec)``, which the client unpickles on receipt;
dsched keeps every run_spec pickled from intake on (a ``PickledBytes`` payload, what a
compute-task carries to the workers), so the stored payload is the answer as it is.
Scattered data has no run_spec: the answer is ``None``, as Dask's ``ToPickle(None)``. An
unknown key raises ``KeyError``, as Dask's ``tasks[key]``.
"""

from __future__ import annotations

from typing import Any, ClassVar

from dsched.ext.protocol import Effects, Extension, Fail, Reply, Request


def _key(key: Any) -> Any:
    """Dask's ``_process_key``: a list (msgpack) is the tuple key."""
    return tuple(key) if isinstance(key, list) else key


class Replay(Extension):
    name = "replay"
    rpc_ops: ClassVar = {"get_runspec": "get_runspec", "get_error_cause": "get_error_cause"}

    def get_error_cause(self, request: Request, now: float) -> Effects:
        tasks = self.state.tasks
        for key in request.args.get("keys") or ():
            ts = tasks.get(_key(key))
            if ts is not None and ts.exception_blame is not None:
                return [Reply(request.id, ts.exception_blame.key)]
        return [Reply(request.id, None)]

    def get_runspec(self, request: Request, now: float) -> Effects:
        key = _key(request.args.get("key"))
        ts = self.state.tasks.get(key)
        if ts is None:
            return [Fail(request.id, KeyError(key))]
        return [Reply(request.id, ts.run_spec)]
