"""``set_resources``: a worker changes the resources it offers (``Worker.set_resources``).

Theory of operation
-------------------
The worker sends its whole new resource map (``worker=contact_address``,
``resources=total_resources``); Dask's ``add_resources`` merges it into the worker's
record and answers ``"OK"``, and raises ``KeyError`` for an unknown worker. Here the
``WorkerResourcesSet`` state event does the merge, tells the policy (``WorkerResources``)
and offers the tasks parked in ``no-worker`` again, so a task waiting for a resource the
worker now offers runs (Dask re-checks those only when a worker joins or starts running).
"""

from __future__ import annotations

from typing import ClassVar

from dsched.ext.protocol import Effects, Extension, Fail, Reply, Request, Stimulus
from dsched.state import events as ev


class Resources(Extension):
    name = "resources"
    rpc_ops: ClassVar = {"set_resources": "set_resources"}

    def set_resources(self, request: Request, now: float) -> Effects:
        address = request.args.get("worker")
        resources = request.args.get("resources") or {}
        if address not in self.state.workers:
            return [Fail(request.id, KeyError(address))]
        if not isinstance(resources, dict) or not all(
            isinstance(k, str) and isinstance(v, int | float) and not isinstance(v, bool)
            for k, v in resources.items()
        ):
            problem = TypeError(f"resources must map names to numbers: {resources!r:.200}")
            return [Fail(request.id, problem)]
        event = ev.WorkerResourcesSet(str(address), {k: float(v) for k, v in resources.items()})
        return [Stimulus(event), Reply(request.id, "OK")]
