"""``dsched bench``: run the benchmark workloads against several schedulers and report.

    dsched bench --quick
    dsched bench --workloads merge-10k,map-10k --schedulers dask,dask-inf,dsched \\
        --setups real-2x1,zero-8,zero-64 --repeats 3 --out benchmarks/results
    dsched bench --report benchmarks/results/results.json     # redo the table and plots

Schedulers: ``dask`` (`dask scheduler` as shipped), ``dask-inf`` (the same with
worker-saturation=inf), ``dsched``, ``dsched:<policy>``. Set-ups: ``real-<N>x<T>`` (N `dask
worker` processes with T threads each) or ``zero-<N>`` (N simulated zero workers).
Writes ``results.json`` (after every run, so an interrupted suite keeps what it measured),
``results.md`` and PNG plots to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path
from typing import Any, TypedDict

__all__ = ["QUICK", "add_parser", "main", "run"]

DEFAULT_SCHEDULERS = ("dask", "dask-inf", "dsched")


class Subset(TypedDict):
    workloads: tuple[str, ...]
    setups: tuple[str, ...]
    repeats: int


# --quick: a small subset that finishes in well under 3 minutes on 2 cores.
QUICK: Subset = {
    "workloads": ("merge-2000", "map-2000", "tree-10"),
    "setups": ("real-2x1", "zero-8"),
    "repeats": 1,
}
FULL_SETUPS = ("real-2x1", "zero-8", "zero-64")


def add_parser(subparsers: Any, name: str) -> None:
    parser = subparsers.add_parser(
        name,
        help="benchmark schedulers side by side (dask, dask-inf, dsched)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    configure_parser(parser)
    parser.set_defaults(func=main)


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true", help="a small subset (< 3 minutes)")
    parser.add_argument("--workloads", help="comma-separated names, e.g. merge-10k,tree-14")
    parser.add_argument("--schedulers", help=f"default {','.join(DEFAULT_SCHEDULERS)}")
    parser.add_argument("--setups", help=f"default {','.join(FULL_SETUPS)}")
    parser.add_argument("--repeats", type=int, help="runs per (scheduler, workload, set-up)")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds per run")
    parser.add_argument("--out", default="bench-results", help="output directory")
    parser.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    parser.add_argument("--report", metavar="JSON", help="only rebuild table and plots from JSON")


def _split(text: str | None, default: tuple[str, ...]) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()] if text else list(default)


def write_outputs(data: dict[str, Any], out: Path, plots: bool = True) -> list[Path]:
    from dsched.bench.report import markdown_report, plot_per_task_overhead, plot_speedups

    out.mkdir(parents=True, exist_ok=True)
    (out / "results.md").write_text(markdown_report(data["runs"], data["meta"]))
    written = [out / "results.md"]
    if plots and data["runs"]:
        written += plot_speedups(data["runs"], out)
        overhead = plot_per_task_overhead(data["runs"], out)
        if overhead is not None:
            written.append(overhead)
    return written


def run(args: argparse.Namespace, argv: list[str] | None = None) -> dict[str, Any]:
    from dsched.bench.runner import Progress, machine_info, parse_setup, plan, run_suite
    from dsched.bench.workloads import FULL_SET
    from dsched.testing.cluster import is_scheduler_kind

    out = Path(args.out)
    if args.report:
        recorded: dict[str, Any] = json.loads(Path(args.report).read_text())
        write_outputs(recorded, out, plots=not args.no_plots)
        return recorded
    workloads = _split(args.workloads, QUICK["workloads"] if args.quick else FULL_SET)
    schedulers = _split(args.schedulers, DEFAULT_SCHEDULERS)
    setups = [
        parse_setup(s) for s in _split(args.setups, QUICK["setups"] if args.quick else FULL_SETUPS)
    ]
    repeats = args.repeats or (QUICK["repeats"] if args.quick else 3)
    for scheduler in schedulers:
        if not is_scheduler_kind(scheduler):
            raise SystemExit(f"dsched bench: unknown scheduler {scheduler!r}")
    runs = plan(workloads, schedulers, setups, repeats)  # raises on unknown workloads
    command = "dsched bench " + shlex.join(argv if argv is not None else sys.argv[2:])
    data: dict[str, Any] = {
        "meta": {
            "command": command,
            "argv": sys.argv,
            "started": time.time(),
            "machine": machine_info(),
            "workloads": workloads,
            "schedulers": schedulers,
            "setups": [s.name for s in setups],
            "repeats": repeats,
            "timeout_s": args.timeout,
        },
        "runs": [],
    }
    out.mkdir(parents=True, exist_ok=True)
    json_path = out / "results.json"

    def save(record: Any) -> None:
        data["runs"].append(record.to_json())
        tmp = json_path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(data, indent=1))
        tmp.replace(json_path)

    run_suite(runs, args.timeout, save, Progress(len(runs)))
    data["meta"]["finished"] = time.time()
    save_final = json_path.with_suffix(".json.tmp")
    save_final.write_text(json.dumps(data, indent=1))
    save_final.replace(json_path)
    written = write_outputs(data, out, plots=not args.no_plots)
    print((out / "results.md").read_text())
    print("written: " + ", ".join(str(p) for p in [json_path, *written]), file=sys.stderr)
    return data


def main(args: argparse.Namespace) -> None:
    try:
        run(args)
    except ValueError as error:
        raise SystemExit(f"dsched bench: {error}") from None
