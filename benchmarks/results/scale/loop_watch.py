"""Scheduler preload for ``big_graph.py``: the loop's longest stalls, and the CPU in them.

A coroutine on the scheduler's loop sleeps 50 ms at a time; whenever a sleep overruns by
more than ``REPORT_S`` it prints one line with the overrun (wall seconds the loop did not
get back to it) and the CPU the loop thread used meanwhile (``time.thread_time``). On a
loaded machine the wall figure includes time the process waited for a core; the CPU figure
is the loop's own work in that stall, what it would be on a free core. Works under
``dsched scheduler`` and ``dask scheduler`` alike (both run ``dask_setup``).
"""

from __future__ import annotations

import asyncio
import sys
import time
from typing import Any

TICK_S = 0.05
REPORT_S = 0.2


async def _watch() -> None:
    while True:
        wall, cpu = time.perf_counter(), time.thread_time()
        await asyncio.sleep(TICK_S)
        overrun = time.perf_counter() - wall - TICK_S
        if overrun > REPORT_S:
            print(
                f"LOOP-STALL wall={overrun:.3f} cpu={time.thread_time() - cpu:.3f} "
                f"at={time.time():.2f}",
                file=sys.stderr,
                flush=True,
            )


_tasks: list[asyncio.Task[None]] = []


def dask_setup(scheduler: Any) -> None:
    # Kept referenced: the loop holds only a weak reference to a task.
    _tasks.append(asyncio.get_running_loop().create_task(_watch()))
