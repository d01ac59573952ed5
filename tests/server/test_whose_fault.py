"""Whose fault: a peer's bad message vs a bug of ours, against a real in-process scheduler.

A bad message gets the peer an ``error`` message and the log a warning, and its stream goes
on. A bug of ours (here: the state machine raising ``InvalidTransition`` for one key) is
logged loudly with the key's story, the stream that triggered it is closed, and everyone
else keeps being served. Every test runs its own event loop and binds only 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from dsched.comm import CommClosedError
from dsched.comm.tcp import Comm, connect
from dsched.policy import PolicyConfig, make_policy
from dsched.server.scheduler import Scheduler
from dsched.state import InvalidTransition
from dsched.state import events as ev

pytestmark = pytest.mark.timeout(30)
READ_TIMEOUT = 10


def run(test: Callable[[Scheduler], Awaitable[None]]) -> None:
    async def main() -> None:
        scheduler = Scheduler(make_policy("dask", PolicyConfig()), host="127.0.0.1", port=0)
        await scheduler.start()
        try:
            await test(scheduler)
        finally:
            await scheduler.close()

    asyncio.run(asyncio.wait_for(main(), 20))


async def client_stream(scheduler: Scheduler, client: str) -> Comm:
    comm = await connect(scheduler.address)
    comm.write({"op": "register-client", "client": client, "reply": False})
    assert list(await asyncio.wait_for(comm.read(), READ_TIMEOUT)) == [{"op": "stream-start"}]
    return comm


async def read_until(comm: Comm, op: str) -> dict[str, Any]:
    async with asyncio.timeout(READ_TIMEOUT):
        while True:
            for msg in await comm.read():  # type: ignore[attr-defined]
                if msg.get("op") == op:
                    return dict(msg)


def test_a_bad_message_gets_the_peer_an_error_and_the_stream_goes_on(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def test(scheduler: Scheduler) -> None:
        comm = await client_stream(scheduler, "c1")
        comm.write([{"op": "report-key", "key": {"not": "a key"}}])
        error = await read_until(comm, "error")
        assert "'report-key' from c1: field 'key'" in error["exception"]
        comm.write([{"op": "report-key", "key": "unknown-key"}])
        cancelled = await read_until(comm, "cancelled-keys")  # still served, in order
        assert list(cancelled["keys"]) == ["unknown-key"]
        comm.abort()

    with caplog.at_level(logging.WARNING, logger="dsched.scheduler"):
        run(test)
    assert "bad stream message from c1" in caplog.text
    assert "internal error" not in caplog.text


def test_our_own_bug_is_logged_with_the_story_and_closes_only_that_stream(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def test(scheduler: Scheduler) -> None:
        state = scheduler.state
        real_handle = state.handle

        def buggy_handle(event: ev.Event, now: float, out: Any = None) -> Any:
            if isinstance(event, ev.ReportKey) and event.key == "trigger-bug":
                raise InvalidTransition("injected: released -> nonsense")
            return real_handle(event, now, out)

        state.handle = buggy_handle  # type: ignore[method-assign]
        victim = await client_stream(scheduler, "victim")
        bystander = await client_stream(scheduler, "bystander")
        victim.write([{"op": "report-key", "key": "trigger-bug"}])
        with pytest.raises(CommClosedError):
            async with asyncio.timeout(READ_TIMEOUT):
                while True:
                    await victim.read()
        bystander.write([{"op": "report-key", "key": "other"}])
        assert list((await read_until(bystander, "cancelled-keys"))["keys"]) == ["other"]
        bystander.abort()

    with caplog.at_level(logging.WARNING, logger="dsched.scheduler"):
        run(test)
    record = next(r for r in caplog.records if "internal error" in r.getMessage())
    assert record.levelno == logging.ERROR
    assert "not the peer's fault" in record.getMessage()
    assert "'trigger-bug'" in record.getMessage()  # the story of the key involved
    assert "bad stream message" not in caplog.text  # never blamed on the peer


def test_a_message_that_cannot_be_encoded_fails_its_task_instead_of_vanishing(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A run_spec nothing can encode (a lock: not picklable): the compute-task cannot be
    sent, so the task errs, the client is told, and the rest of the batch still goes."""

    async def test(scheduler: Scheduler) -> None:
        client = await client_stream(scheduler, "c")
        worker = await connect(scheduler.address)
        worker.write(
            {"op": "register-worker", "reply": False, "address": "tcp://127.0.0.1:1",
             "nthreads": 1, "name": "raw-worker", "memory_limit": 0}
        )
        assert (await asyncio.wait_for(worker.read(), READ_TIMEOUT))["status"] == "OK"
        tasks = [ev.NewTask("bad", (), threading.Lock(), {}), ev.NewTask("good", (), b"x", {})]
        scheduler.reactor.handle(ev.GraphReceived("c", tasks, ["bad", "good"], {}))
        erred = await read_until(client, "task-erred")
        assert erred["key"] == "bad"
        computed: list[Any] = []
        async with asyncio.timeout(READ_TIMEOUT):
            while not computed:
                computed = [m for m in await worker.read() if m.get("op") == "compute-task"]
        assert [m["key"] for m in computed] == ["good"]
        assert scheduler.state.tasks["bad"].state == "erred"
        client.abort()
        worker.abort()

    with caplog.at_level(logging.WARNING, logger="dsched.scheduler"):
        run(test)
    assert "could not encode a 'compute-task' message" in caplog.text
