#!/usr/bin/env bash
# P2P shuffles (issue 11): a timeseries set_index and a hash join at two sizes, dsched and
# `dask scheduler` side by side (interleaved, a fresh cluster of 2 workers x 2 threads with
# nannies per run). Writes results.json and results.md here.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../../.."
.venv/bin/dsched bench \
    --workloads p2psetindex-2,p2psetindex-8,p2pjoin-2,p2pjoin-8 \
    --schedulers dask,dsched --setups real-2x2 --repeats 3 \
    --out benchmarks/results/p2p --no-plots
