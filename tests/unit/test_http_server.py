"""dsched.http without worker processes: the route table, the API's argument checks, the
connection counters, and the HTTP server started on a real Scheduler (port fallback,
/metrics from the per-scheduler registry)."""

from __future__ import annotations

import asyncio
import json
import socket
import urllib.request
import warnings

import pytest
from prometheus_client.parser import text_string_to_metric_families

from dsched.http import HttpServer
from dsched.http.metrics import ConnectionCounts
from dsched.http.routes import HEALTH, BadRequest, _retire_arguments, handlers
from dsched.policy import DEFAULT_POLICY, make_policy
from dsched.server.policy_process import dask_policy_config
from dsched.server.scheduler import Scheduler
from dsched.state import events as ev


def paths(modules: list[str], prefix: str = "") -> list[str]:
    return [url for url, _, _ in handlers(HttpServer(), modules, prefix)]


def test_health_survives_a_custom_route_list() -> None:
    assert paths(["distributed.http.scheduler.api"]) == [
        "/api/v1",
        "/api/v1/retire_workers",
        "/api/v1/get_workers",
        "/api/v1/adaptive_target",
        "/api/v1/check_idle",
        "/health",
    ]
    assert paths([HEALTH]) == ["/health"]


def test_prefix_and_unknown_modules() -> None:
    assert paths(["distributed.http.scheduler.json", "my.own.module"], "dask/") == [
        "/dask/json/counts.json",
        "/dask/json/identity.json",
        "/dask/health",
    ]
    assert paths(["distributed.http.scheduler.prometheus"], "/a/b") == [
        "/a/b/metrics",
        "/a/b/health",
    ]


@pytest.mark.parametrize(
    "body",
    [b"{", b"[1]", b'{"n": -1}', b'{"n": "2"}', b'{"n": true}', b'{"workers": "tcp://a"}'],
)
def test_retire_arguments_rejects_malformed_bodies(body: bytes) -> None:
    with pytest.raises(BadRequest):
        _retire_arguments(body, None)


def test_retire_arguments_workers() -> None:
    assert _retire_arguments(json.dumps({"workers": ["tcp://a:1"]}).encode(), None) == ["tcp://a:1"]
    assert _retire_arguments(b"", None) == []


def test_connection_counts() -> None:
    counts = ConnectionCounts()
    for event in (
        ev.ClientConnected("c"),
        ev.ClientConnected("c"),
        ev.ClientDisconnected("c"),
        ev.ClientDisconnected("feed-never-connected"),
        ev.WorkerConnected("tcp://w:1", 1),
        ev.WorkerDisconnected("tcp://w:1"),
        ev.WorkerDisconnected("tcp://w:1"),
    ):
        counts.on_event(event, 0.0)
    assert (counts.clients_added, counts.clients_removed) == (1, 1)
    assert (counts.workers_added, counts.workers_removed) == (1, 1)


def _fetch(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as response:
        return str(response.read().decode())


def test_taken_port_falls_back_with_a_warning() -> None:
    async def main() -> tuple[int, int, str, str]:
        with socket.socket() as taken:
            taken.bind(("127.0.0.1", 0))
            taken.listen()
            port = taken.getsockname()[1]
            http = HttpServer(f"127.0.0.1:{port}", dashboard=False)
            scheduler = Scheduler(
                make_policy(DEFAULT_POLICY, dask_policy_config()),
                host="127.0.0.1",
                port=0,
                http=http,
            )
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                await scheduler.start()
            assert any(f"Port {port} is already in use" in str(w.message) for w in caught)
            bound = scheduler.identity()["services"]["dashboard"]
            loop = asyncio.get_running_loop()
            base = f"http://127.0.0.1:{bound}"
            health = await loop.run_in_executor(None, _fetch, base + "/health")
            text = await loop.run_in_executor(None, _fetch, base + "/metrics")
            await scheduler.close()
            return port, bound, health, text

    port, bound, health, text = asyncio.run(main())
    assert bound != port and health == "ok"
    families = {f.name: f for f in text_string_to_metric_families(text)}
    assert families["dask_scheduler_workers"].type == "gauge"
    assert families["dask_scheduler_workers_added"].type == "counter"
    assert "process_cpu_seconds" in families
