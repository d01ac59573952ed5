"""Side-by-side timing of merge-10k and map-10k on dask, dask-inf and dsched.

    python benchmarks/quick_compare.py [--repeats 3] [--schedulers dask,dask-inf,dsched]

A thin wrapper around ``dsched bench`` (src/dsched/bench/), which does the work: a fresh
cluster (scheduler + 2 single-threaded `dask worker` processes) per run, graphs built
untimed, schedulers interleaved, results checked. Any other ``dsched bench`` option can be
added, e.g. ``--setups real-2x1,zero-8`` or ``--workloads merge-25k``.
"""

from __future__ import annotations

import argparse
import sys

from dsched.bench.cli import configure_parser, run


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    defaults = {
        "--workloads": "merge-10k,map-10k",
        "--setups": "real-2x1",
        "--repeats": "3",
        "--out": "bench-results/quick-compare",
    }
    for option, value in defaults.items():
        if not any(arg == option or arg.startswith(option + "=") for arg in argv):
            argv += [option, value]
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    configure_parser(parser)
    run(parser.parse_args(argv), argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
