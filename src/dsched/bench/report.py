"""Summaries of benchmark records: a Markdown table of medians and ratios, and PNG plots.

``speedup`` is ``median makespan of dask / median makespan of the scheduler``: above 1 means
faster than ``dask scheduler`` as shipped.
"""

from __future__ import annotations

import math
import statistics
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

BASELINE = "dask"

__all__ = ["BASELINE", "markdown_report", "plot_per_task_overhead", "plot_speedups", "summarize"]


def _ordered(values: Sequence[str]) -> list[str]:
    return list(dict.fromkeys(values))


def summarize(records: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (set-up, workload, scheduler) with medians, spread and the speedup."""
    groups: dict[tuple[str, str, str], list[dict[str, Any]]] = defaultdict(list)
    for r in records:
        groups[r["setup"], r["workload"], r["scheduler"]].append(r)
    medians: dict[tuple[str, str, str], float] = {}
    rows = []
    for (setup, workload, scheduler), runs in groups.items():
        ok = [r for r in runs if r["status"] == "ok" and r["makespan_s"] is not None]
        times = [r["makespan_s"] for r in ok]
        row: dict[str, Any] = {
            "setup": setup,
            "workload": workload,
            "scheduler": scheduler,
            "runs": len(runs),
            "ok": len(ok),
            "failures": sorted({r["status"] for r in runs if r["status"] != "ok"}),
            "tasks": next((r["tasks"] for r in runs if r.get("tasks")), None),
        }
        if times:
            row["median_s"] = statistics.median(times)
            row["min_s"], row["max_s"] = min(times), max(times)
            medians[setup, workload, scheduler] = row["median_s"]
            cpu = [r["scheduler_cpu_s"] for r in ok if r.get("scheduler_cpu_s") is not None]
            rss = [r["scheduler_peak_rss_bytes"] for r in ok if r.get("scheduler_peak_rss_bytes")]
            row["cpu_s"] = statistics.median(cpu) if cpu else None
            row["rss_mb"] = statistics.median(rss) / 2**20 if rss else None
            workers = [r["worker_peak_rss_bytes"] for r in ok if r.get("worker_peak_rss_bytes")]
            row["worker_rss_mb"] = statistics.median(workers) / 2**20 if workers else None
            if row["tasks"]:
                row["per_task_ms"] = 1e3 * row["median_s"] / row["tasks"]
        rows.append(row)
    for row in rows:
        base = medians.get((row["setup"], row["workload"], BASELINE))
        if base is not None and row.get("median_s"):
            row["speedup"] = base / row["median_s"]
    return rows


def _fmt(value: Any, spec: str) -> str:
    return "" if value is None else format(value, spec)


def geometric_means(rows: Sequence[dict[str, Any]]) -> dict[tuple[str, str], float]:
    """Geometric mean of the speedup per (set-up, scheduler) over workloads that ran."""
    logs: dict[tuple[str, str], list[float]] = defaultdict(list)
    for row in rows:
        if row.get("speedup"):
            logs[row["setup"], row["scheduler"]].append(math.log(row["speedup"]))
    return {k: math.exp(statistics.fmean(v)) for k, v in logs.items()}


def markdown_report(records: Sequence[dict[str, Any]], meta: dict[str, Any]) -> str:
    rows = summarize(records)
    setups = _ordered([r["setup"] for r in rows])
    lines = [
        "# dsched benchmark results",
        "",
        f"Command: `{meta.get('command', '')}`",
        "",
        f"Machine: {meta.get('machine', {}).get('platform', '')}, "
        f"{meta.get('machine', {}).get('cpu_count', '?')} CPUs; dask/distributed "
        f"{meta.get('machine', {}).get('distributed', '?')}; dsched "
        f"{meta.get('machine', {}).get('dsched', '?')}.",
        "",
        "Makespan = client-observed time of the computation (graph built untimed), median over "
        "repeats, fresh cluster per run, schedulers interleaved. "
        "**speedup = dask median / this median** (> 1: faster than `dask scheduler`). "
        "CPU = scheduler process CPU seconds during the timed part; RSS = scheduler peak RSS; "
        "worker RSS = the largest peak RSS of any worker (real workers).",
    ]
    geo = geometric_means(rows)
    for setup in setups:
        lines += [
            "",
            f"## {setup}",
            "",
            "| workload | tasks | scheduler | median s | min - max s | ok/runs | speedup "
            "| sched CPU s | sched peak RSS MB | worker peak RSS MB | ms/task |",
            "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for row in (r for r in rows if r["setup"] == setup):
            spread = f"{row['min_s']:.3f} - {row['max_s']:.3f}" if row.get("median_s") else ""
            okruns = f"{row['ok']}/{row['runs']}"
            if row["failures"]:
                okruns += " (" + ", ".join(row["failures"]) + ")"
            lines.append(
                f"| {row['workload']} | {_fmt(row['tasks'], 'd')} | {row['scheduler']} "
                f"| {_fmt(row.get('median_s'), '.3f')} | {spread} | {okruns} "
                f"| {_fmt(row.get('speedup'), '.2f')} | {_fmt(row.get('cpu_s'), '.2f')} "
                f"| {_fmt(row.get('rss_mb'), '.0f')} | {_fmt(row.get('worker_rss_mb'), '.0f')} "
                f"| {_fmt(row.get('per_task_ms'), '.3f')} |"
            )
        means = {s: g for (st, s), g in geo.items() if st == setup}
        if means:
            lines += [
                "",
                "Geometric mean speedup over the workloads above: "
                + ", ".join(f"{s} {g:.2f}x" for s, g in means.items()),
            ]
    return "\n".join(lines) + "\n"


def _grouped_bars(
    ax: Any,
    groups: Sequence[str],
    schedulers: Sequence[str],
    value: dict[tuple[str, str], float],
    fmt: str,
) -> None:
    """One cluster of bars per group, one bar per scheduler (0 where it has no value)."""
    width = 0.8 / len(schedulers)
    for i, scheduler in enumerate(schedulers):
        offset = (i - (len(schedulers) - 1) / 2) * width
        positions = [j + offset for j in range(len(groups))]
        values = [value.get((group, scheduler), 0) for group in groups]
        bars = ax.bar(positions, values, width, label=scheduler)
        ax.bar_label(bars, fmt=fmt, fontsize=7)


def plot_speedups(records: Sequence[dict[str, Any]], out_dir: Path) -> list[Path]:
    """Per set-up: bars of the speedup vs dask per workload, one bar per scheduler."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = summarize(records)
    paths = []
    for setup in _ordered([r["setup"] for r in rows]):
        mine = [r for r in rows if r["setup"] == setup and r.get("speedup")]
        if not mine:
            continue
        workloads = _ordered([r["workload"] for r in mine])
        schedulers = _ordered([r["scheduler"] for r in mine])
        fig, ax = plt.subplots(figsize=(max(6, 1.1 * len(workloads) + 2), 4.5))
        speedup = {(r["workload"], r["scheduler"]): r["speedup"] for r in mine}
        _grouped_bars(ax, workloads, schedulers, speedup, "%.2f")
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_xticks(range(len(workloads)), workloads, rotation=30, ha="right")
        ax.set_ylabel("speedup vs dask scheduler (higher is better)")
        ax.set_title(f"{setup}: dask median makespan / scheduler median makespan")
        ax.legend()
        fig.tight_layout()
        path = out_dir / f"speedup-{setup}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


def plot_per_task_overhead(records: Sequence[dict[str, Any]], out_dir: Path) -> Path | None:
    """Zero-worker set-ups: makespan per task (ms) per workload, scheduler and worker count."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in summarize(records) if r["setup"].startswith("zero") and r.get("per_task_ms")]
    if not rows:
        return None
    groups = _ordered([f"{r['workload']}\n{r['setup']}" for r in rows])
    schedulers = _ordered([r["scheduler"] for r in rows])
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(groups) + 2), 4.5))
    per_task = {(f"{r['workload']}\n{r['setup']}", r["scheduler"]): r["per_task_ms"] for r in rows}
    _grouped_bars(ax, groups, schedulers, per_task, "%.3f")
    ax.set_xticks(range(len(groups)), groups)
    ax.set_ylabel("makespan per task, ms (lower is better)")
    ax.set_title("per-task overhead with zero workers")
    ax.legend()
    fig.tight_layout()
    path = out_dir / "per-task-overhead-zero.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
