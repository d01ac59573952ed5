"""The dashboard's data without an event loop: the per-prefix counts against a recount of
the state after every step, across stops and restarts, the recent exceptions, the snapshot
(workers, heartbeats, totals), its once-a-second cache, the task stream bars behind a
cursor, and the route table with and without the dashboard; then, on a real Scheduler in
this process, the stop once nobody asks and the restart on the next request."""

from __future__ import annotations

import asyncio
import json
import random
import urllib.request
from collections import Counter
from typing import Any

import pytest
from harness import Harness

from dsched.http import HttpServer
from dsched.http.dashboard import INDIVIDUAL_ROUTES, LoopMonitor, display_name, individual_plots
from dsched.http.dashboard_data import (
    DashboardObserver,
    SchedulerSamples,
    SnapshotCache,
    TaskStreamFeed,
    build_snapshot,
)
from dsched.http.routes import DASHBOARD, handlers
from dsched.policy import DEFAULT_POLICY, make_policy
from dsched.server.policy_process import dask_policy_config
from dsched.server.scheduler import Scheduler
from dsched.state import events as ev


def recount(h: Harness) -> dict[str, Counter[str]]:
    counts: dict[str, Counter[str]] = {}
    for ts in h.state.tasks.values():
        counts.setdefault(ts.prefix, Counter())[ts.state] += 1
    return counts


def counted(progress: DashboardObserver) -> dict[str, Counter[str]]:
    return {
        prefix: Counter({state: n for state, n in row.items() if n and state != "forgotten"})
        for prefix, row in progress.counts.items()
        if any(n for state, n in row.items() if state != "forgotten")
    }


def observe(h: Harness, progress: DashboardObserver) -> None:
    h.core.set_observations(progress, progress.observations, transitions=False)


def started(h: Harness, max_results: int = 1000) -> DashboardObserver:
    progress = DashboardObserver(max_results=max_results)
    h.core.add_extension(progress)
    assert progress.start()
    observe(h, progress)
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
    and releases, a worker lost midway, the dashboard stopped and restarted (odd seeds): the
    counts equal a recount after every step they are kept."""
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
        if progress is not None and seed % 2 and round_ in (1, 4):
            assert progress.stop()  # nobody looked for a while
            observe(h, progress)
            assert progress.counts == {} and h.state.prefix_counts is None
            h.run_until_idle()  # moves nobody counts
            assert progress.start()
            observe(h, progress)
    h.run_until_idle()
    h.step(ev.ClientReleasesKeys("c", wanted))
    assert progress is not None and counted(progress) == recount(h) == {}


def test_a_task_forgotten_next_to_one_created_and_forgotten_is_counted_once() -> None:
    """The rare miscount: a released task forgotten in the same tick as a task of another
    prefix that was created and forgotten at once (an unneeded task of a new graph). The
    counts once derived from the reported moves took the first for the second ("released"
    stayed 1 for it, -1 for the other); the state machine's own counts cannot mix them up."""
    h = Harness()
    h.add_worker("tcp://w1")
    h.add_client()
    progress = started(h)
    h.submit({"x-1": [], "y-1": ["x-1"]}, ["y-1"])
    h.run_until_idle()
    assert h.state.tasks["x-1"].state == "released"  # kept for its dependent in memory
    h.now += 0.001
    h.core.handle(ev.ClientReleasesKeys("c", ["y-1"]), h.now)
    graph = [ev.NewTask("z-1", (), "run-z", {}), ev.NewTask("w-1", (), "run-w", {})]
    h.core.handle(ev.GraphReceived("c", graph, ["w-1"], {"z-1": 0, "w-1": 1}), h.now)
    h.tick()
    assert "z-1" not in h.state.tasks and "x-1" not in h.state.tasks
    assert counted(progress) == recount(h) == {"w": Counter({"processing": 1})}
    assert progress.counts["x"]["forgotten"] == 1 and progress.counts["z"]["forgotten"] == 1


def test_stopped_follows_nothing_and_restarts_from_a_recount() -> None:
    h = Harness()
    h.add_worker("tcp://w1", nthreads=2)
    h.add_client()
    progress = started(h)
    h.submit(chain("inc", 3), ["inc-2"])
    assert not progress.start()  # already started: no second recount
    h.finish(next(iter(h.processing())))
    assert progress.index == 0  # (no startstops: no bar)
    assert progress.stop() and not progress.stop()
    observe(h, progress)
    assert h.state.prefix_counts is None
    assert ev.TaskFinished not in progress.observations
    h.submit(chain("add", 2), ["add-1"])  # created and moved while nobody counts
    for _ in range(3):
        finished(h, next(iter(h.processing())), [{"action": "compute", "start": 1, "stop": 2}])
    assert progress.index == 0 and not progress.results
    assert progress.start()
    observe(h, progress)
    assert counted(progress) == recount(h)
    finished(h, next(iter(h.processing())), [{"action": "compute", "start": 1, "stop": 2}])
    assert counted(progress) == recount(h) and progress.index == 1


def test_the_monitor_stops_and_calls_back_when_nobody_asks() -> None:
    async def run() -> int:
        stopped = asyncio.Event()
        monitor = LoopMonitor(SchedulerSamples(), stopped.set, idle_stop=0.05)
        monitor.touch()
        assert monitor.running
        await asyncio.wait_for(stopped.wait(), timeout=10)
        assert not monitor.running
        return 1

    assert asyncio.run(run()) == 1


def _fetch(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=10) as reply:
        body: bytes = reply.read()
        return body


def test_the_dashboard_stops_observing_when_idle_and_restarts_on_a_request() -> None:
    """A real scheduler: a page's request starts the counts and the result observation;
    with nobody asking they stop (no per-task work left); the next request restarts them."""

    async def main() -> list[tuple[bool, bool, bool]]:
        http = HttpServer("127.0.0.1:0", dashboard=True)
        scheduler = Scheduler(
            make_policy(DEFAULT_POLICY, dask_policy_config()), host="127.0.0.1", port=0, http=http
        )
        await scheduler.start()
        board = http.board
        assert board is not None
        board.monitor.idle_stop = 0.2
        core = scheduler.core
        base = f"http://127.0.0.1:{scheduler.identity()['services']['dashboard']}"
        loop = asyncio.get_running_loop()

        def observed() -> tuple[bool, bool, bool]:
            # (The core's table of who observes what: no public reader.)
            finished = board.observer in core._observers.get(ev.TaskFinished, ())
            return board.observer.active, scheduler.state.prefix_counts is not None, finished

        seen = [observed()]
        await loop.run_in_executor(None, _fetch, base + "/status")
        seen.append(observed())
        deadline = loop.time() + 20
        while board.observer.active and loop.time() < deadline:
            await asyncio.sleep(0.05)  # the monitor's timer must run: yield to the loop
        seen.append(observed())
        await loop.run_in_executor(None, _fetch, base + "/dashboard/snapshot.json")
        seen.append(observed())
        await scheduler.close()
        return seen

    assert asyncio.run(main()) == [
        (False, False, False),
        (True, True, True),
        (False, False, False),
        (True, True, True),
    ]


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


def snapshot_of(h: Harness, heartbeats: dict[str, Any], progress: DashboardObserver) -> Any:
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
    h = Harness()
    h.add_worker("tcp://w1", nthreads=4)
    h.add_client()
    stream = started(h)
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


def test_results_are_kept_once_per_real_move_and_bounded() -> None:
    """A duplicate result (no move) and one without startstops make no bar (as in Dask's
    task stream); an error makes an ``error`` bar; only the newest results are kept."""
    h = Harness()
    h.add_worker("tcp://w1", nthreads=4)
    h.add_worker("tcp://w2", nthreads=4)
    h.add_client()
    observer = started(h, max_results=2)
    h.submit({f"inc-{i}": [] for i in range(4)}, [f"inc-{i}" for i in range(4)])
    compute = [{"action": "compute", "start": 1.0, "stop": 2.0}]
    finished(h, "inc-0", compute)
    assert observer.index == 1
    ts = h.state.tasks["inc-0"]
    assert ts.state == "memory"
    h.step(ev.TaskFinished("tcp://w2", "inc-0", ts.run_id, 8, msg={"startstops": compute}))
    assert observer.index == 1  # inc-0 was in memory already: nothing moved
    finished(h, "inc-1", [])
    assert observer.index == 1
    ts = h.state.tasks["inc-2"]
    assert ts.processing_on is not None
    h.step(
        ev.TaskErred(
            ts.processing_on.address,
            "inc-2",
            ts.run_id,
            "exc",
            "tb",
            msg={"startstops": compute, "thread": 3},
        )
    )
    finished(h, "inc-3", compute)
    assert observer.index == 3 and len(observer.results) == 2
    feed = TaskStreamFeed(interval=1.0)
    feed.refresh(observer, 100.0)
    bars = json.loads(feed.since(None))["bars"]
    assert [(bar[3], bar[6]) for bar in bars] == [("error", "inc-2"), ("compute", "inc-3")]
    # However many viewers ask, the bars are brought up to date at most once a second.
    h.submit({"late-1": []}, ["late-1"])
    finished(h, "late-1", compute)
    feed.refresh(observer, 100.5)
    assert feed.cursor == 3
    feed.refresh(observer, 101.0)
    assert feed.cursor == 4 and json.loads(feed.since(3))["bars"][0][6] == "late-1"


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
