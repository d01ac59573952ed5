"""`dsched bench`: a tiny quick run records every run completely and checks results."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from dsched.bench.cli import run
from dsched.bench.report import markdown_report, summarize
from dsched.bench.runner import Setup, parse_setup, plan, run_one
from dsched.bench.workloads import get_workload


def test_names_parse() -> None:
    assert parse_setup("real-2x1") == Setup("real", 2, 1)
    assert parse_setup("zero-64") == Setup("zero", 64)
    assert get_workload("merge-10k").params == (10_000,)
    assert get_workload("groupby-30-1s-1h").params == (30, "1s", "1h")
    assert get_workload("merge_slow-500-0.1").params == (500, 0.1)
    with pytest.raises(ValueError):
        get_workload("merge-1-2")
    with pytest.raises(ValueError):
        parse_setup("cloud-3")


def test_plan_interleaves_schedulers() -> None:
    runs = plan(["merge-10", "tree-3"], ["dask", "dsched"], [Setup("real", 2)], 2)
    assert [(r, w.name, s) for r, _, w, s in runs][:4] == [
        (1, "merge-10", "dask"),
        (1, "merge-10", "dsched"),
        (1, "tree-3", "dask"),
        (1, "tree-3", "dsched"),
    ]
    assert len(runs) == 8


def test_report_ratios_and_failures() -> None:
    records = [
        {
            "setup": "real-2x1",
            "workload": "merge-10",
            "scheduler": s,
            "status": st,
            "makespan_s": t,
            "tasks": 11,
            "scheduler_cpu_s": 0.1,
            "scheduler_peak_rss_bytes": 2**20,
        }
        for s, st, t in [
            ("dask", "ok", 2.0),
            ("dask", "ok", 4.0),
            ("dsched", "ok", 1.0),
            ("dsched", "timeout", None),
        ]
    ]
    rows = {r["scheduler"]: r for r in summarize(records)}
    assert rows["dask"]["median_s"] == 3.0 and rows["dsched"]["speedup"] == 3.0
    assert rows["dsched"]["ok"] == 1 and rows["dsched"]["failures"] == ["timeout"]
    text = markdown_report(records, {"command": "x"})
    assert "1/2 (timeout)" in text and "| 3.00 |" in text


@pytest.mark.integration
@pytest.mark.timeout(60)
def test_a_scheduler_that_does_not_start_is_recorded() -> None:
    record = run_one(get_workload("merge-10"), "dsched:no-such-policy", Setup("real", 1), 1, 30)
    assert record.status == "start-failed" and "no-such-policy" in record.error


@pytest.mark.integration
@pytest.mark.timeout(180)
def test_quick_bench_tiny(tmp_path: Path) -> None:
    args = argparse.Namespace(
        quick=True,
        workloads="merge-300",
        schedulers="dask,dsched",
        setups="real-2x1,zero-4",
        repeats=1,
        timeout=60.0,
        out=str(tmp_path),
        no_plots=False,
        report=None,
    )
    run(args, ["--quick"])
    data = json.loads((tmp_path / "results.json").read_text())
    assert data["meta"]["machine"]["distributed"] == "2026.8.0"
    assert data["meta"]["command"].startswith("dsched bench")
    runs = data["runs"]
    assert len(runs) == 2 * 2  # schedulers x set-ups, none dropped
    for record in runs:
        assert record["status"] == "ok", record
        assert record["makespan_s"] > 0 and record["scheduler_cpu_s"] >= 0
        assert record["scheduler_peak_rss_bytes"] > 10 * 2**20
        assert record["tasks"] == 301
    assert {(r["setup"], r["scheduler"]) for r in runs} == {
        (s, k) for s in ("real-2x1", "zero-4") for k in ("dask", "dsched")
    }
    table = (tmp_path / "results.md").read_text()
    assert "## real-2x1" in table and "## zero-4" in table
    for png in ("speedup-real-2x1.png", "speedup-zero-4.png", "per-task-overhead-zero.png"):
        assert (tmp_path / png).read_bytes()[:4] == b"\x89PNG"
