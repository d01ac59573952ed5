"""``--preload`` on a real scheduler process (dsched, or `dask scheduler` with
DSCHED_TEST_SCHEDULER=dask): a preload that registers an RPC handler and a scheduler
plugin and takes its own options; ``distributed.scheduler.preload`` from the
configuration; ``dask_teardown`` on close; bad preloads, which behave as in Dask 2026.8.0:
a module that is missing or raises on import stops the scheduler (non-zero status, the
error in its output), a ``dask_setup`` calling ``sys.exit(n)`` ends it with status n, and
a ``dask_setup`` that raises is logged ("Failed to start preload") while the scheduler
goes on serving.

The preload modules are written into the test's temporary directory, which the
scheduler process gets on its PYTHONPATH.
"""

from __future__ import annotations

import json
import subprocess
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from distributed import Client

from dsched.testing.cluster import (
    ProcessCluster,
    read_scheduler_address,
    scheduler_command,
    scheduler_environment_overrides,
)

pytestmark = pytest.mark.timeout(120)

CONNECT_TIMEOUT_S = 30
EXIT_TIMEOUT_S = 60

# A preload with the parts of Dask's interface that third-party preloads use: a
# click-configurable dask_setup (its options come from the scheduler's extra arguments),
# scheduler.handlers, scheduler.add_plugin, scheduler.address, scheduler.loop, workers,
# and dask_teardown.
HANDLER_AND_PLUGIN_PRELOAD = """
import json

import click
from distributed.diagnostics.plugin import SchedulerPlugin


class SeenWorkers(SchedulerPlugin):
    name = "preload-seen-workers"

    def __init__(self):
        self.added = []

    def add_worker(self, scheduler, worker):
        self.added.append(worker)


@click.command()
@click.option("--greeting", default="hello")
@click.option("--teardown-file", default="")
def dask_setup(scheduler, greeting, teardown_file):
    plugin = SeenWorkers()
    scheduler.add_plugin(plugin)
    setup_loop = scheduler.loop

    def preload_echo(value):
        return {
            "greeting": greeting,
            "value": value,
            "address": scheduler.address,
            "workers": sorted(scheduler.workers),
            "seen": list(plugin.added),
            "same_loop": scheduler.loop is setup_loop,
        }

    scheduler.handlers["preload_echo"] = preload_echo
    scheduler.preload_teardown_file = teardown_file


def dask_teardown(scheduler):
    if scheduler.preload_teardown_file:
        with open(scheduler.preload_teardown_file, "w") as f:
            json.dump({"address": scheduler.address}, f)
"""


@pytest.fixture
def preload_dir(tmp_path: Path) -> Path:
    (tmp_path / "handler_plugin_preload.py").write_text(HANDLER_AND_PLUGIN_PRELOAD)
    return tmp_path


def dsched_or_dask(scheduler_kind: str) -> str:
    return "dsched" if scheduler_kind == "dsched" else scheduler_kind


@pytest.fixture
def started_cluster(
    scheduler_kind: str, preload_dir: Path, request: pytest.FixtureRequest
) -> Iterator[ProcessCluster]:
    args, env = request.param(preload_dir)
    with ProcessCluster(
        scheduler_kind=dsched_or_dask(scheduler_kind),
        n_workers=1,
        scheduler_args=args,
        scheduler_env=env,
        extra_pythonpath=[preload_dir],
    ) as cluster:
        yield cluster


def from_command_line(preload_dir: Path) -> tuple[list[str], dict[str, str]]:
    teardown = preload_dir / "teardown.json"
    return (
        [
            "--preload",
            "handler_plugin_preload",
            "--greeting",
            "hi",
            "--teardown-file",
            str(teardown),
        ],
        {},
    )


def from_configuration(preload_dir: Path) -> tuple[list[str], dict[str, str]]:
    teardown = preload_dir / "teardown.json"
    return [], {
        "DASK_DISTRIBUTED__SCHEDULER__PRELOAD": json.dumps(["handler_plugin_preload"]),
        "DASK_DISTRIBUTED__SCHEDULER__PRELOAD_ARGV": json.dumps(
            ["--greeting", "hi", "--teardown-file", str(teardown)]
        ),
    }


@pytest.mark.parametrize(
    "started_cluster", [from_command_line, from_configuration], indirect=True, ids=["cli", "config"]
)
def test_preload_registers_a_handler_and_a_plugin(
    started_cluster: ProcessCluster, preload_dir: Path
) -> None:
    assert started_cluster.address is not None
    with Client(started_cluster.address, timeout=CONNECT_TIMEOUT_S) as client:
        reply = client.sync(client.scheduler.preload_echo, value=42)
        workers = sorted(client.scheduler_info()["workers"])
        plugins = client.run_on_scheduler(lambda dask_scheduler: sorted(dask_scheduler.plugins))
    assert reply["greeting"] == "hi" and reply["value"] == 42
    assert reply["address"] == started_cluster.address
    assert reply["same_loop"] is True
    # The plugin was registered before the worker came and saw it arrive.
    assert list(reply["workers"]) == workers and list(reply["seen"]) == workers
    assert "preload-seen-workers" in plugins
    started_cluster.close()
    teardown = json.loads((preload_dir / "teardown.json").read_text())
    assert teardown == {"address": reply["address"]}


# ---------------------------------------------------------------------- bad preloads
def run_scheduler(
    scheduler_kind: str, tmp_path: Path, *args: str
) -> subprocess.CompletedProcess[str]:
    """Run a scheduler that is expected to exit by itself; its output and status."""
    kind = dsched_or_dask(scheduler_kind)
    env = {**scheduler_environment_overrides(kind), "PYTHONPATH": str(tmp_path)}
    return subprocess.run(
        scheduler_command(kind, tmp_path / "scheduler.json", args),
        capture_output=True,
        text=True,
        timeout=EXIT_TIMEOUT_S,
        env={**_base_environment(), **env},
        check=False,
    )


def _base_environment() -> dict[str, str]:
    import os

    return {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}


def test_missing_preload_module_stops_the_scheduler(scheduler_kind: str, tmp_path: Path) -> None:
    done = run_scheduler(scheduler_kind, tmp_path, "--preload", "no_such_preload_module_xyz")
    assert done.returncode != 0
    assert "No module named 'no_such_preload_module_xyz'" in done.stderr
    assert read_scheduler_address(tmp_path / "scheduler.json") is None


def test_preload_raising_on_import_stops_the_scheduler(scheduler_kind: str, tmp_path: Path) -> None:
    (tmp_path / "broken_preload.py").write_text("raise RuntimeError('broken preload xyz')\n")
    done = run_scheduler(scheduler_kind, tmp_path, "--preload", "broken_preload")
    assert done.returncode != 0
    assert "broken preload xyz" in done.stderr
    assert read_scheduler_address(tmp_path / "scheduler.json") is None


def test_preload_dask_setup_exiting_ends_the_scheduler_with_its_status(
    scheduler_kind: str, tmp_path: Path
) -> None:
    # dask-gateway's preload does this when its environment is missing.
    (tmp_path / "exiting_preload.py").write_text(
        textwrap.dedent(
            """
            import sys

            def dask_setup(scheduler):
                print("exiting preload: no gateway here", file=sys.stderr)
                sys.exit(3)
            """
        )
    )
    done = run_scheduler(scheduler_kind, tmp_path, "--preload", "exiting_preload")
    assert done.returncode == 3, done.stderr[-2000:]
    assert "exiting preload: no gateway here" in done.stderr


def test_preload_arguments_without_a_preload_are_refused(
    scheduler_kind: str, tmp_path: Path
) -> None:
    done = run_scheduler(scheduler_kind, tmp_path, "--greeting", "hi")
    assert done.returncode == 2
    assert "No such option" in done.stderr and "--greeting" in done.stderr


def test_raising_dask_setup_is_logged_and_the_scheduler_serves(
    scheduler_kind: str, tmp_path: Path, wait_until: Callable[..., None]
) -> None:
    (tmp_path / "raising_preload.py").write_text(
        "def dask_setup(scheduler):\n    raise RuntimeError('dask_setup failed xyz')\n"
    )
    kind = dsched_or_dask(scheduler_kind)
    scheduler_file = tmp_path / "scheduler.json"
    log_path = tmp_path / "scheduler.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            scheduler_command(kind, scheduler_file, ["--preload", "raising_preload"]),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env={
                **_base_environment(),
                **scheduler_environment_overrides(kind),
                "PYTHONPATH": str(tmp_path),
            },
            start_new_session=True,
        )
    try:

        def logged() -> bool:
            assert process.poll() is None, log_path.read_text()
            text = log_path.read_text(errors="replace")
            return "Failed to start preload" in text and "dask_setup failed xyz" in text

        wait_until(logged, EXIT_TIMEOUT_S, lambda: log_path.read_text(errors="replace"))
        address = read_scheduler_address(scheduler_file)
        assert address is not None
        with Client(address, timeout=CONNECT_TIMEOUT_S) as client:
            assert client.scheduler_info()["address"] == address
        assert process.poll() is None
    finally:
        process.terminate()  # by its PID: the process this test started
        try:
            process.wait(EXIT_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(EXIT_TIMEOUT_S)


def test_python_file_and_code_preloads(
    scheduler_kind: str, tmp_path: Path, wait_until: Callable[..., None]
) -> None:
    """The three forms of a preload: module name (above), a .py path, the code itself."""
    marker = tmp_path / "marker.txt"
    path_preload = tmp_path / "path_preload.py"
    path_preload.write_text(
        f"def dask_setup(scheduler):\n    open({str(marker)!r}, 'a').write('file ')\n"
    )
    code = f"def dask_setup(scheduler):\n    open({str(marker)!r}, 'a').write('code ')\n"
    with ProcessCluster(
        scheduler_kind=dsched_or_dask(scheduler_kind),
        n_workers=1,
        scheduler_args=["--preload", str(path_preload), "--preload", code],
    ) as cluster:

        def both_ran() -> bool:
            return marker.exists() and marker.read_text() == "file code "

        wait_until(both_ran, CONNECT_TIMEOUT_S, cluster.describe_processes)
