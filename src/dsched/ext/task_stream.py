"""The task stream: ``get_task_stream`` and ``get_task_stream_index``, as Dask's
``TaskStreamPlugin`` records them.

Theory of operation
-------------------
Dask adds its ``TaskStreamPlugin`` on the first ``get_task_stream`` or
``get_task_stream_index`` call (the dashboard aside), and from then on appends one record
per task that a worker reported finished or erred, for the transitions
``processing -> memory`` and ``processing -> erred`` only (a retried failure, a stale or a
duplicate result makes none). So does this extension: it is *inactive* until the first of
those calls, and until then it observes nothing: the first call subscribes it to
``TaskFinished`` / ``TaskErred`` (the ``Observe`` effect), so an unused task stream costs
nothing per task.

A record is what Dask's plugin gets as the transition's keyword arguments, plus ``key``:
the worker's message (``nbytes``, ``type``, ``typename``, ``metadata``, ``thread``,
``startstops``, ``status`` for a result; ``exception``, ``traceback``,
``exception_text``, ``traceback_text``, ``thread``, ``startstops``, ``status`` for an
error, plus ``cause`` = the key), ``worker`` and ``stimulus_id``. Records without
``startstops`` are skipped, as Dask's plugin (which asserts them) skips them. The
message is the decoded event's ``msg`` (a reference, no copy on the hot path).

Whether the event made the transition is read from the state machine's transition log:
every move of one event carries its stimulus id and its ``now``, so the moves of the event
are the newest entries with that ``now``; a result counts if they hold
``(key, processing, memory)`` (or ``erred``); an event that moved more tasks than the log
holds (``distributed.admin.low-level-log-length``) is judged by its task's state
(``Engine.finished_just_now``, which the dashboard's task stream uses too).

The buffer is a deque of ``max(distributed.scheduler.dashboard.status.task-stream-length,
...tasks.task-stream-length)`` records; ``index`` counts every record ever appended (the
context manager's cursor). ``collect`` is Dask's: by ``start_index``, or by ``start`` /
``stop`` (seconds since the epoch, or a time before ``now`` such as ``"10s"``) bisected
on each record's latest ``startstops`` stop, and ``count``.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping
from itertools import islice
from typing import Any, ClassVar

from dask.utils import parse_timedelta

from dsched.ext.protocol import NO_EFFECTS, Effect, Effects, Extension, Observe, Reply, Request
from dsched.state import events as ev
from dsched.state.edges import ERRED, MEMORY
from dsched.state.machine import stimulus_id_of

TASK_STREAM_LENGTH = 100_000
_NOT_RECORDED = frozenset({"op", "run_id", "key"})


class TaskStream(Extension):
    name = "task-stream"
    rpc_ops: ClassVar = {
        "get_task_stream": "get_task_stream",
        "get_task_stream_index": "get_task_stream_index",
    }
    # Nothing until first used (see ``_activate``).
    observes = frozenset()

    def __init__(self, maxlen: int = TASK_STREAM_LENGTH) -> None:
        self.buffer: deque[dict[str, Any]] = deque(maxlen=maxlen)
        self.index = 0
        self.active = False

    @classmethod
    def from_config(cls, values: Mapping[str, Any]) -> TaskStream:
        return cls(
            max(
                int(values["distributed.scheduler.dashboard.status.task-stream-length"]),
                int(values["distributed.scheduler.dashboard.tasks.task-stream-length"]),
            )
        )

    # ------------------------------------------------------------------ recording
    def on_event(self, event: ev.Event, now: float) -> Effects:
        if not self.active:
            return NO_EFFECTS
        if isinstance(event, ev.TaskFinished):
            finish = MEMORY
        elif isinstance(event, ev.TaskErred):
            finish = ERRED
        else:
            return NO_EFFECTS
        msg = event.msg
        if msg is None or not msg.get("startstops"):
            return NO_EFFECTS
        stimulus_id = stimulus_id_of(event, now)
        if not self.state.finished_just_now(event.key, finish, stimulus_id, now):
            return NO_EFFECTS
        record: dict[str, Any] = {"stimulus_id": stimulus_id}
        if finish == ERRED:
            record["cause"] = event.key
        record["worker"] = event.worker
        if finish == MEMORY:
            record["metadata"] = msg.get("metadata")
        record.update((name, value) for name, value in msg.items() if name not in _NOT_RECORDED)
        record["key"] = event.key
        self.buffer.append(record)
        self.index += 1
        return NO_EFFECTS

    # ------------------------------------------------------------------ the ops
    def _activate(self) -> list[Effect]:
        if self.active:
            return []
        self.active = True
        return [Observe(frozenset({ev.TaskFinished, ev.TaskErred}))]

    def get_task_stream_index(self, request: Request, now: float) -> Effects:
        return [*self._activate(), Reply(request.id, self.index)]

    def get_task_stream(self, request: Request, now: float) -> Effects:
        activation = self._activate()
        args = request.args
        records = self.collect(
            now,
            start=args.get("start"),
            stop=args.get("stop"),
            count=args.get("count"),
            start_index=args.get("start_index"),
        )
        return [*activation, Reply(request.id, records)]

    def collect(
        self,
        now: float,
        start: str | float | None = None,
        stop: str | float | None = None,
        count: int | None = None,
        start_index: int | None = None,
    ) -> list[dict[str, Any]]:
        """Dask's ``TaskStreamPlugin.collect``, with ``now`` for its clock."""
        buffer = self.buffer
        if start_index is not None:
            offset = start_index - (self.index - len(buffer))
            return list(islice(buffer, max(0, min(offset, len(buffer))), None))

        def bisect(target: float, left: int, right: int) -> int:
            while left != right:
                mid = (left + right) // 2
                latest = max(startstop["stop"] for startstop in buffer[mid]["startstops"])
                if latest < target:
                    left = mid + 1
                else:
                    right = mid
            return left

        first: int | None = None
        last: int | None = None
        if isinstance(start, str):
            start = now - float(parse_timedelta(start))
        if start is not None:
            first = bisect(start, 0, len(buffer))
        if isinstance(stop, str):
            stop = now - float(parse_timedelta(stop))
        if stop is not None:
            last = bisect(stop, 0, len(buffer))
        if count is not None:
            if first is None and last is None:
                last = len(buffer)
                first = last - count
            elif first is None and last is not None:
                first = last - count
            elif first is not None and last is None:
                last = first + count
        if last is None:
            last = len(buffer)
        if first is None:
            first = 0
        first = max(0, first)
        last = min(last, len(buffer))
        return list(islice(buffer, first, max(first, last)))
