"""dsched.ext.adaptive on real state-machine records (the harness, no event loop):
Dask's adaptive_target, workers_to_close and check_idle, case by case as
distributed/scheduler.py computes them."""

from __future__ import annotations

import pickle
from typing import Any

import pytest
from harness import Harness

from dsched.ext import adaptive
from dsched.ext.lifecycle import Lifecycle
from dsched.ext.protocol import Fail, Reply
from dsched.ext.pubsub import PubSub
from dsched.server.adaptive import AdaptiveOps
from dsched.state import events as ev

TARGET = 5.0  # distributed.adaptive.target-duration
TASK = 0.5  # distributed.scheduler.unknown-task-duration


def target(h: Harness) -> int:
    return adaptive.adaptive_target(h.state, target_duration=TARGET, task_duration=TASK)


def close(h: Harness, **kwargs: Any) -> list[str]:
    workers = list(h.state.workers.values())
    return [ws.address for ws in adaptive.workers_to_close(workers, **kwargs)]


def harness_with_workers(*names: str, memory_limit: int = 1000, nthreads: int = 1) -> Harness:
    h = Harness()
    h.add_client()
    for name in names:
        h.add_worker(name, nthreads=nthreads, name=name, memory_limit=memory_limit)
    return h


def test_no_workers_no_work_wants_none() -> None:
    assert target(Harness()) == 0


def test_work_without_workers_asks_for_one() -> None:
    h = Harness()
    h.add_client()
    h.submit({"x": []}, ["x"])
    assert h.state.tasks["x"].state == "no-worker"
    assert target(h) == 1


def test_idle_workers_scale_to_zero() -> None:
    assert target(harness_with_workers("a", "b")) == 0


def test_queued_work_asks_for_seconds_of_work_per_target_duration() -> None:
    # 200 independent tasks (processing or ready): 200 * 0.5 s of work for 5 s is 20
    # threads' worth; one thread per worker today, so 20 workers.
    h = harness_with_workers("a", "b")
    h.submit({f"t{i}": [] for i in range(200)}, [f"t{i}" for i in range(200)])
    processing = sum(len(ws.processing) for ws in h.state.workers.values())
    assert processing + adaptive.ready_and_unrunnable(h.state) == 200
    assert target(h) == 20


def test_threads_per_worker_divide_the_target() -> None:
    h = harness_with_workers("a", nthreads=4)
    h.submit({f"t{i}": [] for i in range(200)}, [f"t{i}" for i in range(200)])
    assert target(h) == 5  # 20 threads' worth, 4 per worker


def test_a_few_long_tasks_do_not_ask_for_many_workers() -> None:
    # 3 tasks estimated at 20 s each: 12 threads' worth for 5 s, but never more than
    # the tasks there are.
    h = harness_with_workers("a")
    h.submit({"x": [], "y": [], "z": []}, ["x", "y", "z"])
    assert adaptive.adaptive_target(h.state, target_duration=TARGET, task_duration=20.0) == 3


def test_memory_pressure_doubles_the_workers() -> None:
    h = harness_with_workers("a", "b")
    h.submit({"x": []}, ["x"])
    h.finish("x", nbytes=1500)  # more than 60% of the 2000 bytes of memory limits
    assert target(h) == 4


def test_scaling_down_keeps_busy_workers() -> None:
    h = harness_with_workers("a", "b", "c")
    h.submit({"x": []}, ["x"])
    assert target(h) == 1
    busy = next(iter(h.processing().values()))
    assert set(close(h)) == {"a", "b", "c"} - {busy}


def test_workers_to_close_idle_and_small_first() -> None:
    h = harness_with_workers("a", "b", "c", "d")
    h.submit({"big": [], "small": [], "busy": [], "long": []}, ["big", "small", "busy", "long"])
    running = h.processing()
    h.finish("big", nbytes=50)
    h.finish("small", nbytes=5)
    h.step(ev.LongRunning(running["long"], "long", h.state.tasks["long"].run_id))
    holder = {key: running[key] for key in ("big", "small", "busy", "long")}
    assert close(h, n=2) == [holder["small"], holder["big"]]
    # Never the worker running a long-running (seceded) task, even for n beyond the rest.
    assert close(h, n=9) == [holder["small"], holder["big"], holder["busy"]]
    assert close(h, n=0) == []
    # target= is n = len(workers) - target.
    assert close(h, target=3) == [holder["small"]]
    # minimum keeps that many workers.
    assert close(h, n=3, minimum=3) == [holder["small"]]


def test_workers_to_close_default_keeps_twice_the_data() -> None:
    # memory_ratio=2 (the default without n): close idle workers while the rest's memory
    # limits hold twice the stored bytes.
    h = harness_with_workers("a", "b", "c")
    h.submit({"x": []}, ["x"])
    holder = h.processing()["x"]
    h.finish("x", nbytes=900)
    # 900 bytes: two workers (2000 bytes) are needed; the empty ones go first, one of them.
    chosen = close(h)
    assert len(chosen) == 1 and holder not in chosen


def test_workers_to_close_nothing_when_all_busy() -> None:
    h = harness_with_workers("a", "b")
    h.submit({"x": [], "y": []}, ["x", "y"])
    assert close(h) == []


def test_workers_to_close_groups_close_together() -> None:
    h = harness_with_workers("h1-a", "h1-b", "h2-a")
    chosen = close(h, n=1, group_of=lambda ws: ws.address.split("-")[0])
    # Closing a group of two would leave fewer than the target of 2: only h2's one worker.
    assert chosen == ["h2-a"]
    assert sorted(close(h, n=3, group_of=lambda ws: ws.address.split("-")[0])) == [
        "h1-a",
        "h1-b",
        "h2-a",
    ]


def test_workers_to_close_allowed_filter() -> None:
    h = harness_with_workers("a", "b", "c")
    kept = close(h, n=3, allowed=lambda workers: [ws for ws in workers if ws.address != "b"])
    assert sorted(kept) == ["a", "c"]


def test_adaptive_target_scale_down_respects_the_filter() -> None:
    h = harness_with_workers("a", "b")
    assert (
        adaptive.adaptive_target(
            h.state, target_duration=TARGET, task_duration=TASK, allowed=lambda workers: []
        )
        == 2
    )


def test_check_idle() -> None:
    h = harness_with_workers("a")
    clock = adaptive.IdleClock(h.state, started=100.0)
    assert clock.check(h.state, 200.0) == 100.0  # idle since the start
    h.submit({"x": []}, ["x"])
    assert clock.check(h.state, 201.0) is None  # processing
    h.finish("x")
    assert clock.check(h.state, 202.0) is None  # a transition since the last check
    assert clock.check(h.state, 203.0) == 203.0
    assert clock.check(h.state, 204.0) == 203.0
    h.submit({"y": ["z"], "z": []}, ["y"])
    assert clock.check(h.state, 205.0) is None


@pytest.mark.parametrize("n_ready", [0, 50, 150])
def test_no_worker_tasks_count_as_queued(n_ready: int) -> None:
    h = Harness()
    h.add_client()
    if n_ready:
        h.submit({f"t{i}": [] for i in range(n_ready)}, [f"t{i}" for i in range(n_ready)])
    assert adaptive.ready_and_unrunnable(h.state) == n_ready
    assert target(h) == (0 if not n_ready else max(1, -(-n_ready * TASK // TARGET)))


def retire(h: Harness, args: dict[str, Any]) -> Any:
    rid = h.core.request("retire_workers", "client", args, h.now)
    h.tick()
    assert h.last_flush is not None
    (answer,) = [a for a in h.last_flush.answers if a.request == rid]
    return answer


def lifecycle_harness(*names: str) -> Harness:
    pubsub = PubSub(maxlen=100)
    h = Harness(extensions=[pubsub, Lifecycle(pubsub)])
    h.add_client()
    for name in names:
        h.add_worker(name, name=name, memory_limit=1000)
    return h


def test_retire_workers_without_names_asks_workers_to_close() -> None:
    # Dask's retire_workers(n=...) retires workers_to_close(n=...): the cheapest ones.
    h = lifecycle_harness("a", "b", "c")
    h.submit({"x": []}, ["x"])
    busy = h.processing()["x"]
    answer = retire(h, {"n": 2})
    assert isinstance(answer, Reply)
    assert set(answer.value) == {"a", "b", "c"} - {busy}
    assert list(h.state.workers) == [busy]


def test_retire_workers_rejects_names_with_workers_to_close_fields() -> None:
    h = lifecycle_harness("a", "b")
    answer = retire(h, {"names": ["a"], "n": 1})
    assert isinstance(answer, Fail) and isinstance(answer.exception, TypeError)
    assert "mutually exclusive" in str(answer.exception)
    assert set(h.state.workers) == {"a", "b"}


# ---------------------------------------------------------------------- the shell's ops
class PluginsStandIn:
    """The plugin host's ``valid_workers_downscaling`` (views in, views out)."""

    def __init__(self, keep_out: str = "") -> None:
        self.keep_out = keep_out
        self.seen: list[Any] = []

    def valid_workers_downscaling(self, workers: list[Any]) -> list[Any]:
        self.seen = list(workers)
        return [view for view in workers if view.name != self.keep_out]


def rack_of(worker: Any) -> str:
    """A Dask-style ``key``: a function of a WorkerState (here the facade's view)."""
    return str(worker.name).split("-")[0]


def test_workers_to_close_op_takes_a_pickled_key_and_an_attribute() -> None:
    h = harness_with_workers("r1-a", "r1-b", "r2-a")
    ops = AdaptiveOps(h.state, PluginsStandIn(), started=100.0)  # type: ignore[arg-type]
    # Whole racks at a time, as Adaptive(worker_key=...) asks: closing two workers would
    # split rack r1, so only r2's one goes; closing all three takes both racks.
    key = pickle.dumps(rack_of)
    assert ops.workers_to_close(n=2, key=key, attribute="name") == ["r2-a"]
    assert sorted(ops.workers_to_close(n=3, key=key, attribute="name")) == ["r1-a", "r1-b", "r2-a"]
    assert ops.workers_to_close(target=2, key=rack_of, attribute="name") == ["r2-a"]
    assert ops.workers_to_close(target=2, key=rack_of) == [h.state.workers["r2-a"].address]


def test_workers_to_close_op_asks_the_plugins() -> None:
    h = harness_with_workers("a", "b", "c")
    plugins = PluginsStandIn(keep_out="b")
    ops = AdaptiveOps(h.state, plugins, started=100.0)  # type: ignore[arg-type]
    assert sorted(ops.workers_to_close(n=3, attribute="name")) == ["a", "c"]
    assert sorted(view.name for view in plugins.seen) == ["a", "b", "c"]
    # adaptive_target's scale-down asks them too: "b" stays.
    assert ops.adaptive_target() == 1


def test_check_idle_op_uses_the_clock() -> None:
    h = harness_with_workers("a")
    ops = AdaptiveOps(h.state, PluginsStandIn(), started=100.0)  # type: ignore[arg-type]
    assert ops.check_idle() == 100.0
