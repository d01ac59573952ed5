"""Cluster managers with a dsched scheduler: ``SpecCluster`` with ``dsched.deploy.Scheduler``
and real nanny workers, ``dsched.LocalCluster`` scaling up and down by hand and
adaptively, ``processes=False``; everything on 127.0.0.1.

With DSCHED_TEST_SCHEDULER=dask the same tests run with Dask's own classes
(``distributed.Scheduler`` in the spec, ``distributed.LocalCluster``): the reference
behaviour. Tests of dsched-only behaviour (the subprocess, refused options) skip there.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable
from typing import Any

import dask
import distributed
import pytest
from distributed import Client, Event, Nanny, SpecCluster
from distributed.core import Status

import dsched
import dsched.deploy

pytestmark = pytest.mark.timeout(120)

LOCALHOST = "127.0.0.1"
# Every scheduler's HTTP server on 127.0.0.1, on a free port.
DASHBOARD = f"{LOCALHOST}:0"
WAIT_S = 60


@pytest.fixture
def scheduler_class(scheduler_kind: str) -> type:
    return dsched.deploy.Scheduler if scheduler_kind == "dsched" else distributed.Scheduler


@pytest.fixture
def local_cluster_class(scheduler_kind: str) -> type:
    return dsched.LocalCluster if scheduler_kind == "dsched" else distributed.LocalCluster


@pytest.fixture
def dsched_only(scheduler_kind: str) -> None:
    if scheduler_kind != "dsched":
        pytest.skip("dsched.deploy's own behaviour (the scheduler subprocess)")


def nanny_spec(nthreads: int = 1) -> dict[str, Any]:
    return {
        "cls": Nanny,
        "options": {"nthreads": nthreads, "host": LOCALHOST, "dashboard": False},
    }


def inc(x: int) -> int:
    return x + 1


def total(*values: int) -> int:
    return sum(values)


def test_spec_cluster_with_nanny_workers_computes_a_graph(
    scheduler_class: type, wait_until: Callable[..., None]
) -> None:
    with SpecCluster(
        scheduler={
            "cls": scheduler_class,
            "options": {"host": LOCALHOST, "dashboard_address": DASHBOARD},
        },
        workers={i: nanny_spec() for i in range(2)},
        worker=nanny_spec(),
    ) as cluster:
        assert cluster.scheduler.status == Status.running
        assert cluster.scheduler_address.startswith(f"tcp://{LOCALHOST}:")
        with Client(cluster) as client:
            client.wait_for_workers(2, timeout=WAIT_S)
            # A small tree: 20 incs, reduced in pairs, then summed.
            graph: dict[Any, Any] = {("inc", i): (inc, i) for i in range(20)}
            graph.update(
                {("pair", i): (total, ("inc", 2 * i), ("inc", 2 * i + 1)) for i in range(10)}
            )
            graph["total"] = (total, *(("pair", i) for i in range(10)))
            assert client.get(graph, "total") == sum(range(1, 21))
            # Both workers took part.
            assert len(client.run(lambda: 1)) == 2
            assert set(cluster.workers) == {0, 1}
            cluster.scale(1)
            wait_until(
                lambda: len(client.scheduler_info()["workers"]) == 1,
                WAIT_S,
                lambda: f"workers: {list(client.scheduler_info()['workers'])}",
            )
            assert client.submit(inc, 41).result(timeout=WAIT_S) == 42
    assert cluster.scheduler.status == Status.closed


def test_local_cluster_scales_up_and_down(
    local_cluster_class: type, wait_until: Callable[..., None]
) -> None:
    with (
        local_cluster_class(
            n_workers=1, threads_per_worker=1, dashboard_address=DASHBOARD
        ) as cluster,
        Client(cluster) as client,
    ):
        client.wait_for_workers(1, timeout=WAIT_S)
        assert cluster.scheduler_address.startswith(f"tcp://{LOCALHOST}:")
        cluster.scale(3)
        client.wait_for_workers(3, timeout=WAIT_S)
        futures = client.map(inc, range(30))
        assert sum(client.gather(futures)) == sum(range(1, 31))
        del futures
        cluster.scale(1)
        wait_until(
            lambda: len(client.scheduler_info()["workers"]) == 1 and len(cluster.workers) == 1,
            WAIT_S,
            lambda: (
                f"scheduler: {list(client.scheduler_info()['workers'])}; "
                f"cluster: {list(cluster.workers)}"
            ),
        )
        assert client.submit(inc, 1).result(timeout=WAIT_S) == 2
        # Cluster.get_logs: the scheduler's get_logs and worker_logs RPCs.
        logs = cluster.get_logs()
        assert {"Cluster", "Scheduler"} <= set(logs) and len(logs) == 3
        assert all(isinstance(text, str) for text in logs.values())
        # What the cluster manager reads of the scheduler.
        info = cluster.scheduler_info
        assert info["type"] == "Scheduler" and "dashboard" in info["services"]
        assert str(info["services"]["dashboard"]) in cluster.dashboard_link


def wait_for_go(i: int) -> int:
    Event("go").wait()
    return i


def test_adapt_from_zero_to_two_workers_under_load_and_back_to_zero(
    local_cluster_class: type, wait_until: Callable[..., None]
) -> None:
    with (
        dask.config.set({"distributed.adaptive.target-duration": "1s"}),
        local_cluster_class(
            n_workers=0, threads_per_worker=1, dashboard_address=DASHBOARD
        ) as cluster,
        Client(cluster) as client,
    ):
        cluster.adapt(minimum=0, maximum=2, interval="100ms", wait_count=3)
        assert len(client.scheduler_info()["workers"]) == 0
        # Tasks that hold their thread until the test says go: the load lasts exactly
        # until both workers are there.
        go = Event("go")
        futures = client.map(wait_for_go, range(8))
        wait_until(
            lambda: len(client.scheduler_info()["workers"]) == 2,
            WAIT_S,
            lambda: f"workers: {list(client.scheduler_info()['workers'])}",
        )
        go.set()
        assert client.gather(futures) == list(range(8))
        del futures
        wait_until(
            lambda: len(client.scheduler_info()["workers"]) == 0 and not cluster.workers,
            WAIT_S,
            lambda: (
                f"scheduler: {list(client.scheduler_info()['workers'])}; "
                f"cluster: {list(cluster.workers)}"
            ),
        )


def test_local_cluster_with_threads_in_this_process(local_cluster_class: type) -> None:
    """processes=False: the workers are threads of this process (distributed.Worker)."""
    with (
        local_cluster_class(
            n_workers=1, threads_per_worker=2, processes=False, dashboard_address=DASHBOARD
        ) as cluster,
        Client(cluster) as client,
    ):
        here = os.getpid()
        assert client.submit(os.getpid).result(timeout=WAIT_S) == here
        assert client.submit(inc, 1).result(timeout=WAIT_S) == 2


def test_local_cluster_with_tls(local_cluster_class: type) -> None:
    """security=True: temporary credentials (in memory), tls:// everywhere."""
    with (
        local_cluster_class(
            n_workers=1, threads_per_worker=1, security=True, dashboard_address=DASHBOARD
        ) as cluster,
        Client(cluster) as client,
    ):
        assert cluster.scheduler_address.startswith(f"tls://{LOCALHOST}:")
        assert client.submit(inc, 1).result(timeout=WAIT_S) == 2


# ---------------------------------------------------------------------- dsched only
@pytest.mark.usefixtures("dsched_only")
def test_process_interface_contract() -> None:
    """Awaitable, async context manager, Status values, address; close stops the process."""

    async def run() -> None:
        # What dask-jobqueue passes (and a user's scheduler_options).
        options = {
            "protocol": "tcp://",
            "dashboard_address": DASHBOARD,
            "security": None,
            "interface": None,
            "host": LOCALHOST,
        }
        scheduler = dsched.deploy.Scheduler(**options)
        assert scheduler.status == Status.created
        async with scheduler as started:
            assert started is scheduler
            assert scheduler.status == Status.running
            assert scheduler.address.startswith(f"tcp://{LOCALHOST}:")
            assert scheduler.external_address is None
            assert await scheduler is scheduler  # awaiting again starts nothing
            process = scheduler.process
            assert process is not None and process.returncode is None
            async with Client(scheduler.address, asynchronous=True) as client:
                info = await client.scheduler.identity()
                assert info["address"] == scheduler.address
        assert scheduler.status == Status.closed
        assert process.returncode is not None
        await asyncio.wait_for(scheduler.finished(), WAIT_S)

    asyncio.run(run())


@pytest.mark.usefixtures("dsched_only")
def test_a_scheduler_that_exits_by_itself_is_closed() -> None:
    async def run() -> None:
        async with dsched.deploy.Scheduler(
            host=LOCALHOST, dashboard_address=DASHBOARD
        ) as scheduler:
            async with Client(scheduler.address, asynchronous=True) as client:
                await client.scheduler.terminate()
            await asyncio.wait_for(scheduler.finished(), WAIT_S)
            assert scheduler.status == Status.closed

    asyncio.run(run())


@pytest.mark.usefixtures("dsched_only")
def test_a_scheduler_that_cannot_start_says_why() -> None:
    async def run() -> None:
        scheduler = dsched.deploy.Scheduler(
            host=LOCALHOST, dashboard_address=DASHBOARD, preload="no_such_preload_xyz"
        )
        with pytest.raises(RuntimeError, match="exited with status 1") as raised:
            await scheduler
        assert "No module named 'no_such_preload_xyz'" in str(raised.value)

    asyncio.run(run())


@pytest.mark.usefixtures("dsched_only")
@pytest.mark.parametrize(
    ("options", "error", "message"),
    [
        ({"no_such_option": 1}, TypeError, "no_such_option"),
        ({"plugins": [object()]}, ValueError, "preload"),
        ({"protocol": "ucx://"}, ValueError, "tcp:// and tls://"),
        ({"jupyter": True}, ValueError, "Jupyter"),
        ({"blocked_handlers": ["gather"]}, ValueError, "blocked handlers"),
    ],
)
def test_unsupported_options_are_refused_clearly(
    options: dict[str, Any], error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match=message):
        dsched.deploy.Scheduler(**options)


@pytest.mark.usefixtures("dsched_only")
def test_local_cluster_refuses_inproc() -> None:
    with pytest.raises(ValueError, match="inproc:// cannot reach"):
        dsched.LocalCluster(n_workers=0, protocol="inproc://", dashboard_address=DASHBOARD)


@pytest.mark.usefixtures("dsched_only")
def test_dask_config_reaches_the_scheduler_process() -> None:
    with (
        dask.config.set({"distributed.scheduler.allowed-failures": 7}),
        dsched.LocalCluster(n_workers=0, dashboard_address=DASHBOARD) as cluster,
        Client(cluster) as client,
    ):
        seen = client.run_on_scheduler(
            lambda: dask.config.get("distributed.scheduler.allowed-failures")
        )
        assert seen == 7


# ---------------------------------------------------------------------- the RPCs themselves
def hold(event_name: str) -> str:
    Event(event_name).wait()
    return event_name


def test_adaptive_rpcs(client: Client, wait_until: Callable[..., None]) -> None:
    """What Adaptive and the Kubernetes operator ask, on the session's two idle workers."""

    def ask(op: str, **kwargs: Any) -> Any:
        reply = client.sync(getattr(client.scheduler, op), **kwargs)
        return list(reply) if isinstance(reply, tuple | list) else reply

    workers = list(client.scheduler_info()["workers"])
    names = {str(ws["name"]) for ws in client.scheduler_info()["workers"].values()}
    assert ask("adaptive_target") == 0
    assert ask("adaptive_target", target_duration="1s") == 0
    # Idle and empty: every worker may go (memory_ratio=2 of nothing stored).
    assert sorted(ask("workers_to_close")) == sorted(workers)
    chosen = ask("workers_to_close", target=1, attribute="name")
    assert len(chosen) == 1 and {str(c) for c in chosen} <= names
    assert ask("workers_to_close", n=0) == []
    # Dask's check_idle answers None at the first look after any activity (earlier tests'
    # too), then the time since which the scheduler is idle.
    wait_until(
        lambda: isinstance(ask("check_idle"), float), 10, lambda: "check_idle stays None"
    )

    # Busy: one task holding a thread.
    go = Event("adaptive-rpcs-go")
    future = client.submit(hold, "adaptive-rpcs-go", pure=False)

    def busy_workers() -> list[str]:
        return [address for address, keys in client.processing().items() if keys]

    wait_until(lambda: len(busy_workers()) == 1, WAIT_S, lambda: str(client.processing()))
    (busy,) = busy_workers()
    idle = [address for address in workers if address != busy]
    assert ask("check_idle") is None
    assert ask("adaptive_target") == 1
    # The busy worker is the last to go; without n, it never goes.
    assert ask("workers_to_close", n=1) == idle
    assert ask("workers_to_close", n=2) == [*idle, busy]
    assert ask("workers_to_close") == idle
    go.set()
    assert future.result(timeout=WAIT_S) == "adaptive-rpcs-go"
    del future


@pytest.mark.usefixtures("dsched_only")
def test_preload_options_reach_the_scheduler_process(tmp_path: Any) -> None:
    (tmp_path / "greeting_preload.py").write_text(
        "import click\n\n"
        "@click.command()\n"
        "@click.option('--greeting')\n"
        "def dask_setup(scheduler, greeting):\n"
        "    scheduler.handlers['greet'] = lambda: greeting\n"
    )

    async def run() -> None:
        async with dsched.deploy.Scheduler(
            host=LOCALHOST,
            dashboard_address=DASHBOARD,
            preload=str(tmp_path / "greeting_preload.py"),
            preload_argv=["--greeting", "--host"],  # an argv that looks like a flag
        ) as scheduler:
            client = await Client(scheduler.address, asynchronous=True)
            try:
                assert await client.scheduler.greet() == "--host"
            finally:
                await client.close()

    asyncio.run(run())
