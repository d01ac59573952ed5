"""`dsched simulate --trace`: record a run on a real dsched scheduler with two `dask worker`s,
then replay it on the simulator and compare the makespans."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from dask import delayed
from distributed import Client

from dsched.bench.workloads import merge_values, sleep_times_ten
from dsched.testing.cluster import ProcessCluster
from dsched.tools.trace import read_trace

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

N = 60
SECONDS = 0.02  # long enough for the measured compute to dominate the per-task overheads
SCATTERED = 7


def record(path: Path) -> None:
    with (
        ProcessCluster(
            scheduler_kind="dsched", n_workers=2, scheduler_args=["--trace", str(path)]
        ) as cluster,
        Client(cluster.address, timeout=30, set_as_default=False) as client,
    ):
        scattered = client.scatter(SCATTERED)
        leaves = [delayed(sleep_times_ten)(i, SECONDS) for i in range(N)]
        pairs = [delayed(merge_values)(leaf, scattered) for leaf in leaves]
        total = delayed(merge_values)(*pairs)
        assert client.compute(total).result(timeout=60) == 10 * sum(range(N)) + SCATTERED * N
    # the cluster stopped the scheduler with SIGTERM: the trace is complete


def test_simulate_replays_a_recorded_run(tmp_path: Path) -> None:
    path = tmp_path / "run.trace"
    record(path)
    trace = read_trace(path)
    measured = [
        tt.stop - tt.start
        for tt in trace.tasks.values()
        if tt.start is not None and tt.stop is not None
    ]
    assert len(measured) == 2 * N + 1
    (scattered,) = [tt for tt in trace.tasks.values() if tt.external]
    assert scattered.nbytes and scattered.nbytes > 0 and len(scattered.holders) == 1

    gantt = tmp_path / "g"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "dsched",
            "simulate",
            "--trace",
            str(path),
            "--policy",
            "dask,random",
            "--gantt",
            str(gantt),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    printed = done.stdout
    assert (
        f"{2 * N + 2} tasks ({2 * N + 1} measured, 0 estimated, 1 scattered), 1 wanted" in printed
    )
    assert "recorded on 2 workers x 1 threads" in printed
    assert "simulated on 2 x 1" in printed and "--workers" not in printed

    rows = [line.split("|")[1:-1] for line in printed.splitlines() if "| trace:run.trace |" in line]
    assert [row[1].strip() for row in rows] == ["dask", "random"]
    recorded = {float(row[3]) for row in rows}
    assert len(recorded) == 1
    (recorded_makespan,) = recorded
    for row in rows:
        simulated, ratio = float(row[2]), float(row[4])
        # the simulated cluster does the measured work on 2 single-thread workers...
        assert simulated >= 0.95 * sum(measured) / 2
        # ...and, without scheduler and worker overheads, not slower than the real one (how
        # much faster depends on the machine's load: worker start-up is in the recording)
        assert ratio == pytest.approx(simulated / recorded_makespan, abs=0.01)
        assert ratio < 1.5, printed
    for policy in ("dask", "random"):
        png = tmp_path / f"g-trace_run.trace-{policy}.png"
        assert png.read_bytes()[:4] == b"\x89PNG"
