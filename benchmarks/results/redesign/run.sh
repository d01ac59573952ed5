#!/usr/bin/env bash
# Scheduler CPU before (commit a82bcde, checked out at $BASE) and after the redesign (this
# tree), zero mode, interleaved: before, after, before, after, ...
set -euo pipefail
cd "$(dirname "$0")/../../.."
BASE=${BASE:-/work/base}
OUT=benchmarks/results/redesign
for round in 1 2 3 4; do
    for side in before after; do
        src=$PWD/src
        [[ $side == before ]] && src=$BASE/src
        PYTHONPATH=$src .venv/bin/python -m dsched bench --workloads tree-14,merge-25k \
            --setups zero-8 --schedulers dsched --repeats 1 --no-plots \
            --out "$OUT/$side-$round" >"$OUT/$side-$round.log" 2>&1
    done
done
