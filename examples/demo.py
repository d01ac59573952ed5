"""Run a small sample workload on a local dsched cluster with two worker processes.

    python examples/demo.py                   # dsched.LocalCluster
    python examples/demo.py --scheduler dask  # the same on distributed.LocalCluster

``dsched.LocalCluster`` is ``distributed.LocalCluster`` with a dsched scheduler (a process of
its own); the workers are Dask's nanny-managed worker processes, everything on 127.0.0.1,
and the client below is a plain `distributed.Client`.
"""

from __future__ import annotations

import argparse
import signal
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import dask.array as da
import distributed
from dask import delayed
from distributed import Client

import dsched

N_DELAYED = 2_000
N_MAP = 2_000


def inc(x: int) -> int:
    return x + 1


def double(x: int) -> int:
    return 2 * x


def total(*values: int) -> int:
    return sum(values)


@contextmanager
def sigterm_as_keyboard_interrupt() -> Iterator[None]:
    """Make `kill <pid>` take the same shutdown path as Ctrl-C."""

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def timed(label: str, compute: Callable[[], Any], expected: Any) -> bool:
    """Run ``compute``, print its wall time and result, and say whether the result is right."""
    start = time.perf_counter()
    result = compute()
    elapsed = time.perf_counter() - start
    correct = bool(result == expected)
    verdict = "ok" if correct else f"WRONG, expected {expected}"
    print(f"  {label:<40} {elapsed:7.3f} s   result {result} ({verdict})")
    return correct


def run_workload(client: Client) -> bool:
    """The sample workload; True if every result is correct."""
    # Graphs are built before the clock starts: the timings are what the cluster takes.
    merge_graph = delayed(total)(*[delayed(double)(x) for x in range(N_DELAYED)])
    merge_ok = timed(
        f"delayed merge of {N_DELAYED:,} tasks",
        lambda: client.compute(merge_graph).result(),
        expected=2 * sum(range(N_DELAYED)),
    )

    map_ok = timed(
        f"client.map of {N_MAP:,} tasks + gather",
        lambda: sum(client.gather(client.map(inc, range(N_MAP)))),
        expected=sum(range(1, N_MAP + 1)),
    )

    array = da.random.default_rng(0).random((2_000, 2_000), chunks=(500, 500))
    array_ok = timed(
        "dask.array 2000x2000 (16 chunks) mean",
        lambda: round(float(client.compute(array.mean()).result()), 9),
        # The same graph run in this process, without the cluster.
        expected=round(float(array.mean().compute(scheduler="sync")), 9),
    )
    return merge_ok and map_ok and array_ok


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--scheduler",
        choices=["dsched", "dask"],
        default="dsched",
        help="whose LocalCluster to start (default: dsched)",
    )
    args = parser.parse_args(argv)

    local_cluster = dsched.LocalCluster if args.scheduler == "dsched" else distributed.LocalCluster
    print(f"Starting a {args.scheduler} scheduler and 2 workers on 127.0.0.1 ...")
    start = time.perf_counter()
    try:
        with (
            sigterm_as_keyboard_interrupt(),
            local_cluster(
                n_workers=2,
                threads_per_worker=1,
                host="127.0.0.1",
                dashboard_address="127.0.0.1:0",
            ) as cluster,
        ):
            address = cluster.scheduler_address
            print(f"  cluster up at {address} in {time.perf_counter() - start:.2f} s")
            with Client(cluster, timeout=30) as client:
                client.wait_for_workers(2, timeout=30)
                all_correct = run_workload(client)
            print("Shutting down ...")
    except RuntimeError as error:  # SpecCluster: "Cluster failed to start: ..."
        print(f"error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("Interrupted; the cluster was shut down.", file=sys.stderr)
        return 130
    print("Done." if all_correct else "Done, but some results were wrong.")
    return 0 if all_correct else 1


if __name__ == "__main__":
    sys.exit(main())
