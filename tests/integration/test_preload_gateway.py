"""What dask-gateway's scheduler preload (``dask_gateway.scheduler_preload``) needs from
the scheduler, on a real scheduler process: a stand-in preload makes the same calls, in
the same way (its ``GatewaySchedulerService``, read from dask-gateway's source; the
package itself is not installed here, and needs a gateway server to talk to).

The calls, by the part of the preload that makes them:

* ``dask_setup`` is a click command with ``--dg-api-address`` and friends, which the
  scheduler's command line passes through (``dask scheduler ... --preload
  dask_gateway.scheduler_preload --dg-api-address :8788``);
* start-up: ``scheduler.loop``, ``scheduler.add_plugin`` (``add_worker`` /
  ``remove_worker``), a tornado app with ``/api/health`` listening next to the scheduler,
  ``scheduler.services["gateway"] = service`` (its ``port`` shows in ``identity()``);
* heartbeat: ``scheduler.address``, ``scheduler.services["dashboard"].port``,
  ``scheduler.workers[addr].name``, ``workers_to_close(target=, attribute="name")``,
  ``await retire_workers(names=, remove=True, close_workers=True)``;
* adaptive loop: ``adaptive_target(target_duration=)``;
* idle check: ``workers[...].processing``, ``unrunnable``, ``transition_log[-1][-1]``,
  ``time_started``, ``loop.time()``.

Its ``remove_worker(self, scheduler, worker)`` hook takes no ``stimulus_id``, which Dask
2026.8.0 passes: the hook fails (logged) on Dask and on dsched alike; the test pins that.

The heartbeat to the gateway's HTTP API (``DASK_GATEWAY_API_URL``) is replaced by an RPC
handler the test calls, which returns the message the preload would have sent.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.request import urlopen

import pytest
from distributed import Client

from dsched.testing.cluster import ProcessCluster

pytestmark = pytest.mark.timeout(120)

CONNECT_TIMEOUT_S = 30
RETIRE_TIMEOUT_S = 60

GATEWAY_LIKE_PRELOAD = """
import click
from tornado import web
from distributed.diagnostics.plugin import SchedulerPlugin


class HealthHandler(web.RequestHandler):
    def get(self):
        self.set_status(200)


class GatewayLikePlugin(SchedulerPlugin):
    def __init__(self, service):
        self.service = service

    def add_worker(self, scheduler, worker):
        self.service.worker_added(worker)

    def remove_worker(self, scheduler, worker):
        self.service.worker_removed(worker)


class GatewayLikeService:
    def __init__(self, scheduler):
        self.scheduler = scheduler
        self.loop = scheduler.loop
        self.address_to_worker = {}
        self.active_workers = set()
        self.closed_workers = set()
        self.scheduler.add_plugin(GatewayLikePlugin(self))
        self.app = web.Application([("/api/health", HealthHandler)])

    def worker_added(self, address):
        ws = self.scheduler.workers[address]
        self.address_to_worker[address] = ws
        self.active_workers.add(ws.name)

    def worker_removed(self, address):
        ws = self.address_to_worker.pop(address)
        self.active_workers.discard(ws.name)
        self.closed_workers.add(ws.name)

    def listen(self, host, port):
        self.server = self.app.listen(address=host, port=port)
        (self.port,) = {s.getsockname()[1] for s in self.server._sockets.values()}

    def idle_state(self):
        scheduler = self.scheduler
        busy = any(ws.processing for ws in scheduler.workers.values())
        last_action = (
            scheduler.transition_log[-1][-1]
            if scheduler.transition_log
            else scheduler.time_started
        )
        return {
            "busy": busy,
            "unrunnable": bool(scheduler.unrunnable),
            "last_action": last_action,
            "loop_time": self.loop.time(),
        }

    async def heartbeat(self, count):
        closing = []
        if count < len(self.active_workers):
            closing = self.scheduler.workers_to_close(target=count, attribute="name")
        message = {
            "scheduler_address": self.scheduler.address,
            "dashboard_port": self.scheduler.services["dashboard"].port,
            "count": count,
            "active_workers": sorted(map(str, self.active_workers - set(closing))),
            "closing_workers": sorted(map(str, closing)),
            "closed_workers": sorted(map(str, self.closed_workers)),
            "adaptive_target": self.scheduler.adaptive_target(target_duration=5),
            **self.idle_state(),
        }
        if closing:
            await self.scheduler.retire_workers(names=closing, remove=True, close_workers=True)
        return message


@click.command()
@click.option("--dg-api-address", type=str, default=":0")
@click.option("--dg-adaptive-period", type=float, default=3.0)
def dask_setup(scheduler, dg_api_address, dg_adaptive_period):
    host, port = dg_api_address.split(":")
    service = GatewayLikeService(scheduler)
    service.listen(host, int(port))
    scheduler.services["gateway"] = service
    scheduler.handlers["gateway_heartbeat"] = service.heartbeat
"""


def heartbeat(client: Client, count: int) -> dict[str, Any]:
    """The preload's heartbeat message (msgpack turns its lists into tuples: back)."""
    beat = client.sync(client.scheduler.gateway_heartbeat, count=count)
    return {k: list(v) if isinstance(v, tuple) else v for k, v in beat.items()}


@pytest.fixture
def gateway_cluster(scheduler_kind: str, tmp_path: Path) -> Iterator[ProcessCluster]:
    (tmp_path / "gateway_like_preload.py").write_text(GATEWAY_LIKE_PRELOAD)
    with ProcessCluster(
        scheduler_kind="dsched" if scheduler_kind == "dsched" else scheduler_kind,
        n_workers=2,
        # As dask-gateway launches its scheduler (the --dg-* options go to dask_setup).
        scheduler_args=[
            "--preload",
            "gateway_like_preload",
            "--dg-api-address",
            "127.0.0.1:0",
            "--dg-adaptive-period",
            "1",
        ],
        extra_pythonpath=[tmp_path],
    ) as cluster:
        yield cluster


def test_gateway_preload_calls(
    gateway_cluster: ProcessCluster, wait_until: Callable[..., None]
) -> None:
    assert gateway_cluster.address is not None
    with Client(gateway_cluster.address, timeout=CONNECT_TIMEOUT_S) as client:
        info = client.scheduler_info()
        services = info["services"]
        # The readiness probe: the preload's own HTTP server, at the port identity() shows.
        with urlopen(f"http://127.0.0.1:{services['gateway']}/api/health", timeout=10) as r:
            assert r.status == 200
        names = sorted(str(ws["name"]) for ws in info["workers"].values())

        # Nothing to close at the current count: a plain heartbeat.
        beat = heartbeat(client, count=2)
        assert beat["scheduler_address"] == gateway_cluster.address
        assert beat["dashboard_port"] == services["dashboard"]
        assert beat["active_workers"] == names and beat["closing_workers"] == []
        assert beat["adaptive_target"] == 0  # idle: no workers wanted
        assert beat["busy"] is False and beat["unrunnable"] is False
        assert isinstance(beat["last_action"], float) and isinstance(beat["loop_time"], float)

        # Scaling down to one worker retires one, by name, and the plugin sees it leave.
        beat = heartbeat(client, count=1)
        (retired,) = beat["closing_workers"]
        assert retired in names
        wait_until(
            lambda: len(client.scheduler_info()["workers"]) == 1,
            RETIRE_TIMEOUT_S,
            gateway_cluster.describe_processes,
        )
        # dask-gateway's remove_worker(scheduler, worker) takes no stimulus_id, which Dask
        # 2026.8.0 passes (and dsched, the same way): the hook fails, logged, in both, and
        # the service never hears that the worker left.
        beat = heartbeat(client, count=1)
        assert beat["closed_workers"] == []
        assert sorted(beat["active_workers"]) == names
    log = gateway_cluster.scheduler.log_tail(lines=400) if gateway_cluster.scheduler else ""
    assert "stimulus_id" in log and "TypeError" in log
