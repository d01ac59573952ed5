"""Read-only cluster queries: ``who_has``, ``has_what``, ``ncores``, ``nbytes``, ...

Theory of operation
-------------------
The RPCs a Client uses to look at the cluster (``Client.who_has``, ``has_what``,
``nthreads``, ``nbytes``, ``processing``, ``get_task_status``, and ``get_story`` for
``Client.story``) answer from the task state at once; they never change it. Unknown keys
and workers get Dask's answers (an empty list, or no entry).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from typing import Any, ClassVar

from dask.utils import key_split

from dsched.ext.protocol import Effects, Extension, Reply, Request


class ClusterQueries(Extension):
    name = "queries"
    rpc_ops: ClassVar = {
        "who_has": "who_has",
        "has_what": "has_what",
        "ncores": "ncores",
        "nthreads": "ncores",
        "ncores_running": "ncores_running",
        "nbytes": "nbytes",
        "processing": "processing",
        "get_task_status": "get_task_status",
        "get_story": "get_story",
    }

    def who_has(self, request: Request, now: float) -> Effects:
        tasks = self.state.tasks
        keys = _listed(request.args.get("keys"), tasks)
        return [
            Reply(
                request.id,
                {k: [ws.address for ws in tasks[k].who_has] if k in tasks else [] for k in keys},
            )
        ]

    def has_what(self, request: Request, now: float) -> Effects:
        workers = self.state.workers
        names = _listed(request.args.get("workers"), workers)
        return [
            Reply(
                request.id,
                {w: [ts.key for ts in workers[w].has_what] if w in workers else [] for w in names},
            )
        ]

    def _ncores(self, selected: Any) -> dict[str, int]:
        workers = self.state.workers
        return {w: workers[w].nthreads for w in _listed(selected, workers) if w in workers}

    def ncores(self, request: Request, now: float) -> Effects:
        return [Reply(request.id, self._ncores(request.args.get("workers")))]

    def ncores_running(self, request: Request, now: float) -> Effects:
        workers = self.state.workers
        counts = self._ncores(request.args.get("workers"))
        running = {w: n for w, n in counts.items() if workers[w].status == "running"}
        return [Reply(request.id, running)]

    def nbytes(self, request: Request, now: float) -> Effects:
        tasks = self.state.tasks
        selected = request.args.get("keys")
        keys = [k for k, ts in tasks.items() if ts.who_has] if selected is None else selected
        sizes = {k: tasks[k].nbytes for k in keys if k in tasks}
        if request.args.get("summary", True):
            totals: dict[str, int] = defaultdict(int)
            for key, size in sizes.items():
                totals[key_split(key)] += size
            return [Reply(request.id, dict(totals))]
        return [Reply(request.id, sizes)]

    def processing(self, request: Request, now: float) -> Effects:
        workers = self.state.workers
        names = _listed(request.args.get("workers"), workers)
        processing = {
            w: [ts.key for ts in workers[w].processing] if w in workers else [] for w in names
        }
        return [Reply(request.id, processing)]

    def get_task_status(self, request: Request, now: float) -> Effects:
        tasks = self.state.tasks
        status = {k: tasks[k].state if k in tasks else None for k in request.args["keys"]}
        return [Reply(request.id, status)]


    def get_story(self, request: Request, now: float) -> Effects:
        """Dask's ``get_story``: the transition log entries of these keys, as Dask's
        ``Transition(key, start, finish, recommendations, stimulus_id, timestamp)``.
        dsched does not log recommendations: they are ``{}``, so an entry is found by its
        own key only (Dask also finds the entries whose recommendations name the key)."""
        wanted = list(request.args.get("keys_or_stimuli") or ())
        story: list[tuple[Any, str, str, dict[Any, str], str, float]] = [
            (key, start, finish, {}, stimulus_id, timestamp)
            for key, start, finish, stimulus_id, timestamp in self.state.story(*wanted)
        ]
        return [Reply(request.id, story)]


def _listed(selected: Any, everything: Iterable[Any]) -> list[Any]:
    """The keys/workers a query names, or all of them when it names none."""
    return list(everything) if selected is None else list(selected)
