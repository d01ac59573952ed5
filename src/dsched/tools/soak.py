"""``dsched soak``: many rounds of mixed workloads while workers are killed and clients vanish.

Theory of operation
-------------------
Starts a local dsched scheduler (with ``--validate`` unless ``--no-validate``) and
``dask worker`` processes under nannies, then runs ``--rounds`` rounds. Each round computes
one of the chaos workloads (merge, tree, array, dataframe) and, chosen by the seeded RNG,
SIGKILLs a worker at a random moment and/or starts a client in a subprocess that submits
work and is SIGKILLed mid-computation. After every round the cluster must be empty again
(no task on the scheduler, no data on any worker) and the scheduler's invariants must hold.

Prints one line per round (workload, kills, result, scheduler RSS) and a summary; exits 1
if any result was wrong or the cluster did not come back clean.
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

CLIENT_SCRIPT = textwrap.dedent(
    """
    import sys, time
    from distributed import Client
    from dsched.testing.workloads import make_merge, sleep_then

    client = Client(sys.argv[1])
    futures = client.map(sleep_then, range(200), [0.01] * 200, pure=False)
    merged = client.compute(make_merge(seed=int(sys.argv[2]), n=200).collection)
    futures[0].result()
    print("running", flush=True)
    time.sleep(600)
    """
)


def add_parser(subparsers: Any, name: str) -> None:
    parser = subparsers.add_parser(name, help="fault-injection soak test on a local cluster")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--kill-probability", type=float, default=0.6)
    parser.add_argument("--client-kill-probability", type=float, default=0.3)
    parser.add_argument("--no-validate", action="store_true", help="skip --validate")
    parser.add_argument("--json", help="also write the per-round figures here")
    parser.set_defaults(func=main)


def _kill_a_client(address: str, seed: int) -> bool:
    """Start a client subprocess, wait until its work is running, SIGKILL it."""
    proc = subprocess.Popen(
        [sys.executable, "-c", CLIENT_SCRIPT, address, str(seed)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()  # "running", or EOF if it died
        return line.strip() == b"running"
    finally:
        proc.kill()
        proc.wait(10)


def main(args: argparse.Namespace) -> None:
    from distributed import Client

    from dsched.testing.cluster import ProcessCluster
    from dsched.testing.faults import (
        NotReached,
        assert_cluster_clean,
        dsched_info,
        kill_random_worker,
        wait_for_workers,
    )
    from dsched.testing.workloads import WORKLOADS, task_shuffle_config

    rng = random.Random(args.seed)
    names = sorted(WORKLOADS)
    rows: list[dict[str, Any]] = []
    wrong = unclean = kills = client_kills = 0
    started = time.monotonic()
    with (
        ProcessCluster(
            n_workers=args.workers,
            nanny=True,
            scheduler_args=[] if args.no_validate else ["--validate"],
        ) as cluster,
        task_shuffle_config(),
        # distributed's Client is not annotated.
        Client(cluster.address, set_as_default=False) as client,  # type: ignore[no-untyped-call]
    ):
        assert cluster.address is not None
        print(f"soak: scheduler at {cluster.address}, {args.workers} workers, seed {args.seed}")
        for round_no in range(1, args.rounds + 1):
            name = names[(round_no - 1) % len(names)]
            wait_for_workers(client, args.workers)
            round_kills = 0
            killed_client = False
            if rng.random() < args.client_kill_probability:
                killed_client = _kill_a_client(cluster.address, rng.randrange(1 << 30))
                client_kills += killed_client
            job = WORKLOADS[name](rng.randrange(1 << 30))
            t0 = time.monotonic()
            future = client.compute(job.collection)
            if rng.random() < args.kill_probability:
                time.sleep(rng.uniform(0.05, 1.0))
                if not future.done() and kill_random_worker(cluster, client, rng):
                    round_kills += 1
            ok = True
            try:
                job.check(future.result(timeout=300))
            except Exception as exc:
                ok = False
                print(f"  round {round_no}: WRONG RESULT {exc!r}")
            del future
            elapsed = time.monotonic() - t0
            kills += round_kills
            wrong += not ok
            wait_for_workers(client, args.workers)
            try:
                info = assert_cluster_clean(client, timeout=60)
                clean = True
            except (NotReached, AssertionError) as exc:
                info = dsched_info(client)
                clean = False
                unclean += 1
                print(f"  round {round_no}: NOT CLEAN {exc}")
            row = {
                "round": round_no,
                "workload": name,
                "worker_kills": round_kills,
                "client_killed": killed_client,
                "correct": ok,
                "clean": clean,
                "seconds": round(elapsed, 2),
                "scheduler_rss_mib": round(info.get("rss", 0) / 2**20, 1),
            }
            rows.append(row)
            print(
                f"round {round_no:3d}  {name:9s}  kills={round_kills}  "
                f"client-killed={'yes' if killed_client else 'no ':3s}  "
                f"correct={ok}  clean={clean}  {elapsed:5.1f}s  "
                f"scheduler RSS {row['scheduler_rss_mib']} MiB"
            )
    rss = [row["scheduler_rss_mib"] for row in rows]
    summary = {
        "rounds": len(rows),
        "worker_kills_survived": kills,
        "clients_killed": client_kills,
        "wrong_results": wrong,
        "unclean_rounds": unclean,
        "rss_first_mib": rss[0] if rss else None,
        "rss_last_mib": rss[-1] if rss else None,
        "rss_max_mib": max(rss) if rss else None,
        "seconds": round(time.monotonic() - started, 1),
    }
    print("soak summary: " + json.dumps(summary))
    if args.json:
        Path(args.json).write_text(json.dumps({"summary": summary, "rounds": rows}, indent=2))
    if wrong or unclean:
        raise SystemExit(1)
