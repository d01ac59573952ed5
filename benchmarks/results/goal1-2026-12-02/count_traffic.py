"""Worker preload: count the messages, operations and bytes a `dask worker` reads and writes.

    DASK_DISTRIBUTED__WORKER__PRELOAD='["/path/count_traffic.py"]' dask worker ...

Counters live on ``builtins._g1_traffic`` (a preload module is not in ``sys.modules``);
``snapshot()`` there returns them, for ``client.run``. Cheap: one Counter update per
message and per operation, no logging.
"""

from __future__ import annotations

import builtins
from collections import Counter
from typing import Any

from distributed.comm import tcp

if not hasattr(builtins, "_g1_traffic"):
    state: dict[str, Any] = {
        "read_msgs": 0,
        "read_bytes": 0,
        "write_msgs": 0,
        "write_bytes": 0,
        "read_ops": Counter(),
        "write_ops": Counter(),
        "last": 0,
    }
    builtins._g1_traffic = state  # type: ignore[attr-defined]
    _from_frames = tcp.from_frames
    _to_frames = tcp.to_frames
    _read = tcp.TCP.read
    _write = tcp.TCP.write

    async def from_frames(frames: Any, *args: Any, **kwargs: Any) -> Any:
        state["last"] = sum(memoryview(f).nbytes for f in frames)
        return await _from_frames(frames, *args, **kwargs)

    async def to_frames(*args: Any, **kwargs: Any) -> Any:
        frames = await _to_frames(*args, **kwargs)
        state["write_bytes"] += sum(memoryview(f).nbytes for f in frames)
        return frames

    def _ops(msg: Any, into: Counter[str]) -> None:
        items = msg if isinstance(msg, (list, tuple)) else [msg]
        for item in items:
            if isinstance(item, dict):
                into[str(item.get("op", "reply"))] += 1

    async def read(self: Any, deserializers: Any = None) -> Any:
        msg = await _read(self, deserializers=deserializers)
        state["read_msgs"] += 1
        state["read_bytes"] += state["last"]
        _ops(msg, state["read_ops"])
        return msg

    async def write(self: Any, msg: Any, serializers: Any = None, on_error: str = "message") -> Any:
        state["write_msgs"] += 1
        _ops(msg, state["write_ops"])
        return await _write(self, msg, serializers=serializers, on_error=on_error)

    tcp.from_frames = from_frames
    tcp.to_frames = to_frames
    tcp.TCP.read = read  # type: ignore[method-assign]
    tcp.TCP.write = write  # type: ignore[method-assign]


def snapshot() -> dict[str, Any]:
    s = builtins._g1_traffic  # type: ignore[attr-defined]
    return {k: (dict(v) if isinstance(v, Counter) else v) for k, v in s.items() if k != "last"}


builtins._g1_snapshot = snapshot  # type: ignore[attr-defined]
