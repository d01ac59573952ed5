"""The live dashboard against a real scheduler process with real workers: every route it
adds (under a ``--dashboard-prefix``, so relative URLs are checked too), the snapshot's
values against the cluster, task-stream deltas by cursor, recent exceptions, and
``--no-dashboard``. The contract tests (``/individual-plots.json``, the pages' routes) run
against ``dask scheduler`` too; ``test_dashboard_browser.py`` opens the pages in Chromium.
"""

from __future__ import annotations

import json
import os
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from distributed import Client

from dsched.testing.cluster import DASK_SCHEDULER_KINDS, ProcessCluster

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

KIND = os.environ.get("DSCHED_TEST_SCHEDULER", "dsched")
DASK = KIND in DASK_SCHEDULER_KINDS
PREFIX = "/dask"
DASHBOARD_ARGS = ("--dashboard-address", "127.0.0.1:0", "--dashboard", "--dashboard-prefix", PREFIX)
LABEXTENSION_DEFAULTS = (
    "/individual-task-stream",
    "/individual-workers-memory",
    "/individual-progress",
)
only_dsched = pytest.mark.skipif(DASK, reason="dsched's dashboard data routes")


def get(url: str) -> tuple[int, str, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status, response.headers["Content-Type"], response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.headers["Content-Type"], error.read()


def get_json(url: str) -> Any:
    status, content_type, body = get(url)
    assert status == 200, (url, status, body[:500])
    assert content_type.startswith("application/json"), content_type
    return json.loads(body)


def wait_for(condition: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"not reached within {timeout:g} s: {what}")
        time.sleep(0.1)


@pytest.fixture(scope="module")
def dashboard() -> Iterator[tuple[Client, str]]:
    """A cluster with the dashboard on, under a prefix: (client, base URL with prefix)."""
    with (
        ProcessCluster(
            scheduler_kind=KIND,
            n_workers=2,
            scheduler_args=DASHBOARD_ARGS,
            # Tasks name functions of this module: the scheduler and workers import it.
            extra_pythonpath=[Path(__file__).parent],
        ) as cluster,
        Client(cluster.address, timeout=30) as client,
    ):
        port = client.scheduler_info()["services"]["dashboard"]
        yield client, f"http://127.0.0.1:{port}{PREFIX}"


def inc(x: int) -> int:
    return x + 1


def divide(x: int) -> float:
    return 1 / x


def test_individual_plots_json(dashboard: tuple[Client, str]) -> None:
    """Dask's map for dask-labextension: 'Individual X' -> a path, the three pages of its
    default layout among them, each a page of its own (under the prefix)."""
    url = dashboard[1]
    plots = get_json(url + "/individual-plots.json")
    assert plots and all(isinstance(v, str) and v.startswith("/") for v in plots.values())
    assert all(key.startswith("Individual ") for key in plots)
    assert set(LABEXTENSION_DEFAULTS) <= set(plots.values())
    for name, path in plots.items():
        if DASK and path.startswith("/statics/"):
            continue  # Dask's cluster map: a static file, outside the Bokeh apps
        assert name == path.strip("/").replace("-", " ").title()
        status, content_type, body = get(url + path)
        assert status == 200 and content_type.startswith("text/html"), (path, status)
        assert b"X-Frame-Options" not in body


def test_status_page_and_root_redirect(dashboard: tuple[Client, str]) -> None:
    url = dashboard[1]
    status, content_type, body = get(url + "/status")
    assert status == 200 and content_type.startswith("text/html")
    if not DASK:  # Dask's Bokeh apps redirect the root only without a prefix
        status, _, root = get(url + "/")  # urllib follows the redirect to status
        assert status == 200 and root == body
        # Relative URLs only: the page works under the prefix and behind proxies.
        assert b'src="dashboard/static/dashboard.js"' in body
        assert b'href="dashboard/static/dashboard.css"' in body
        assert b'src="/' not in body and b'href="/' not in body
        for asset in ("dashboard.js", "dashboard.css"):
            assert get(f"{url}/dashboard/static/{asset}")[0] == 200


@only_dsched
def test_snapshot_matches_the_cluster(dashboard: tuple[Client, str]) -> None:
    client, url = dashboard
    futures = client.map(inc, range(20), key=[f"snapinc-{i}" for i in range(20)])
    client.gather(futures)
    workers = client.scheduler_info()["workers"]

    def settled() -> Any:
        snap = get_json(url + "/dashboard/snapshot.json")
        rows = {row["prefix"]: row for row in snap["progress"]}
        row = rows.get("snapinc")
        # Managed memory comes with the workers' next heartbeats.
        managed = snap["cluster"]["memory"]["managed"]
        return snap if row and row["memory"] == 20 and row["all"] == 20 and managed else None

    snap = wait_for(settled, 15, "the snapshot shows the 20 results, in progress and memory")
    assert {w["address"] for w in snap["workers"]} == set(workers)
    assert snap["cluster"]["workers"] == 2
    assert snap["cluster"]["threads"] == sum(w["nthreads"] for w in workers.values())
    assert sum(w["in_memory"] for w in snap["workers"]) >= 20
    assert snap["cluster"]["memory"]["managed"] == sum(w["managed"] for w in snap["workers"])
    assert snap["totals"]["memory"] >= 20
    del futures


@only_dsched
def test_snapshot_is_built_at_most_once_a_second(dashboard: tuple[Client, str]) -> None:
    url = dashboard[1]
    start = time.monotonic()
    times = {get_json(url + "/dashboard/snapshot.json")["time"] for _ in range(20)}
    elapsed = time.monotonic() - start
    assert len(times) <= int(elapsed) + 2, (len(times), elapsed)


@only_dsched
def test_task_stream_deltas_by_cursor(dashboard: tuple[Client, str]) -> None:
    client, url = dashboard
    cursor = get_json(url + "/dashboard/task-stream.json")["cursor"]  # starts the stream
    keys = [f"streaminc-{i}" for i in range(10)]
    futures = client.map(inc, range(10), key=keys)
    client.gather(futures)

    def bars_after() -> Any:
        delta = get_json(f"{url}/dashboard/task-stream.json?since={cursor}")
        return delta if {bar[6] for bar in delta["bars"]} >= set(keys) else None

    delta = wait_for(bars_after, 15, "the task stream has a bar for every task that ran")
    workers = set(client.scheduler_info()["workers"])
    for worker, _thread, prefix, action, start, stop, key in delta["bars"]:
        if key in keys and action == "compute":
            assert worker in workers and prefix == "streaminc" and start <= stop
    assert delta["cursor"] >= cursor + 10
    assert get_json(f"{url}/dashboard/task-stream.json?since={delta['cursor']}")["bars"] == []
    status, _, body = get(url + "/dashboard/task-stream.json?since=abc")
    assert status == 400 and "since" in json.loads(body)["Error"]
    del futures


@only_dsched
def test_exceptions_with_tracebacks(dashboard: tuple[Client, str]) -> None:
    client, url = dashboard
    future = client.submit(divide, 0, key="dashdivide-0")
    with pytest.raises(ZeroDivisionError):
        future.result()

    def recorded() -> Any:
        snap = get_json(url + "/dashboard/snapshot.json")
        return [e for e in snap["exceptions"] if e["key"] == "dashdivide-0"]

    (record,) = wait_for(recorded, 15, "the error is among the recent exceptions")
    assert "ZeroDivisionError" in record["exception"]
    assert "divide" in record["traceback"] or "1 / x" in record["traceback"]
    assert record["worker"] in client.scheduler_info()["workers"]
    del future


@only_dsched
def test_scheduler_cpu_and_loop_lag_are_sampled(dashboard: tuple[Client, str]) -> None:
    url = dashboard[1]

    def sampled() -> Any:
        history = get_json(url + "/dashboard/snapshot.json")["scheduler"]["history"]
        return history if len(history["cpu"]) >= 2 else None

    history = wait_for(sampled, 15, "two CPU / loop-lag samples")
    assert all(0 <= cpu < 4 for cpu in history["cpu"])  # a fraction of a core (or a few)
    assert all(0 <= lag < 5 for lag in history["lag"])
    assert history["time"] == sorted(history["time"])


def test_no_dashboard_keeps_the_other_routes(cluster: ProcessCluster) -> None:
    """The session cluster runs with --no-dashboard: the pages and their data are gone,
    /individual-plots.json is {} (as Dask's without Bokeh), the rest stays."""
    with Client(cluster.address, timeout=30) as client:
        port = client.scheduler_info()["services"]["dashboard"]
    url = f"http://127.0.0.1:{port}"
    assert get(url + "/health")[0] == 200
    assert get(url + "/metrics")[0] == 200
    assert get_json(url + "/individual-plots.json") == {}
    for path in ("/status", "/individual-task-stream"):
        assert get(url + path)[0] == 404, path
    if not DASK:
        for path in ("/dashboard/snapshot.json", "/dashboard/task-stream.json"):
            assert get(url + path)[0] == 404, path
