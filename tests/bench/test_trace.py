"""Tracing: the recorder's file format, and a trace recorded by a real dsched scheduler."""

from __future__ import annotations

import argparse
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from dask import delayed
from distributed import Client

from dsched.bench.workloads import merge_values, times_ten
from dsched.policy.protocol import Assignment, TaskReady
from dsched.state.outbox import Outbox
from dsched.testing.cluster import ProcessCluster
from dsched.tools.trace import TraceRecorder, main, read_trace, summarize


class FakeState:
    def __init__(self, keys: list[Any]) -> None:
        self.tasks = {i: SimpleNamespace(key=k) for i, k in enumerate(keys)}

    def task_by_id(self, task_id: int) -> Any:
        return self.tasks.get(task_id)


def test_recorder_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "t.trace"
    keys: list[Any] = ["x", ("y", 0)]
    recorder = TraceRecorder(path, FakeState(keys))
    t0 = recorder.t0
    graph = SimpleNamespace(
        tasks={
            "x": SimpleNamespace(dependencies=()),
            ("y", 0): SimpleNamespace(dependencies=("x",)),
        },
        order={"x": 0, ("y", 0): 1},
    )
    recorder.graph("client-1", graph, [("y", 0)], t0 + 0.1, t0 + 0.2)
    recorder.policy([TaskReady(0, (0,)), TaskReady(1, (0,))], [Assignment(0, 0)], t0 + 0.3)
    out = Outbox()
    out.send_worker("tcp://w:1", {"op": "compute-task", "key": "x", "run_id": 5})
    out.send_worker("tcp://w:1", {"op": "free-keys", "keys": []})
    recorder.outbox(out, t0 + 0.4)
    recorder.task_finished(
        "tcp://w:1",
        {
            "key": "x",
            "startstops": (
                {"action": "transfer", "start": t0 + 0.45, "stop": t0 + 0.5, "source": "tcp://w:2"},
                {"action": "compute", "start": t0 + 0.5, "stop": t0 + 0.7},
            ),
        },
        t0 + 0.8,
    )
    done = Outbox()
    done.send_client("client-1", {"op": "key-in-memory", "key": "x"})
    recorder.outbox(done, t0 + 0.9)
    recorder.close()

    trace = read_trace(path)
    x = next(tt for tt in trace.tasks.values() if tt.key == "x")
    y = next(tt for tt in trace.tasks.values() if tt.key == repr(("y", 0)))
    assert x.received == pytest.approx(0.1) and x.ready == pytest.approx(0.3)
    assert x.sent == pytest.approx(0.4) and trace.workers[x.worker] == "tcp://w:1"
    assert (x.start, x.stop, x.finished, x.notified) == pytest.approx((0.5, 0.7, 0.8, 0.9))
    assert len(x.transfers) == 1 and x.transfers[0][:2] == pytest.approx((0.45, 0.5))
    assert y.ready == pytest.approx(0.3) and y.sent is None
    assert x.dependencies == () and y.dependencies == (0,) and (x.order, y.order) == (0, 1)
    assert trace.wanted == {0: [1]}
    summary = summarize(trace)
    phases = summary["phases"]
    assert phases["compute"]["total"] == pytest.approx(0.2)
    assert phases["send -> start latency"]["total"] == pytest.approx(0.1)
    assert phases["scheduler decision (ready -> compute-task sent)"]["n"] == 1
    assert summary["transfer"]["total"] == pytest.approx(0.05)


def test_truncated_last_line_is_ignored(tmp_path: Path) -> None:
    path = tmp_path / "t.trace"
    recorder = TraceRecorder(path, FakeState([]))
    graph = SimpleNamespace(tasks={"a": SimpleNamespace(dependencies=())}, order={"a": 0})
    recorder.graph("c", graph, ["a"], recorder.t0, recorder.t0)
    recorder.close()
    with path.open("a") as f:
        f.write("S\t12")  # a scheduler killed mid-write
    assert [tt.key for tt in read_trace(path).tasks.values()] == ["a"]


@pytest.mark.integration
@pytest.mark.timeout(120)
def test_trace_of_a_real_run_and_report(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "sched.trace"
    n = 300
    with (
        ProcessCluster(
            scheduler_kind="dsched", n_workers=2, scheduler_args=["--trace", str(path)]
        ) as cluster,
        Client(cluster.address, timeout=30, set_as_default=False) as client,
    ):
        graph = delayed(merge_values)(*[delayed(times_ten)(i) for i in range(n)])
        assert client.compute(graph).result(timeout=60) == 10 * sum(range(n))
    # the scheduler was stopped with SIGTERM: the trace is complete
    trace = read_trace(path)
    assert len(trace.tasks) == n + 1 and len(trace.workers) == 2
    for tt in trace.tasks.values():
        assert None not in (tt.received, tt.ready, tt.sent, tt.start, tt.stop, tt.finished)
        assert tt.received <= tt.ready <= tt.sent <= tt.finished
        assert tt.start <= tt.stop <= tt.finished + 0.05  # same host clock
    merge = next(tt for tt in trace.tasks.values() if tt.key.startswith("merge_values"))
    assert merge.notified is not None and merge.notified >= merge.finished
    # what a replay needs (version 2): the graph, output sizes, the cluster's shape
    assert merge.dependencies is not None and len(merge.dependencies) == n
    assert all(tt.nbytes and tt.nbytes > 0 for tt in trace.tasks.values())
    assert sorted(trace.worker_threads.values()) == [1, 1] and len(trace.worker_joined) == 2
    assert trace.wanted == {0: [next(k for k, tt in trace.tasks.items() if tt is merge)]}
    summary = summarize(trace)
    assert sum(w["tasks"] for w in summary["workers"].values()) == n + 1

    png = tmp_path / "stream.png"
    main(argparse.Namespace(file=str(path), png=str(png), no_plot=False, json=False))
    printed = capsys.readouterr().out
    assert "send -> start latency" in printed and str(n + 1) in printed
    assert png.stat().st_size > 1000 and png.read_bytes()[:4] == b"\x89PNG"
