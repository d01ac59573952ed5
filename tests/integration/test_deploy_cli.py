"""The scheduler command line as cluster managers and operators drive it: the flags of
`dask scheduler --help` (2026.8.0) that dsched refuses say so and exit non-zero, the
deprecated no-op ones are accepted, and ``distributed.scheduler.*`` configuration is
honoured (``idle-timeout``) or refused when dsched does not implement it (README, "dsched
scheduler flags"; docs/config.md).
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from dsched.testing.cluster import ProcessCluster, scheduler_command

pytestmark = pytest.mark.timeout(120)

EXIT_TIMEOUT_S = 60


def run(kind: str, tmp_path: Path, *args: str, env: dict[str, str] | None = None) -> str:
    """Run a scheduler expected to exit by itself; its status must be non-zero. Returns
    its output."""
    done = subprocess.run(
        scheduler_command(kind, tmp_path / "scheduler.json", args),
        capture_output=True,
        text=True,
        timeout=EXIT_TIMEOUT_S,
        env={**os.environ, **(env or {})},
        check=False,
    )
    assert done.returncode != 0, done.stderr[-2000:]
    return done.stderr


@pytest.fixture
def dsched_only(scheduler_kind: str) -> None:
    if scheduler_kind != "dsched":
        pytest.skip("dsched's refusals (dask scheduler implements these)")


@pytest.mark.usefixtures("dsched_only")
@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--jupyter"], "--jupyter is not supported"),
        (["--protocol", "ucx"], "protocol 'ucx' is not supported"),
        (["--port", "8786,8787"], "invalid int value"),
        (["--interface", "lo,eth0"], "one interface only"),
    ],
)
def test_refused_flags_say_so(tmp_path: Path, args: list[str], message: str) -> None:
    assert message in run("dsched", tmp_path, *args)


@pytest.mark.usefixtures("dsched_only")
@pytest.mark.parametrize(
    "key", ["BLOCKED_HANDLERS", "CONTACT_ADDRESS", "NO_WORKERS_TIMEOUT"], ids=str.lower
)
def test_unsupported_config_is_refused(tmp_path: Path, key: str) -> None:
    value = {"BLOCKED_HANDLERS": '["gather"]', "CONTACT_ADDRESS": "tcp://10.0.0.1:8786"}.get(
        key, "10s"
    )
    output = run("dsched", tmp_path, env={f"DASK_DISTRIBUTED__SCHEDULER__{key}": value})
    assert f"distributed.scheduler.{key.lower().replace('_', '-')}" in output
    assert "is not supported" in output


def test_deprecated_flags_are_accepted(scheduler_kind: str) -> None:
    kind = "dsched" if scheduler_kind == "dsched" else scheduler_kind
    with ProcessCluster(
        scheduler_kind=kind, n_workers=1, scheduler_args=["--no-show", "--use-xheaders", "False"]
    ) as cluster:
        assert cluster.scheduler is not None and cluster.scheduler.is_running()


def test_idle_timeout_from_the_configuration(scheduler_kind: str, tmp_path: Path) -> None:
    kind = "dsched" if scheduler_kind == "dsched" else scheduler_kind
    done = subprocess.run(
        scheduler_command(kind, tmp_path / "scheduler.json"),
        capture_output=True,
        text=True,
        timeout=EXIT_TIMEOUT_S,
        env={**os.environ, "DASK_DISTRIBUTED__SCHEDULER__IDLE_TIMEOUT": "1s"},
        check=False,
    )
    # Both shut down by themselves when idle (and exit 0: it is a normal close).
    assert done.returncode == 0, done.stderr[-2000:]
    assert "idle" in done.stderr.lower()
