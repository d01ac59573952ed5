"""Tables and Gantt charts of simulation results."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from dsched.sim.engine import SimResult


def _mb(nbytes: float) -> str:
    return f"{nbytes / 1e6:.3f}"


def markdown_table(
    results: Sequence[SimResult], recorded: Mapping[str, float | None] | None = None
) -> str:
    """One row per (graph, policy): makespan, transfers, peak memory of the fullest worker.
    With ``recorded`` (graph name -> makespan of the recorded run, for graphs replayed from
    a trace), two more columns: the recorded makespan and simulated / recorded."""
    recorded = recorded or {}
    compare = bool(recorded)
    lines = [
        "| graph | policy | makespan (s) | "
        + ("recorded (s) | sim / recorded | " if compare else "")
        + "transferred (MB) | peak memory, max worker (MB) | steals ok/asked |",
        "|---|---|---:|" + ("---:|---:|" if compare else "") + "---:|---:|---:|",
    ]
    for r in results:
        row = f"| {r.graph} | {r.policy} | {r.makespan:.4f} |"
        if compare:
            real = recorded.get(r.graph)
            row += (
                f" {real:.4f} | {r.makespan / real:.2f} |"
                if real
                else f" {'--' if real is None else f'{real:.4f}'} | -- |"
            )
        row += (
            f" {_mb(r.bytes_transferred)} | {_mb(max(r.peak_memory.values(), default=0))}"
            f" | {r.steals_succeeded}/{r.steals_requested} |"
        )
        lines.append(row)
    return "\n".join(lines)


def gantt(result: SimResult, path: str | Path, max_bars: int = 20_000) -> Path:
    """Draw one row per worker thread, one bar per task run, coloured by task prefix."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from dask.utils import key_split

    executions = result.executions[:max_bars]
    rows = sorted({(e.worker, e.thread) for e in executions})
    row_of = {row: i for i, row in enumerate(rows)}
    prefixes = sorted({key_split(e.key) for e in executions})
    cmap = plt.get_cmap("tab20")
    colour = {p: cmap(i % 20) for i, p in enumerate(prefixes)}
    fig, ax = plt.subplots(figsize=(12, 1 + 0.4 * max(len(rows), 1)))
    by_prefix: dict[str, list[tuple[float, float, int]]] = {}
    for e in executions:
        by_prefix.setdefault(key_split(e.key), []).append(
            (e.start, e.stop - e.start, row_of[e.worker, e.thread])
        )
    for prefix, bars in by_prefix.items():
        for row in sorted({b[2] for b in bars}):
            ax.broken_barh(
                [(s, d) for s, d, r in bars if r == row],
                (row - 0.4, 0.8),
                facecolors=colour[prefix],
                label=prefix if row == min(b[2] for b in bars) else None,
            )
    ax.set_yticks(range(len(rows)), [f"w{w}/t{t}" for w, t in rows])
    ax.set_xlabel("simulated seconds")
    ax.set_title(f"{result.graph} with {result.policy}: makespan {result.makespan:.4f} s")
    if len(prefixes) <= 20:
        ax.legend(loc="upper right", fontsize="small")
    fig.tight_layout()
    out = Path(path)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
