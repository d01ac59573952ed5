"""The scheduler's HTTP server (Dask's distributed/http): every route with a real HTTP
client against a real scheduler process and real workers, on dsched and on Dask.

Two clusters: one with a custom ``distributed.scheduler.http.routes`` that enables the
opt-in ``/api/v1`` (as some Kubernetes operators do), one with the default routes and a
``--dashboard-prefix``.
"""

from __future__ import annotations

import json
import os
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest
from distributed import Client

from dsched.testing.cluster import DASK_SCHEDULER_KINDS, ProcessCluster

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

KIND = os.environ.get("DSCHED_TEST_SCHEDULER", "dsched")
DASK = KIND in DASK_SCHEDULER_KINDS
HTTP_ARGS = ("--dashboard-address", "127.0.0.1:0")
API_ROUTES = (
    "['distributed.http.scheduler.api', 'distributed.http.health',"
    " 'distributed.http.scheduler.json', 'distributed.http.scheduler.prometheus']"
)


def get(url: str, data: bytes | None = None) -> tuple[int, str, str]:
    """(status, content type, body) of a GET (a POST with ``data``)."""
    request = urllib.request.Request(url, data=data, method="POST" if data is not None else "GET")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.headers["Content-Type"], response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.headers["Content-Type"], error.read().decode()


def base_url(client: Client, prefix: str = "") -> str:
    port = client.scheduler_info()["services"]["dashboard"]
    return f"http://127.0.0.1:{port}{prefix}"


@pytest.fixture(scope="module")
def api_cluster() -> Iterator[tuple[Client, str]]:
    env = {"DASK_DISTRIBUTED__SCHEDULER__HTTP__ROUTES": API_ROUTES}
    with (
        ProcessCluster(
            scheduler_kind=KIND, n_workers=2, scheduler_args=HTTP_ARGS, scheduler_env=env
        ) as cluster,
        Client(cluster.address, timeout=30) as client,
    ):
        yield client, base_url(client)


@pytest.fixture(scope="module")
def prefixed_cluster() -> Iterator[tuple[Client, str]]:
    args = (*HTTP_ARGS, "--dashboard", "--dashboard-prefix", "/dask")
    with (
        ProcessCluster(scheduler_kind=KIND, n_workers=1, scheduler_args=args) as cluster,
        Client(cluster.address, timeout=30) as client,
    ):
        yield client, base_url(client, "/dask")


def get_json(url: str) -> Any:
    status, _, body = get(url)
    assert status == 200, (url, status, body)
    return json.loads(body)


def test_health(api_cluster: tuple[Client, str]) -> None:
    status, content_type, body = get(api_cluster[1] + "/health")
    assert (status, content_type, body) == (200, "text/plain; charset=utf-8", "ok")


def test_identity_json(api_cluster: tuple[Client, str]) -> None:
    client, url = api_cluster
    identity = get_json(url + "/json/identity.json")
    assert identity["type"] == "Scheduler"
    assert identity["address"] == client.scheduler.address
    assert identity["services"]["dashboard"] == int(url.rsplit(":", 1)[1])
    assert identity["n_workers"] == 2 and len(identity["workers"]) == 2


def test_counts_json(api_cluster: tuple[Client, str]) -> None:
    client, url = api_cluster
    futures = client.map(lambda x: x + 1, range(5))
    client.gather(futures)
    counts = get_json(url + "/json/counts.json")
    assert set(counts) == {
        *("bytes", "clients", "cores", "erred", "hosts", "idle", "memory", "processing"),
        *("released", "saturated", "tasks", "unrunnable", "waiting", "waiting_data"),
        *("workers", "desired_workers"),
    }
    assert counts["workers"] == 2 and counts["cores"] == 2 and counts["hosts"] == 1
    assert counts["tasks"] == 5 and counts["memory"] == 5 and counts["processing"] == 0
    del futures


def metric(url: str, sample: str) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    for family in text_string_to_metric_families(get(url + "/metrics")[2]):
        for s in family.samples:
            if s.name == sample and not s.labels:
                return float(s.value)
    raise AssertionError(f"no sample {sample}")


def test_metrics(api_cluster: tuple[Client, str]) -> None:
    from prometheus_client.parser import text_string_to_metric_families

    client, url = api_cluster
    futures = client.map(lambda x: x * 2, range(3), key=[f"metrics-{i}" for i in range(3)])
    client.gather(futures)
    status, content_type, body = get(url + "/metrics")
    assert status == 200 and content_type.startswith("text/plain")
    families = {f.name: f for f in text_string_to_metric_families(body)}
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in families.values()
        for s in family.samples
    }
    assert families["dask_scheduler_clients"].type == "gauge"
    assert samples["dask_scheduler_clients", ()] == 1
    workers = {
        labels[0][1]: v for (n, labels), v in samples.items() if n == "dask_scheduler_workers"
    }
    assert set(workers) == {"idle", "partially_saturated", "saturated", "paused", "retiring"}
    assert sum(workers.values()) == 2
    tasks = {labels[0][1]: v for (n, labels), v in samples.items() if n == "dask_scheduler_tasks"}
    assert set(tasks) == {
        *("released", "waiting", "no-worker", "queued", "processing", "memory", "erred")
    }
    assert tasks["memory"] >= 3 and tasks["processing"] == 0
    for name in ("workers_added", "workers_removed"):
        assert families[f"dask_scheduler_{name}"].type == "counter"
    assert samples["dask_scheduler_workers_added_total", ()] >= 2
    assert samples["dask_scheduler_client_connections_added_total", ()] >= 1
    assert ("dask_scheduler_client_connections_removed_total", ()) in samples
    assert families["dask_scheduler_tasks_forgotten"].type == "counter"
    forgotten = samples["dask_scheduler_tasks_forgotten_total", ()]
    del futures
    if not DASK:  # Dask's counter leaves out task groups forgotten whole
        deadline = time.monotonic() + 10
        while metric(url, "dask_scheduler_tasks_forgotten_total") < forgotten + 3:
            assert time.monotonic() < deadline, "the released tasks were not counted"
            time.sleep(0.05)


def test_api_v1(api_cluster: tuple[Client, str]) -> None:
    client, url = api_cluster
    assert get(url + "/api/v1")[::2] == (200, "API V1")
    workers = get_json(url + "/api/v1/get_workers")
    info = client.scheduler_info()["workers"]
    assert workers["num_workers"] == 2
    assert {w["address"] for w in workers["workers"]} == set(info)
    assert {w["name"] for w in workers["workers"]} == {w["name"] for w in info.values()}
    target = get_json(url + "/api/v1/adaptive_target")
    assert isinstance(target["workers"], int) and target["workers"] >= 0


def test_check_idle(api_cluster: tuple[Client, str]) -> None:
    client, url = api_cluster
    future = client.submit(time.sleep, 3, pure=False)
    deadline = time.monotonic() + 10
    while not client.processing() or not any(client.processing().values()):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert get_json(url + "/api/v1/check_idle") == {"idle_since": None}
    future.result()
    before = time.time()
    idle = [get_json(url + "/api/v1/check_idle")["idle_since"] for _ in range(2)]
    assert isinstance(idle[1], float) and idle[1] >= before - 1


def test_unknown_route_404(api_cluster: tuple[Client, str]) -> None:
    assert get(api_cluster[1] + "/no/such/route")[0] == 404
    assert get(api_cluster[1] + "/status")[0] == 404  # --no-dashboard: no hint page


def test_retire_workers(api_cluster: tuple[Client, str]) -> None:
    """Last in this module: it leaves the cluster with no worker."""
    client, url = api_cluster
    status, _, body = get(url + "/api/v1/retire_workers", data=b"{not json")
    assert status == (500 if DASK else 400), body
    assert "Error" in json.loads(body)
    status, _, body = get(url + "/api/v1/retire_workers", data=json.dumps({"n": 1}).encode())
    assert status == 200, body
    retired = json.loads(body)
    assert len(retired) == 1
    (address,) = retired
    assert retired[address]["name"] is not None
    client.wait_for_workers(1)
    assert address not in client.scheduler_info()["workers"]
    (rest,) = client.scheduler_info()["workers"]
    body_workers = json.dumps({"workers": [rest]}).encode()
    status, _, body = get(url + "/api/v1/retire_workers", data=body_workers)
    assert status == 200 and list(json.loads(body)) == [rest]


def test_prefix_and_default_routes(prefixed_cluster: tuple[Client, str]) -> None:
    url = prefixed_cluster[1]
    assert get(url + "/health")[::2] == (200, "ok")
    assert get_json(url + "/json/identity.json")["type"] == "Scheduler"
    assert get(url + "/api/v1")[0] == 404  # the api routes are opt-in
    assert get(url.removesuffix("/dask") + "/health")[0] == 404


def test_sitemap(api_cluster: tuple[Client, str]) -> None:
    """Dask's RoutingApplication serves it at /sitemap.json, whatever the prefix (with the
    bokeh dashboard attached, Dask's sitemap fails with a 500)."""
    paths = get_json(api_cluster[1] + "/sitemap.json")["paths"]
    assert paths == sorted(paths)
    assert {"/health", "/metrics", "/json/counts.json", "/api/v1", "/sitemap.json"} <= set(paths)


def test_dashboard_link(prefixed_cluster: tuple[Client, str]) -> None:
    """``client.dashboard_link`` is Dask's ``{scheme}://{host}:{port}/status``: without the
    prefix, so it is 404 with one; the prefixed /status is Dask's bokeh page, or dsched's
    own dashboard page."""
    client, url = prefixed_cluster
    port = client.scheduler_info()["services"]["dashboard"]
    assert client.dashboard_link == f"http://127.0.0.1:{port}/status"
    status, content_type, body = get(url + "/status")
    assert status == 200 and content_type.startswith("text/html")
    if not DASK:
        assert 'data-view="task-stream"' in body
