"""The dashboard's data without an event loop: the per-prefix counts against a recount of
the state after every step, the recent exceptions, the snapshot (workers, heartbeats,
totals), its once-a-second cache, the task stream bars behind a cursor, and the route
table with and without the dashboard."""

from __future__ import annotations

import json
import random
from collections import Counter
from typing import Any

import pytest
from harness import Harness

from dsched.ext.task_stream import TaskStream
from dsched.http import HttpServer
from dsched.http.dashboard import INDIVIDUAL_ROUTES, display_name, individual_plots
from dsched.http.dashboard_data import (
    PrefixProgress,
    SchedulerSamples,
    SnapshotCache,
    TaskStreamFeed,
    build_snapshot,
)
from dsched.http.routes import DASHBOARD, handlers
from dsched.state import events as ev


def recount(h: Harness) -> dict[str, Counter[str]]:
    counts: dict[str, Counter[str]] = {}
    for ts in h.state.tasks.values():
        counts.setdefault(ts.prefix, Counter())[ts.state] += 1
    return counts


def counted(progress: PrefixProgress) -> dict[str, Counter[str]]:
    return {
        prefix: Counter({state: n for state, n in row.items() if n and state != "forgotten"})
        for prefix, row in progress.counts.items()
        if any(n for state, n in row.items() if state != "forgotten")
    }


def started(h: Harness) -> PrefixProgress:
    progress = PrefixProgress()
    h.core.add_extension(progress)
    assert progress.start()
    h.core.set_observations(progress, PrefixProgress.observes, transitions=True)
    return progress


def chain(prefix: str, n: int) -> dict[str, list[str]]:
    return {f"{prefix}-{i}": [f"{prefix}-{i - 1}"] if i else [] for i in range(n)}


def test_prefix_counts_follow_the_state_step_by_step() -> None:
    h = Harness()
    h.add_worker("tcp://w1", nthreads=2)
    h.add_client()
    h.submit(chain("early", 3), ["early-2"])  # before the dashboard: counted by start()
    progress = started(h)
    assert counted(progress) == recount(h)
    h.submit({**chain("inc", 4), **{f"add-{i}": [f"inc-{i}"] for i in range(4)}}, ["add-3"])
    for _ in range(100):
        assert counted(progress) == recount(h)
        running = h.processing()
        if not running:
            break
        h.finish(min(running, key=lambda k: h.state.tasks[k].priority))
    assert counted(progress) == recount(h)
    h.step(ev.ClientReleasesKeys("c", ["add-3", "early-2"]))
    assert counted(progress) == recount(h) == {}
    assert progress.progress() == []
    # What was forgotten is counted as such.
    assert progress.counts["inc"]["forgotten"] == 4


@pytest.mark.parametrize("seed", range(8))
def test_prefix_counts_under_random_graphs_results_errors_and_releases(seed: int) -> None:
    """Random graphs (with unneeded tasks, created and forgotten at once), results, errors
    and releases, a worker lost midway: the counts equal a recount after every step."""
    rng = random.Random(seed)
    h = Harness()
    for w in range(3):
        h.add_worker(f"tcp://w{w}", nthreads=rng.randint(1, 3))
    h.add_client()
    progress = started(h) if seed % 2 else None
    wanted: list[str] = []
    for round_ in range(6):
        prefix = rng.choice(["inc", "add", "sum"])
        keys = [f"{prefix}-{round_}-{i}" for i in range(rng.randint(1, 8))]
        graph = {k: [d for d in keys[:i] if rng.random() < 0.3] for i, k in enumerate(keys)}
        chosen = [k for k in keys if rng.random() < 0.5] or keys[-1:]
        h.submit(graph, chosen)
        wanted += chosen
        if progress is None and round_ == 2:
            progress = started(h)  # the dashboard opened midway
        for _ in range(rng.randint(0, 10)):
            running = h.processing()
            if not running:
                break
            key = rng.choice(sorted(running))
            if rng.random() < 0.15:
                h.fail(key)
            else:
                h.finish(key)
            if progress is not None:
                assert counted(progress) == recount(h)
        if rng.random() < 0.4 and wanted:
            released = rng.sample(wanted, k=min(len(wanted), 3))
            wanted = [k for k in wanted if k not in released]
            h.step(ev.ClientReleasesKeys("c", released))
        if round_ == 3:
            h.step(ev.WorkerDisconnected("tcp://w0"))
        assert progress is None or counted(progress) == recount(h)
    h.run_until_idle()
    h.step(ev.ClientReleasesKeys("c", wanted))
    assert progress is not None and counted(progress) == recount(h) == {}


def test_progress_rows_use_dask_names_and_sort_by_size() -> None:
    h = Harness()
    h.add_client()
    progress = started(h)
    h.submit({"a-1": [], "a-2": [], "b-1": []}, ["a-1", "a-2", "b-1"])  # no worker yet
    rows = progress.progress()
    assert [row["prefix"] for row in rows] == ["a", "b"]
    assert rows[0]["all"] == 2
    assert sum(row["queued"] + row["no-worker"] for row in rows) == 3
    h.add_worker("tcp://w1", nthreads=1)
    rows = progress.progress()
    by_state = Counter(ts.state for ts in h.state.tasks.values())
    # dsched's "ready" is Dask's "queued".
    assert sum(row["queued"] for row in rows) == by_state["ready"]
    assert sum(row["processing"] for row in rows) == by_state["processing"] > 0
    assert all("ready" not in row for row in rows)


def test_exceptions_keep_the_traceback_and_skip_retried_failures() -> None:
    h = Harness()
    h.add_worker("tcp://w1")
    h.add_client()
    progress = started(h)
    h.submit(
        {"bad-1": [], "retried-1": []},
        ["bad-1", "retried-1"],
        annotations={"retried-1": {"retries": 1}},
    )
    for key in ("bad-1", "retried-1"):
        ts = h.state.tasks[key]
        while ts.processing_on is None:
            h.finish(next(iter(h.processing())))
        h.step(
            ev.TaskErred(
                ts.processing_on.address,
                key,
                ts.run_id,
                "exc",
                "tb",
                exception_text="ZeroDivisionError('x')",
                traceback_text='  File "f.py", line 1, in g\n',
            )
        )
    assert [e["key"] for e in progress.exceptions] == ["bad-1"]
    (record,) = progress.exceptions
    assert record["exception"] == "ZeroDivisionError('x')"
    assert "f.py" in record["traceback"] and record["worker"] == "tcp://w1"
    assert h.state.tasks["retried-1"].state != "erred"


def snapshot_of(h: Harness, heartbeats: dict[str, Any], progress: PrefixProgress) -> Any:
    samples = SchedulerSamples()
    samples.add(5.0, 0.25, 0.002)
    return build_snapshot(h.state, heartbeats, progress, samples, 10.0, address="tcp://s", cursor=7)


def test_snapshot_reads_heartbeats_and_falls_back_to_key_sizes() -> None:
    h = Harness()
    h.add_worker("tcp://w1", nthreads=2, memory_limit=1000)
    h.add_worker("tcp://w2", nthreads=1, memory_limit=2000)
    h.add_client()
    progress = started(h)
    h.submit({"x-1": [], "x-2": [], "x-3": []}, ["x-1", "x-2", "x-3"])
    for key, worker in h.processing().items():
        h.finish(key, nbytes=100, worker=worker)
    metrics = {
        "managed_bytes": 300,
        "memory": 800,
        "spilled_bytes": {"memory": 0, "disk": 50},
        "cpu": 12.5,
        "transfer": {"incoming_bytes": 7, "outgoing_bytes": 3},
    }
    snap = snapshot_of(h, {"tcp://w1": (metrics, 9.5)}, progress)
    json.dumps(snap)  # it must be JSON as built
    w1, w2 = sorted(snap["workers"], key=lambda w: w["address"])
    assert (w1["managed"], w1["unmanaged"], w1["spilled"], w1["cpu"]) == (300, 500, 50, 12.5)
    assert (w1["incoming_bytes"], w1["outgoing_bytes"], w1["last_seen"]) == (7, 3, 9.5)
    # No heartbeat: managed from the keys it holds, the rest unknown.
    assert w2["managed"] == 100 * w2["in_memory"] and w2["unmanaged"] == 0
    assert w2["cpu"] is None and w2["last_seen"] is None
    assert snap["cluster"]["memory"]["memory_limit"] == 3000
    assert snap["cluster"]["memory"]["managed"] == 300 + w2["managed"]
    assert snap["cluster"]["tasks"] == 3 and snap["cluster"]["threads"] == 3
    assert snap["totals"]["memory"] == 3 and snap["totals"]["all"] == 3
    assert snap["progress"][0]["prefix"] == "x"
    assert snap["scheduler"]["cpu"] == 0.25 and snap["scheduler"]["history"]["lag"] == [0.002]
    assert snap["task_stream_cursor"] == 7


def test_snapshot_cache_builds_at_most_once_per_interval() -> None:
    built: list[float] = []

    def build(now: float) -> dict[str, float]:
        built.append(now)
        return {"time": now}

    cache = SnapshotCache(build, interval=1.0)
    first = cache.get(100.0)
    assert all(cache.get(100.0 + i / 10) is first for i in range(10))
    assert built == [100.0]
    assert json.loads(cache.get(101.0)) == {"time": 101.0}
    assert json.loads(cache.get(50.0)) == {"time": 50.0}  # the clock went back: rebuilt
    assert cache.builds == 3


def finished(h: Harness, key: str, startstops: list[dict[str, Any]]) -> None:
    ts = h.state.tasks[key]
    assert ts.processing_on is not None
    msg = {
        "op": "task-finished",
        "key": key,
        "status": "OK",
        "thread": 11,
        "nbytes": 8,
        "startstops": startstops,
    }
    h.step(
        ev.TaskFinished(
            ts.processing_on.address, key, ts.run_id, 8, msg=msg, stimulus_id=f"finished-{key}"
        )
    )


def test_task_stream_feed_serves_bars_after_a_cursor() -> None:
    stream = TaskStream()
    h = Harness(extensions=[stream])
    h.add_worker("tcp://w1", nthreads=4)
    h.add_client()
    h.core.request("get_task_stream_index", "http", {}, h.now)
    h.tick()
    assert stream.active
    h.submit({f"inc-{i}": [] for i in range(4)}, [f"inc-{i}" for i in range(4)])
    feed = TaskStreamFeed(max_bars=5)
    for i in range(2):
        finished(h, f"inc-{i}", [{"action": "compute", "start": 1.0 + i, "stop": 1.5 + i}])
    feed.update(stream)
    first = json.loads(feed.since(None))
    assert first["cursor"] == 2 and first["dropped"] == 0
    assert [bar[6] for bar in first["bars"]] == ["inc-0", "inc-1"]
    assert first["bars"][0][:6] == ["tcp://w1", 11, "inc", "compute", 1.0, 1.5]
    finished(
        h,
        "inc-2",
        [
            {"action": "transfer", "start": 3.0, "stop": 3.1, "source": "tcp://w2"},
            {"action": "compute", "start": 3.1, "stop": 3.5},
        ],
    )
    feed.update(stream)
    delta = json.loads(feed.since(2))
    assert delta["cursor"] == 3
    assert [bar[3] for bar in delta["bars"]] == ["transfer", "compute"]
    assert json.loads(feed.since(3))["bars"] == []
    # A limit keeps the newest bars and says how many it left out.
    limited = json.loads(feed.since(0, limit=1))
    assert limited["dropped"] == 3 and limited["bars"][0][6] == "inc-2"
    # The buffer is bounded: a slow cursor gets what is left.
    finished(
        h,
        "inc-3",
        [
            {"action": "compute", "start": 4.0, "stop": 4.5},
            {"action": "compute", "start": 4.6, "stop": 4.7},
        ],
    )
    feed.update(stream)
    assert len(feed.bars) == 5
    assert len(json.loads(feed.since(0))["bars"]) == 5
    # A cursor from the future (the scheduler restarted under an open page): everything.
    assert len(json.loads(feed.since(99))["bars"]) == 5


def test_individual_plot_names_are_dasks() -> None:
    assert display_name("/individual-task-stream") == "Individual Task Stream"
    plots = individual_plots()
    assert plots["Individual Workers Memory"] == "/individual-workers-memory"
    assert {"/individual-task-stream", "/individual-progress"} <= set(plots.values())
    dask_scheduler = pytest.importorskip("distributed.dashboard.scheduler")
    assert {f"/{route}" for route in INDIVIDUAL_ROUTES} <= set(dask_scheduler.applications)


def test_routes_with_and_without_the_dashboard() -> None:
    info = "distributed.http.scheduler.info"
    without = [url for url, _, _ in handlers(HttpServer(), [info], "")]
    assert without == ["/individual-plots.json", "/health"]
    server = HttpServer()
    server.board = object()  # type: ignore[assignment]  # what page_routes hands to handlers
    urls = [url for url, _, _ in handlers(server, [info, DASHBOARD], "/pre")]
    assert {"/pre/", "/pre/status", "/pre/dashboard/snapshot.json"} <= set(urls)
    assert "/pre/dashboard/task-stream.json" in urls
    assert {f"/pre/{route}" for route in INDIVIDUAL_ROUTES} <= set(urls)
