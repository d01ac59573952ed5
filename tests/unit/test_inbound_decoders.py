"""Worker stream messages -> state events (``dsched.core.inbound``): the task-finished fast
path decodes exactly as the checked path, and hands everything unusual to it."""

from __future__ import annotations

from typing import Any

import pytest

from dsched.core import inbound
from dsched.core.errors import BadMessage
from dsched.state import events as ev

W = "tcp://127.0.0.1:40001"


def finished(**fields: Any) -> dict[str, Any]:
    msg: dict[str, Any] = {
        "op": "task-finished",
        "status": "OK",
        "key": "inc-1",
        "run_id": 3,
        "nbytes": 28,
        "type": b"pickled-int",
        "typename": "int",
        "metadata": {},
        "thread": 1,
        "startstops": ({"action": "compute", "start": 1.0, "stop": 1.25},),
        "stimulus_id": "task-finished-1.3",
    }
    msg.update(fields)
    return msg


def decode(msg: dict[str, Any]) -> ev.Event | None:
    return inbound.WORKER_DECODERS["task-finished"](W, msg)


@pytest.mark.parametrize(
    "fields",
    [
        {},
        {"startstops": ()},
        {"nbytes": 0, "type": None},
        # The checked path's cases: each field decodes as before.
        {"key": ("x", 1)},
        {"run_id": None},
        {"nbytes": 12.0},
        {"stimulus_id": 7},
    ],
)
def test_task_finished_decodes_as_the_checked_path(fields: dict[str, Any]) -> None:
    msg = finished(**fields)
    event = decode(msg)
    assert event == inbound._task_finished_checked(W, msg)
    assert isinstance(event, ev.TaskFinished)
    assert event.msg is msg


def test_task_finished_fields_as_a_worker_sends_them() -> None:
    event = decode(finished())
    assert event == ev.TaskFinished(
        W, "inc-1", 3, 28, b"pickled-int", 0.25, "task-finished-1.3", finished()
    )


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"key": ["a", "list"]}, "key"),
        ({"run_id": True}, "run_id"),
        ({"run_id": "3"}, "run_id"),
        ({"nbytes": -1}, "nbytes"),
        ({"nbytes": "many"}, "nbytes"),
    ],
)
def test_bad_task_finished_fields_are_the_peers_fault(fields: dict[str, Any], field: str) -> None:
    with pytest.raises(BadMessage, match=field):
        decode(finished(**fields))


def test_a_task_finished_without_a_key_is_the_peers_fault() -> None:
    msg = finished()
    del msg["key"]
    with pytest.raises(BadMessage, match="key"):
        decode(msg)
