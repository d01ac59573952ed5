"""A live dsched scheduler under hostile input, with a real worker and a real Client that
keep computing (and checking their answers) the whole time.

The scheduler runs with ``--validate`` (every state step checks every invariant; a broken
one makes the step fail loudly), a small handshake timeout and a small message-size cap.
``--fuzz-long`` multiplies the hypothesis examples for a longer hunt.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from typing import Any

import pytest
from distributed import Client
from hypothesis import HealthCheck, settings
from rawpeer import HANDSHAKE_TIMEOUT_S, MAX_MESSAGE_BYTES

from dsched.testing.cluster import ProcessCluster
from dsched.testing.faults import dsched_info

if os.environ.get("DSCHED_TEST_SCHEDULER", "dsched") != "dsched":
    collect_ignore_glob = ["test_*.py"]  # these tests speak to dsched's own RPCs


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--fuzz-long",
        action="store_true",
        default=False,
        help="run the wire fuzz tests with many more hypothesis examples",
    )


def pytest_configure(config: pytest.Config) -> None:
    common: dict[str, Any] = {
        "deadline": None,  # each example does network round trips; bounded by timeouts
        "suppress_health_check": [HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
        "derandomize": True,  # deterministic in CI: the same examples every run
    }
    settings.register_profile("dsched-fuzz-ci", max_examples=25, **common)
    settings.register_profile("dsched-fuzz-long", max_examples=1000, **common)


@pytest.fixture(scope="session")
def fuzz_settings(request: pytest.FixtureRequest) -> settings:
    long = request.config.getoption("--fuzz-long")
    return settings.get_profile("dsched-fuzz-long" if long else "dsched-fuzz-ci")


class Canary:
    """A real Client computing small graphs in a loop; every answer is checked."""

    def __init__(self, address: str) -> None:
        self.client = Client(address, set_as_default=False, timeout=30)
        self.rounds = 0
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="canary", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        from dsched.testing.workloads import make_tree

        seed = 0
        while not self._stop.is_set():
            seed += 1
            job = make_tree(seed, n=16)
            try:
                job.check(self.client.compute(job.collection).result(timeout=60))
                self.rounds += 1
            except Exception as exc:
                self.errors.append(f"round {seed}: {exc!r}")
                if self._stop.wait(0.5):
                    return

    def wait_for_rounds(self, more: int, timeout: float = 60) -> None:
        from dsched.testing.faults import wait_until

        target = self.rounds + more
        wait_until(
            lambda: self.rounds >= target or bool(self.errors),
            timeout,
            lambda: f"the canary client made no progress ({self.rounds} rounds)",
        )
        assert not self.errors, self.errors

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(70)
        self.client.close()


@pytest.fixture(scope="session")
def fuzz_cluster() -> Iterator[ProcessCluster]:
    with ProcessCluster(
        scheduler_kind="dsched",
        n_workers=1,
        nanny=False,
        scheduler_args=["--validate", "--max-message-size", str(MAX_MESSAGE_BYTES)],
        scheduler_env={"DASK_DISTRIBUTED__COMM__TIMEOUTS__CONNECT": f"{HANDSHAKE_TIMEOUT_S}s"},
    ) as cluster:
        yield cluster


@pytest.fixture(scope="session")
def canary(fuzz_cluster: ProcessCluster) -> Iterator[Canary]:
    assert fuzz_cluster.address is not None
    canary = Canary(fuzz_cluster.address)
    try:
        yield canary
    finally:
        canary.stop()


@pytest.fixture
def scheduler(fuzz_cluster: ProcessCluster, canary: Canary) -> Iterator[str]:
    """The fuzz target's address; afterwards the scheduler must be valid, alive and serving
    the canary with correct answers."""
    assert fuzz_cluster.address is not None
    yield fuzz_cluster.address
    assert fuzz_cluster.scheduler is not None and fuzz_cluster.scheduler.is_running(), (
        fuzz_cluster.describe_processes()
    )
    info = dsched_info(canary.client)
    assert info["valid"], info
    canary.wait_for_rounds(2)


@pytest.fixture
def scheduler_log(fuzz_cluster: ProcessCluster) -> Any:
    """Read the scheduler's log so far (to check that a rejection was logged)."""
    assert fuzz_cluster.scheduler is not None
    path = fuzz_cluster.scheduler.log_path
    return lambda: path.read_text(errors="replace")
