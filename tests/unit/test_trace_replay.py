"""Replaying a recorded trace on the simulator: the trace's graph records (version 2), the
graph rebuilt from them, every policy on it, and `dsched simulate --trace`."""

from __future__ import annotations

import argparse
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from dsched.policy import POLICIES, PolicyConfig, make_policy
from dsched.sim import cli as sim_cli
from dsched.sim.engine import ClusterSpec, simulate
from dsched.state.outbox import Outbox
from dsched.tools.trace import TraceRecorder, read_trace, summarize
from dsched.tools.trace.replay import RecordedRun, graph_from_trace

A, B, C = "tcp://10.1.0.1:1", "tcp://10.1.0.2:1", "tcp://10.1.0.3:1"


class FakeState:
    """What the recorder reads from the runtime: scattered data and registered workers."""

    def __init__(self) -> None:
        self.tasks: dict[Any, Any] = {}
        self.workers: dict[str, Any] = {}

    def task_by_id(self, task_id: int) -> Any:
        return None


def spec(*deps: Any) -> SimpleNamespace:
    return SimpleNamespace(dependencies=tuple(deps))


def intake(tasks: dict[Any, SimpleNamespace]) -> SimpleNamespace:
    return SimpleNamespace(tasks=tasks, order={key: i for i, key in enumerate(tasks)})


class Run:
    """Drives a TraceRecorder as the reactor does, with times relative to its t0."""

    def __init__(self, path: Path) -> None:
        self.state = FakeState()
        self.recorder = TraceRecorder(path, self.state)
        self.t0 = self.recorder.t0

    def ran(self, key: Any, worker: str, start: float, stop: float, nbytes: int) -> None:
        out = Outbox()
        out.send_worker(worker, {"op": "compute-task", "key": key, "run_id": 1})
        self.recorder.outbox(out, self.t0 + start)
        msg = {
            "key": key,
            "nbytes": nbytes,
            "startstops": (
                {"action": "compute", "start": self.t0 + start, "stop": self.t0 + stop},
            ),
        }
        self.recorder.task_finished(worker, msg, self.t0 + stop + 0.001)

    def notify(self, key: Any, at: float, op: str = "key-in-memory") -> None:
        out = Outbox()
        out.send_client("client-1", {"op": op, "key": key})
        self.recorder.outbox(out, self.t0 + at)


def record(path: Path) -> None:
    """Two workers with 2 threads; scattered data on B; a graph whose ("inc", 1) erred (so it
    and "total" never ran); a second graph that resubmits "total" and adds "extra-0"."""
    run = Run(path)
    rec, t0 = run.recorder, run.t0
    for address, at in ((A, 0.01), (B, 0.02)):
        run.state.workers[address] = SimpleNamespace(nthreads=2)
        rec.worker(address, 2, t0 + at)
    run.state.tasks["data"] = SimpleNamespace(nbytes=5000, who_has=[SimpleNamespace(address=B)])
    graph = {
        "load-0": spec(),
        "load-1": spec(),
        ("inc", 0): spec("load-0", "data"),
        ("inc", 1): spec("load-1", "data"),
        "total": spec(("inc", 0), ("inc", 1)),
    }
    rec.graph("client-1", intake(graph), ["total"], t0 + 0.1, t0 + 0.2)
    run.ran("load-0", A, 0.25, 0.55, 1000)
    run.ran("load-1", B, 0.25, 0.75, 3000)
    run.ran(("inc", 0), A, 0.6, 0.8, 100)
    rec.task_erred(B, {"key": ("inc", 1)}, t0 + 0.9)
    run.notify("total", 0.95, "task-erred")
    rec.graph(
        "client-1",
        intake({"total": spec(("inc", 0), ("inc", 1)), "extra-0": spec("load-0")}),
        ["extra-0"],
        t0 + 1.0,
        t0 + 1.05,
    )
    run.ran("extra-0", A, 1.1, 1.2, 10)
    run.notify("extra-0", 1.6)
    rec.close()


def test_trace_records_the_graph(tmp_path: Path) -> None:
    path = tmp_path / "t.trace"
    record(path)
    text = path.read_text()
    assert text.count("\nD\t") == 6  # "total" is described once, by its first graph
    assert text.count("\nM\t") == 1 and text.count("\nQ\t") == 2

    trace = read_trace(path)
    assert trace.version == 2
    by_key = {tt.key: tt for tt in trace.tasks.values()}
    kid = {tt.key: k for k, tt in trace.tasks.items()}
    inc0 = by_key[repr(("inc", 0))]
    assert inc0.dependencies == (kid["load-0"], kid["data"])
    assert inc0.nbytes == 100 and inc0.described_in == 0
    assert by_key["extra-0"].described_in == 1
    assert by_key["data"].external and by_key["data"].nbytes == 5000
    assert [trace.workers[w] for w in by_key["data"].holders] == [B]
    assert trace.worker_threads == {0: 2, 1: 2}
    assert trace.worker_joined == pytest.approx({0: 0.01, 1: 0.02})
    assert trace.wanted == {0: [kid["total"]], 1: [kid["extra-0"]]}
    # the report still works on the new records
    assert summarize(trace)["phases"]["compute"]["n"] == 4


def test_graph_rebuilt_from_a_trace(tmp_path: Path) -> None:
    path = tmp_path / "t.trace"
    record(path)
    run = graph_from_trace(read_trace(path), name="t", worker_address=ClusterSpec().address)
    graph = run.graph
    tasks = graph.tasks
    assert set(tasks) == {"data", "load-0", "load-1", ("inc", 0), ("inc", 1), "total", "extra-0"}
    assert tasks[("inc", 0)].dependencies == ("load-0", "data")
    assert tasks["total"].dependencies == (("inc", 0), ("inc", 1))
    # measured durations and sizes
    assert tasks["load-0"].duration == pytest.approx(0.3)
    assert tasks["load-1"].duration == pytest.approx(0.5)
    assert tasks[("inc", 0)].duration == pytest.approx(0.2)
    assert (tasks["load-0"].nbytes, tasks["load-1"].nbytes, tasks[("inc", 0)].nbytes) == (
        1000,
        3000,
        100,
    )
    # never ran: the prefix's median, else every measured task's median
    assert tasks[("inc", 1)].duration == pytest.approx(0.2) and tasks[("inc", 1)].nbytes == 100
    assert tasks["total"].duration == pytest.approx(0.25)  # median of .3 .5 .2 .1
    assert tasks["total"].nbytes == 550  # median of 1000 3000 100 10
    # scattered data: a zero-duration root of its size, pinned to its holder (B = index 1)
    assert tasks["data"].duration == 0 and tasks["data"].nbytes == 5000
    assert tasks["data"].annotations == {"workers": (ClusterSpec().address(1),)}
    # what the clients wanted, and priorities: data first, then graph 0 in order, then 1
    assert graph.keys == ["total", "extra-0"]
    ranked = sorted(graph.order, key=graph.order.__getitem__)
    assert ranked == ["data", "load-0", "load-1", ("inc", 0), ("inc", 1), "total", "extra-0"]
    # the cluster and the recorded makespan (first graph taken in -> last notification)
    assert (run.n_workers, run.nthreads, run.join_times) == (2, 2, (0.0, 0.0))
    assert run.makespan == pytest.approx(1.6 - 0.2)
    assert (run.measured, run.estimated, run.external) == (4, 2, 1)
    assert any("2 graphs" in note for note in run.notes)

    # --duration / --nbytes only fill in what was not measured
    filled = graph_from_trace(read_trace(path), duration=0.7, nbytes=9).graph.tasks
    assert filled["total"].duration == 0.7 and filled["total"].nbytes == 9
    assert filled["load-0"].duration == pytest.approx(0.3) and filled["load-0"].nbytes == 1000


def _outcome(run: RecordedRun, name: str, seed: int) -> tuple[Any, ...]:
    cluster = ClusterSpec(n_workers=run.n_workers, nthreads=run.nthreads)
    result = simulate(
        run.graph,
        make_policy(name, PolicyConfig(seed=seed)),
        cluster,
        policy_name=name,
        validate=True,
    )
    return (
        result.makespan,
        result.bytes_transferred,
        result.peak_memory,
        result.placement,
        [(e.worker, e.thread, e.key, e.start, e.stop) for e in result.executions],
    )


@pytest.mark.parametrize("name", sorted(POLICIES))
def test_every_policy_replays_a_trace_deterministically(tmp_path: Path, name: str) -> None:
    path = tmp_path / "t.trace"
    record(path)
    run = graph_from_trace(read_trace(path), worker_address=ClusterSpec().address)
    first = _outcome(run, name, seed=3)
    again = _outcome(
        graph_from_trace(read_trace(path), worker_address=ClusterSpec().address), name, seed=3
    )
    assert first == again
    makespan, _, _, placement, executions = first
    assert len(executions) == len(run.graph)  # everything ran once, the unrun tasks too
    assert placement["data"] == ClusterSpec().address(1)  # the scattered data stayed put
    # critical path: load-1 (0.5) -> inc-1 (0.2) -> total (0.25); extra-0 runs alongside
    assert makespan >= 0.95


def test_late_worker_joins_late_and_shape_can_be_overridden(tmp_path: Path) -> None:
    path = tmp_path / "late.trace"
    run = Run(path)
    rec, t0 = run.recorder, run.t0
    rec.worker(A, 1, t0)
    rec.graph(
        "client-1",
        intake({f"x-{i}": spec() for i in range(4)}),
        [f"x-{i}" for i in range(4)],
        t0 + 0.1,
        t0 + 0.2,
    )
    rec.worker(C, 1, t0 + 0.7)  # joined half a second into the run
    for i, (worker, start) in enumerate(((A, 0.2), (A, 0.6), (C, 0.7), (A, 1.0))):
        run.ran(f"x-{i}", worker, start, start + 0.4, 8)
    for i in range(4):
        run.notify(f"x-{i}", 1.5)
    rec.close()
    replay = graph_from_trace(read_trace(path))
    assert (replay.n_workers, replay.nthreads) == (2, 1)
    assert replay.join_times == pytest.approx((0.0, 0.5))
    cluster = ClusterSpec(n_workers=2, join_times=replay.join_times)
    late = simulate(replay.graph, make_policy("random", PolicyConfig()), cluster)
    assert all(e.start >= 0.5 for e in late.executions if e.worker == 1)

    args = sim_args(trace=[str(path)], policy=["random"], workers=4)
    table = run_cli(args)
    assert "simulated on 4 x 1 (--workers/--threads)" in table


def sim_args(**overrides: Any) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    sim_cli.add_parser(parser.add_subparsers(), "simulate")
    args = parser.parse_args(["simulate"])
    for name, value in overrides.items():
        setattr(args, name, value)
    return args


def run_cli(args: argparse.Namespace) -> str:
    import contextlib
    import io

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        sim_cli.main(args)
    return out.getvalue()


def test_simulate_cli_compares_with_the_recorded_makespan(tmp_path: Path) -> None:
    path = tmp_path / "t.trace"
    record(path)
    printed = run_cli(sim_args(trace=[str(path)], policy=["dask,random"], seed=1))
    assert "trace:t.trace: 7 tasks (4 measured, 2 estimated, 1 scattered), 2 wanted" in printed
    assert "recorded on 2 workers x 2 threads, makespan 1.4000 s" in printed
    header = next(line for line in printed.splitlines() if line.startswith("| graph"))
    assert "| recorded (s) | sim / recorded |" in header
    rows = [line.split("|")[1:-1] for line in printed.splitlines() if "| trace:t.trace |" in line]
    assert [row[1].strip() for row in rows] == ["dask", "random"]
    for row in rows:
        simulated, recorded, ratio = (float(row[i]) for i in (2, 3, 4))
        assert recorded == pytest.approx(1.4)
        assert ratio == pytest.approx(simulated / recorded, abs=0.01)
    # same seed, same table
    assert run_cli(sim_args(trace=[str(path)], policy=["dask,random"], seed=1)) == printed


def test_version_1_traces_are_still_reported_but_not_replayed(tmp_path: Path) -> None:
    path = tmp_path / "v1.trace"
    path.write_text(
        'H\t{"version": 1, "t0": 1000.0, "pid": 1}\n'
        "G\t0\t0\t10\tclient-1\t1\n"
        'K\t0\t0\t"a-1"\n'
        "W\t0\ttcp://w:1\n"
        "S\t20\t0\t0\t1\n"
        "F\t90\t0\t0\t30\t80\n"
        "C\t100\t0\n"
    )
    trace = read_trace(path)
    assert trace.version == 1 and trace.tasks[0].stop == pytest.approx(80e-6)
    assert trace.tasks[0].nbytes is None and trace.worker_threads == {}
    assert summarize(trace)["phases"]["compute"]["total"] == pytest.approx(50e-6)
    with pytest.raises(ValueError, match="version 1"):
        graph_from_trace(trace)
    with pytest.raises(SystemExit, match="version 1"):
        run_cli(sim_args(trace=[str(path)]))
