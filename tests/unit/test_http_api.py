"""dsched.http.api on a stand-in for the scheduler (only ``state``, ``started``,
``reactor.clients`` and the adaptive ops over them are read): Dask's adaptive_target
formula, check_idle, workers_to_close."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from dsched.http import api
from dsched.server.adaptive import AdaptiveOps


def task(state: str, nbytes: int = 0, long_running: bool = False) -> Any:
    return SimpleNamespace(
        state=state,
        nbytes=nbytes,
        long_running=long_running,
        exception_blame=None,
        waiting_on=(),
        waiters=(),
    )


def worker(address: str, nthreads: int = 1, processing: Any = (), has_what: Any = ()) -> Any:
    return SimpleNamespace(
        address=address,
        host="127.0.0.1",
        nthreads=nthreads,
        memory_limit=1000,
        status="running",
        processing=list(processing),
        has_what=list(has_what),
    )


class NoPlugins:
    def valid_workers_downscaling(self, workers: list[Any]) -> list[Any]:
        return workers


def scheduler(tasks: dict[str, Any], workers: list[Any]) -> Any:
    state = SimpleNamespace(
        tasks=tasks, workers={ws.address: ws for ws in workers}, transition_log=[]
    )
    adaptive = AdaptiveOps(state, NoPlugins(), started=100.0)  # type: ignore[arg-type]
    return SimpleNamespace(
        state=state, started=100.0, reactor=SimpleNamespace(clients={}), adaptive=adaptive
    )


def test_adaptive_target() -> None:
    assert api.adaptive_target(scheduler({}, [])) == 0
    # Tasks waiting for a worker and no worker: at least one.
    assert api.adaptive_target(scheduler({"a": task("no-worker")}, [])) == 1
    # Idle workers: scale down to none.
    assert api.adaptive_target(scheduler({}, [worker("a"), worker("b")])) == 0
    # 100 ready tasks of 0.5 s for 5 s: 10 threads' worth, 2 threads per worker.
    ready = {f"t{i}": task("ready") for i in range(100)}
    assert api.adaptive_target(scheduler(ready, [worker("a", nthreads=2)])) == 5
    # Over 60% of memory used: twice the workers.
    full = [worker("a", has_what=[task("memory", nbytes=1500)]), worker("b")]
    assert api.adaptive_target(scheduler({}, full)) == 4
    # Scaling down keeps the workers with tasks processing.
    busy = task("processing")
    assert (
        api.adaptive_target(scheduler({"x": busy}, [worker("a", processing=[busy]), worker("b")]))
        == 1
    )


def test_workers_to_close_prefers_idle_and_small() -> None:
    busy, big, small = task("processing"), task("memory", nbytes=50), task("memory", nbytes=5)
    long = task("processing", long_running=True)
    workers = [
        worker("busy", processing=[busy]),
        worker("big", has_what=[big]),
        worker("small", has_what=[small]),
        worker("long", processing=[long]),
    ]
    s = scheduler({}, workers)
    assert api.workers_to_close(s, 2) == ["small", "big"]
    assert api.workers_to_close(s, 9) == ["small", "big", "busy"]
    assert api.workers_to_close(s, 0) == []


def test_check_idle() -> None:
    tasks: dict[str, Any] = {}
    s = scheduler(tasks, [worker("a")])
    idle = api.IdleTracker(s)
    assert idle.check() == 100.0  # idle since the start
    tasks["x"] = task("processing")
    assert idle.check() is None
    tasks["x"] = task("memory")
    s.state.transition_log.append(("x", "processing", "memory", "s1", 101.0))
    assert idle.check() is None  # a task changed state since the last check
    since = idle.check()
    assert isinstance(since, float) and since > 100.0
    assert idle.check() == since


def test_counts() -> None:
    t = task("memory", nbytes=10)
    counts = api.counts(scheduler({"x": t}, [worker("a", has_what=[t]), worker("b", nthreads=2)]))
    assert counts["bytes"] == 10 and counts["memory"] == 1 and counts["cores"] == 3
    assert counts["idle"] == 2 and counts["hosts"] == 1 and counts["tasks"] == 1
