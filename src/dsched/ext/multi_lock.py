"""Multi-locks (``distributed.MultiLock``): ``multi_lock_acquire`` and ``multi_lock_release``.

Theory of operation
-------------------
Dask's ``MultiLockExtension`` (distributed/multi_lock.py:18-136), transliterated: the same
state, and the same operations in the same order, so that odd requests end the same way
(the same exception, the same state left behind) as on the stock scheduler.

* ``locks``: lock name -> the ids of the ``MultiLock`` instances queued on it; the first one
  holds it. ``requests``: id -> the lock names it still queues on or holds;
  ``requests_left``: id -> how many more locks it needs.
* ``multi_lock_acquire(locks, id, timeout, num_locks)`` queues ``id`` on every lock, least
  contended first, and answers True at once if ``num_locks`` of them were free; a request
  that gets all it needs that way leaves the queues of the remaining locks
  (multi_lock.py:49-80, 114-133). Otherwise it parks until enough locks come to it
  (answered True) or its timeout passes (a ``SetTimer``; it leaves every queue it is in,
  possibly handing locks on, and is answered False; a timeout <= 0 does that at once).
* ``multi_lock_release(id)`` leaves every queue of ``id`` (multi_lock.py:82-112, 134-136):
  each lock it held goes to the next in line, and any waiter that now has all it needs is
  answered True. An unknown id is a KeyError, as in Dask.

Dask wakes a ready waiter with ``loop.add_callback(event.set)``; here it is answered in the
same step. The one place this shows is a waiter that becomes "ready" a second time (a
``num_locks`` < ``len(locks)`` waiter reaching the front of a further queue after it was
answered): Dask then raises KeyError in whichever request caused it, once the waiter's
event is gone; so does this, after answering every other waiter made ready by it (Dask
stops at the first missing one in set order).

A parked acquire whose peer went away leaves its queues as on a timeout, unanswered. (Dask
cannot notice: that acquire would get its locks when they came free and keep them forever,
as multi-locks have no lease timeout.)
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from typing import Any, ClassVar

from dsched.ext.protocol import CancelTimer, Effect, Effects, Extension, Fail, Log, Reply, Request
from dsched.ext.requests import (
    PARKED,
    dask_args,
    dask_signature,
    deadline,
    deadline_timer,
    expired,
    serve,
)


@dask_signature("MultiLockExtension.acquire")
def _acquire(
    locks: Any = None, id: Any = None, timeout: Any = None, num_locks: Any = None
) -> tuple[Any, Any, Any, Any]:
    return locks, id, timeout, num_locks


@dask_signature("MultiLockExtension.release")
def _release(id: Any = None) -> Any:
    return id


class _Waiter:
    """A parked ``multi_lock_acquire`` (Dask's ``events[id]``)."""

    __slots__ = ("id", "locks", "request", "timed")

    def __init__(self, request: int, id: Hashable, locks: Any, timed: bool) -> None:
        self.request = request
        self.id = id
        self.locks = locks  # as the request gave them: a timeout leaves exactly these queues
        self.timed = timed


class MultiLocks(Extension):
    name = "multi_locks"
    rpc_ops: ClassVar = {
        "multi_lock_acquire": "rpc_acquire",
        "multi_lock_release": "rpc_release",
    }

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> MultiLocks:
        """The registry's factory (``dsched.ext.registry``): nothing to configure."""
        return cls()

    def __init__(self) -> None:
        self.locks: dict[Hashable, list[Hashable]] = {}  # lock -> ids (no empty lists)
        self.requests: dict[Hashable, set[Hashable]] = {}  # id -> locks
        self.requests_left: dict[Hashable, int] = {}  # id -> locks still needed
        self.events: dict[Hashable, _Waiter] = {}  # id -> its parked acquire
        self._parked: dict[int, _Waiter] = {}  # request id -> parked acquire

    # ------------------------------------------------------------------ requests
    def rpc_acquire(self, request: Request, now: float) -> Effects:
        return serve(request, now, self._acquire)

    def _acquire(self, request: Request, now: float, effects: list[Effect]) -> Any:
        locks, id, timeout, num_locks = dask_args(_acquire, request.args, unpickle=True)
        if self._request_locks(locks, id, num_locks):
            return True
        assert id not in self.events
        # Dask computes the deadline once it waits (``asyncio.timeout`` on entry), so an
        # ill-typed timeout fails here, leaving ``id`` queued, as there.
        at = deadline(now, timeout)
        if expired(at, now):
            self._retain_locks(locks, id, effects)
            return False
        timers = deadline_timer(("acquire", request.id), at)
        waiter = _Waiter(request.id, id, locks, bool(timers))
        self.events[id] = waiter
        self._parked[request.id] = waiter
        effects.extend(timers)
        return PARKED

    def rpc_release(self, request: Request, now: float) -> Effects:
        return serve(request, now, self._release)

    def _release(self, request: Request, now: float, effects: list[Effect]) -> Any:
        id = dask_args(_release, request.args, unpickle=True)
        self._retain_locks(self.requests[id], id, effects)
        return None

    # ------------------------------------------------------------------ Dask's algorithm
    def _request_locks(self, locks: Any, id: Any, num_locks: Any) -> bool:
        """multi_lock.py:49-80: queue ``id`` on ``locks``; whether it got ``num_locks``."""
        assert id not in self.requests
        self.requests[id] = set(locks)
        assert len(locks) >= num_locks > 0
        self.requests_left[id] = num_locks

        locks = sorted(locks, key=lambda x: len(self.locks.get(x, ())))
        for i, lock in enumerate(locks):
            queue = self.locks.setdefault(lock, [])
            queue.append(id)
            if len(queue) == 1:  # the lock was free
                self.requests_left[id] -= 1
                if self.requests_left[id] == 0:  # got all the locks needed
                    self.requests[id] -= set(locks[i + 1 :])
                    return True
        return False

    def _retain_locks(self, locks: Any, id: Any, effects: list[Effect]) -> None:
        """multi_lock.py:82-112: leave the queues of ``locks``, handing held locks on."""
        waiters_ready: dict[Hashable, None] = {}
        for lock in locks:
            queue = self.locks.get(lock)
            if not queue:
                raise IndexError("list index out of range")  # Dask's ``self.locks[lock][0]``
            if queue[0] == id:
                queue.pop(0)
                if queue:
                    new_first = queue[0]
                    self.requests_left[new_first] -= 1
                    if self.requests_left[new_first] <= 0:
                        # Below zero if more locks came free than it needed.
                        self.requests_left[new_first] = 0
                        waiters_ready[new_first] = None
            else:
                queue.remove(id)
            assert id not in queue
            if not queue:
                del self.locks[lock]
        del self.requests[id]
        del self.requests_left[id]

        missing: list[Hashable] = []
        for ready in waiters_ready:
            waiter = self.events.pop(ready, None)
            if waiter is None:
                missing.append(ready)
                continue
            del self._parked[waiter.request]
            effects.append(Reply(waiter.request, True))
            if waiter.timed:
                effects.append(CancelTimer(("acquire", waiter.request)))
        if missing:
            raise KeyError(missing[0])  # Dask's ``self.events[waiter]``

    # ------------------------------------------------------------------ timers, drops
    def _leave(self, request: int) -> _Waiter | None:
        waiter = self._parked.pop(request, None)
        if waiter is not None and self.events.get(waiter.id) is waiter:
            del self.events[waiter.id]
        return waiter

    def on_timer(self, token: Hashable, now: float) -> Effects:
        if not (isinstance(token, tuple) and len(token) == 2 and token[0] == "acquire"):
            return ()
        waiter = self._parked.get(token[1])
        if waiter is None:
            return ()  # answered or dropped meanwhile
        effects: list[Effect] = []
        try:
            self._retain_locks(waiter.locks, waiter.id, effects)
        except Exception as exc:
            self._leave(waiter.request)
            effects.append(Log("warning", f"multi_lock_acquire timed out and failed: {exc!r}"))
            effects.append(Fail(waiter.request, exc))
            return effects
        self._leave(waiter.request)
        effects.append(Reply(waiter.request, False))
        return effects

    def on_request_dropped(self, request: int, now: float) -> Effects:
        waiter = self._parked.get(request)
        if waiter is None:
            return ()
        effects: list[Effect] = []
        try:
            self._retain_locks(waiter.locks, waiter.id, effects)
        except Exception as exc:
            effects.append(Log("warning", f"dropping a multi_lock_acquire failed: {exc!r}"))
        self._leave(request)
        if waiter.timed:
            effects.append(CancelTimer(("acquire", request)))
        return effects

    # ------------------------------------------------------------------ checking
    def validate(self) -> None:
        """The invariants that hold while every request was well formed (for tests)."""
        for lock, queue in self.locks.items():
            assert queue, f"empty queue for {lock!r}"
            for id in queue:
                assert lock in self.requests[id], f"{id!r} queued on {lock!r} not requested"
        for id, waiter in self.events.items():
            assert self._parked.get(waiter.request) is waiter
            assert self.requests_left[id] > 0, f"{id!r} has its locks but waits"
        assert len(self._parked) == len(self.events)
