"""The dashboard opened in headless Chromium after a computation on a real cluster: the
task stream has bars for the tasks that ran on both workers, progress shows the prefixes,
memory bars show both workers, the exceptions view the error; the individual pages draw
their one view. The DOM is read after the page's scripts ran (``--dump-dom`` with a
virtual time budget): every view writes what it drew into ``data-*`` attributes.

Needs the Debian package ``chromium`` (``./run test`` installs it where apt-get works);
skipped, saying so, without it.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from html.parser import HTMLParser
from pathlib import Path

import pytest
from distributed import Client

from dsched.testing.browser import chromium_command
from dsched.testing.cluster import DASK_SCHEDULER_KINDS, ProcessCluster

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = [
    pytest.mark.integration,
    pytest.mark.timeout(240),
    pytest.mark.skipif(
        os.environ.get("DSCHED_TEST_SCHEDULER", "dsched") in DASK_SCHEDULER_KINDS,
        reason="dsched's dashboard pages (Dask's are Bokeh's)",
    ),
    pytest.mark.skipif(
        CHROMIUM is None,
        reason="headless browser test: chromium is not installed "
        "(apt-get install -y chromium; ./run test installs it where apt-get is available)",
    ),
]

ATTEMPT_TIMEOUT_S = 60
DEADLINE_S = 150


def dump_dom(url: str, budget_ms: int = 6000) -> str:
    """The DOM of ``url`` after ``budget_ms`` of the page's (virtual) time; the browser and
    its helper processes are killed (by process group) if it hangs."""
    assert CHROMIUM is not None
    with tempfile.TemporaryDirectory(prefix="dsched-chromium-") as profile:
        command = chromium_command(
            CHROMIUM, profile, f"--virtual-time-budget={budget_ms}", "--dump-dom", url
        )
        process = subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, start_new_session=True
        )
        try:
            out, _ = process.communicate(timeout=ATTEMPT_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.communicate()
            return ""
        return out.decode()


class Elements(HTMLParser):
    """Every element's tag and attributes, in document order."""

    def __init__(self, html: str) -> None:
        super().__init__()
        self.elements: list[tuple[str, dict[str, str]]] = []
        self.feed(html)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.elements.append((tag, {name: value or "" for name, value in attrs}))

    def view(self, name: str) -> dict[str, str]:
        for tag, attrs in self.elements:
            if tag == "section" and attrs.get("data-view") == name:
                return attrs
        return {}

    def all(self, css_class: str) -> list[dict[str, str]]:
        return [a for _, a in self.elements if css_class in a.get("class", "").split()]


def wait_for_dom(url: str, check: Callable[[Elements], list[str]]) -> Elements:
    """Open ``url`` until ``check`` finds nothing missing; fail with what was missing."""
    deadline = time.monotonic() + DEADLINE_S
    missing = ["(not opened yet)"]
    while time.monotonic() < deadline:
        page = Elements(dump_dom(url))
        missing = check(page)
        if not missing:
            return page
    pytest.fail(f"{url}: the page never showed {missing}")


def inc(x: int) -> int:
    return x + 1


def total(*values: int) -> int:
    return sum(values)


def fail(x: int) -> float:
    return x / 0


@pytest.fixture(scope="module")
def computed() -> Iterator[tuple[str, list[str]]]:
    """A cluster that ran 30 incs, a sum and one error, with the results held:
    (dashboard base URL, worker addresses)."""
    args = ("--dashboard-address", "127.0.0.1:0", "--dashboard")
    with (
        ProcessCluster(
            scheduler_kind="dsched",
            n_workers=2,
            scheduler_args=args,
            extra_pythonpath=[Path(__file__).parent],
        ) as cluster,
        Client(cluster.address, timeout=30) as client,
    ):
        url = f"http://127.0.0.1:{client.scheduler_info()['services']['dashboard']}"
        # A page was open before the computation (the task stream starts on first use).
        with urllib.request.urlopen(url + "/dashboard/task-stream.json", timeout=10) as reply:
            assert reply.status == 200
        workers = sorted(client.scheduler_info()["workers"])
        # Half the tasks on each worker, so both have bars and memory to show.
        incs = [
            client.submit(inc, i, key=f"browserinc-{i}", workers=[workers[i % 2]])
            for i in range(30)
        ]
        summed = client.submit(total, *incs, key="browsersum-0")
        failed = client.submit(fail, 1, key="browserfail-0")
        assert summed.result() == sum(range(1, 31))
        with pytest.raises(ZeroDivisionError):
            failed.result()
        yield url, workers
        del incs, summed, failed


def test_status_page_draws_every_view(computed: tuple[str, list[str]]) -> None:
    url, workers = computed

    def check(page: Elements) -> list[str]:
        missing = []
        stream = page.view("task-stream")
        if int(stream.get("data-tasks") or 0) < 32:
            missing.append(f"bars for the 32 tasks (data-tasks={stream.get('data-tasks')})")
        if not {"browserinc", "browsersum"} <= set(stream.get("data-prefixes", "").split(",")):
            missing.append(f"task stream prefixes ({stream.get('data-prefixes')})")
        if set(stream.get("data-workers", "").split(",")) != set(workers):
            missing.append(f"task stream rows of both workers ({stream.get('data-workers')})")
        prefixes = {row.get("data-prefix"): row for row in page.all("prefix")}
        if prefixes.get("browserinc", {}).get("data-memory") != "30":
            missing.append(f"progress of browserinc: 30 in memory ({prefixes.get('browserinc')})")
        if prefixes.get("browserfail", {}).get("data-erred") != "1":
            missing.append("progress of browserfail: 1 erred")
        memory = {row.get("data-worker") for row in page.all("worker-memory")}
        if memory != set(workers):
            missing.append(f"memory bars of both workers ({memory})")
        if not any(a.get("data-key") == "browserfail-0" for a in page.all("exception")):
            missing.append("the exception of browserfail-0")
        if page.view("workers").get("data-workers") != "2":
            missing.append("the workers table")
        if int(page.view("scheduler-system").get("data-samples") or 0) < 1:
            missing.append("a scheduler CPU sample")
        return missing

    page = wait_for_dom(url + "/status", check)
    body = next(attrs for tag, attrs in page.elements if tag == "body")
    assert body.get("data-connection") == "ok" and int(body["data-snapshots"]) >= 1


@pytest.mark.parametrize(
    ("route", "check"),
    [
        ("individual-task-stream", lambda v: int(v.get("data-bars") or 0) >= 32),
        ("individual-workers-memory", lambda v: v.get("data-workers") == "2"),
        ("individual-progress", lambda v: "browserinc" in v.get("data-prefixes", "")),
    ],
)
def test_individual_pages_draw_their_view(
    computed: tuple[str, list[str]], route: str, check: Callable[[dict[str, str]], bool]
) -> None:
    """dask-labextension's default layout: each page draws the view its URL names."""
    url = computed[0]
    name = route.removeprefix("individual-")

    def drawn(page: Elements) -> list[str]:
        view = page.view(name)
        return [] if view.get("id") == "individual" and check(view) else [f"{name}: {view}"]

    wait_for_dom(f"{url}/{route}", drawn)


def test_many_workers_become_histograms_and_grouped_rows() -> None:
    """Past 100 workers the per-worker views are histograms and the task stream groups
    its rows, so the page stays readable (here 150 simulated workers)."""
    n_workers = 150
    args = ("--dashboard-address", "127.0.0.1:0", "--dashboard")
    with (
        ProcessCluster(
            scheduler_kind="dsched",
            n_workers=n_workers,
            worker_kind="zero",
            scheduler_args=args,
            extra_pythonpath=[Path(__file__).parent],
        ) as cluster,
        Client(cluster.address, timeout=30) as client,
    ):
        url = f"http://127.0.0.1:{client.scheduler_info()['services']['dashboard']}"
        with urllib.request.urlopen(url + "/dashboard/task-stream.json", timeout=10) as reply:
            assert reply.status == 200
        futures = client.map(inc, range(3 * n_workers), key=[f"many-{i}" for i in range(450)])
        client.gather(futures)

        def check(page: Elements) -> list[str]:
            missing = []
            for name in ("workers-memory", "nprocessing", "occupancy"):
                view = page.view(name)
                if (view.get("data-mode"), view.get("data-workers")) != ("histogram", "150"):
                    missing.append(f"{name} as a histogram of 150 workers ({view})")
            stream = page.view("task-stream")
            if stream.get("data-row-mode") != "worker-groups":
                missing.append(f"task stream rows grouped ({stream.get('data-row-mode')})")
            if not 0 < int(stream.get("data-rows") or 0) <= 120:
                missing.append(f"at most 120 task stream rows ({stream.get('data-rows')})")
            if len(stream.get("data-workers", "").split(",")) < 100:
                missing.append("bars from most workers")
            return missing

        wait_for_dom(url + "/status", check)
        del futures
