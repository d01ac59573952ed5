"""ConnectionPool.discard aborts conversations in progress with a peer that went silent."""

from __future__ import annotations

import asyncio

import pytest

from dsched.comm import CommClosedError, ConnectionPool, listen
from dsched.comm.tcp import Comm

pytestmark = pytest.mark.timeout(30)


def test_discard_aborts_a_request_waiting_on_a_silent_peer() -> None:
    async def main() -> None:
        async def never_answers(comm: Comm) -> None:
            while True:
                await comm.read()  # takes requests, replies to none (a frozen worker)

        listener = await listen("127.0.0.1", 0, never_answers)
        pool = ConnectionPool()
        waiting = asyncio.ensure_future(pool.rpc(listener.address, {"op": "get_data"}))
        await asyncio.sleep(0.2)
        assert not waiting.done()
        pool.discard(listener.address)  # e.g. the worker was removed by worker-ttl
        with pytest.raises(CommClosedError):
            await asyncio.wait_for(waiting, 5)
        assert pool.idle_count(listener.address) == 0
        await pool.close()
        await listener.stop()

    asyncio.run(main())
