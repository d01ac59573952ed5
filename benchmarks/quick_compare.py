"""Side-by-side timing of many-small-task workloads on dask, dask-inf and dsched.

    python benchmarks/quick_compare.py [--repeats 3] [--schedulers dask,dask-inf,dsched]

Every measurement gets a fresh cluster (the scheduler plus 2 single-threaded `dask worker`
processes with nannies, all on 127.0.0.1). Graphs are built before the clock starts; the time
is what the client waits for `compute` (merge) or `map` + `gather` (map). Schedulers are
interleaved (A B C A B C ...) so that drift in machine load spreads over all of them.
A scheduler that fails to start is reported and skipped.

    dask      `dask scheduler` as shipped
    dask-inf  the same with DASK_DISTRIBUTED__SCHEDULER__WORKER_SATURATION=inf
    dsched    `python -m dsched scheduler`
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

from dask import delayed
from distributed import Client

from dsched.testing.cluster import SCHEDULER_KINDS, ClusterStartError, ProcessCluster

N_WORKERS = 2
BASELINE = "dask"


def inc(x: int) -> int:
    return x + 1


def times_ten(x: int) -> int:
    return x * 10


def merge(*values: int) -> int:
    return sum(values)


def time_merge(client: Client, n_tasks: int) -> float:
    """n_tasks independent delayed calls feeding one merge task."""
    graph = delayed(merge)(*[delayed(times_ten)(x) for x in range(n_tasks)])
    start = time.perf_counter()
    result = client.compute(graph).result()
    elapsed = time.perf_counter() - start
    assert result == 10 * sum(range(n_tasks)), result
    return elapsed


def time_map(client: Client, n_tasks: int) -> float:
    """client.map over n_tasks inputs, then gather every result."""
    inputs = range(n_tasks)
    start = time.perf_counter()
    results = client.gather(client.map(inc, inputs))
    elapsed = time.perf_counter() - start
    assert results == list(range(1, n_tasks + 1))
    return elapsed


WORKLOADS: dict[str, Callable[[Client, int], float]] = {"merge": time_merge, "map": time_map}


@dataclass
class Measurements:
    """Seconds per (workload, scheduler), and why a scheduler was skipped, if it was."""

    seconds: dict[tuple[str, str], list[float]]
    skipped: dict[str, str]


def measure_once(scheduler: str, workload: str, n_tasks: int) -> float:
    with (
        ProcessCluster(scheduler_kind=scheduler, n_workers=N_WORKERS) as cluster,
        Client(cluster.address, timeout=30, set_as_default=False) as client,
    ):
        # Untimed warm-up: workers import and unpickle the task functions once.
        assert client.submit(inc, 0, pure=False).result() == 1
        return WORKLOADS[workload](client, n_tasks)


def run_benchmarks(
    schedulers: list[str], workloads: list[str], n_tasks: int, repeats: int
) -> Measurements:
    measurements = Measurements(seconds={}, skipped={})
    for repeat in range(1, repeats + 1):
        for workload in workloads:
            for scheduler in schedulers:
                if scheduler in measurements.skipped:
                    continue
                label = f"[{repeat}/{repeats}] {workload}-{n_tasks // 1000}k on {scheduler}"
                print(f"{label} ...", end=" ", file=sys.stderr, flush=True)
                try:
                    seconds = measure_once(scheduler, workload, n_tasks)
                except ClusterStartError as error:
                    print(f"skipped, it did not start:\n{error}", file=sys.stderr)
                    measurements.skipped[scheduler] = str(error).splitlines()[0]
                    continue
                print(f"{seconds:.3f} s", file=sys.stderr)
                measurements.seconds.setdefault((workload, scheduler), []).append(seconds)
    return measurements


def markdown_table(
    measurements: Measurements, schedulers: list[str], workloads: list[str], n_tasks: int
) -> str:
    rows = [
        "| workload | scheduler | median (s) | min - max (s) | runs | time ÷ dask |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for workload in workloads:
        name = f"{workload}-{n_tasks // 1000}k"
        baseline = measurements.seconds.get((workload, BASELINE))
        for scheduler in schedulers:
            if scheduler in measurements.skipped:
                reason = measurements.skipped[scheduler]
                rows.append(f"| {name} | {scheduler} | skipped: {reason} | | | |")
                continue
            seconds = measurements.seconds.get((workload, scheduler), [])
            if not seconds:
                continue
            median = statistics.median(seconds)
            ratio = f"{median / statistics.median(baseline):.2f}" if baseline else "n/a"
            rows.append(
                f"| {name} | {scheduler} | {median:.3f} | {min(seconds):.3f} - {max(seconds):.3f}"
                f" | {len(seconds)} | {ratio} |"
            )
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="\n".join(__doc__.splitlines()[2:]),
    )
    parser.add_argument("--repeats", type=int, default=3, help="runs per scheduler (default 3)")
    parser.add_argument(
        "--schedulers",
        default=",".join(("dask", "dask-inf", "dsched")),
        help="comma-separated, from: " + ", ".join(SCHEDULER_KINDS),
    )
    parser.add_argument(
        "--workloads",
        default=",".join(WORKLOADS),
        help="comma-separated, from: " + ", ".join(WORKLOADS),
    )
    parser.add_argument("--tasks", type=int, default=10_000, help="tasks per workload")
    args = parser.parse_args(argv)

    schedulers = args.schedulers.split(",")
    workloads = args.workloads.split(",")
    for name, chosen, known in [
        ("scheduler", schedulers, SCHEDULER_KINDS),
        ("workload", workloads, tuple(WORKLOADS)),
    ]:
        unknown = sorted(set(chosen) - set(known))
        if unknown:
            parser.error(f"unknown {name}(s) {unknown}; choose from {list(known)}")
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")

    measurements = run_benchmarks(schedulers, workloads, args.tasks, args.repeats)
    print(
        f"\n{N_WORKERS} workers x 1 thread, fresh cluster per run, {args.repeats} repeat(s); "
        "time ÷ dask < 1 means faster than dask.\n"
    )
    print(markdown_table(measurements, schedulers, workloads, args.tasks))
    return 0


if __name__ == "__main__":
    sys.exit(main())
