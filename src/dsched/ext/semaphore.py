"""Distributed semaphores and locks (``distributed.Semaphore``, ``distributed.Lock``).

Theory of operation
-------------------
Dask's ``SemaphoreExtension`` (distributed/semaphore.py:23-245); a ``Lock`` is a Semaphore
with ``max_leases=1`` whose ``locked()`` is ``semaphore_value == 1`` (lock.py:13-97). State:

* ``max_leases`` / ``lease_timeouts``: one entry per registered semaphore. ``max_leases`` is
  the point of truth for "registered" (semaphore.py:76-88, 119-122): ``semaphore_register``
  creates it (AssertionError unless ``max_leases`` is an int) or checks that ``max_leases``
  matches (ValueError "Inconsistent max leases: ..."). ``lease_timeout`` comes from the *client's*
  ``distributed.scheduler.locks.lease-timeout`` (None for "inf"; semaphore.py:400-416).
* ``leases``: name -> {lease id: last seen}, independent of registration, as in Dask (a
  refresh of an unknown name creates leases that count in ``semaphore_value``; closing
  drops them).

Requests (clients and tasks alike: tasks reach these through their worker's scheduler RPC):

* ``semaphore_acquire(name, timeout, lease_id)``: RuntimeError "Semaphore or Lock `x` not
  known." for an unregistered name. A lease is granted when ``lease_id`` already holds one
  (retries are idempotent) or fewer than ``max_leases`` are held; otherwise the request
  parks in arrival order until a release or an expiry frees a lease (answered True) or its
  deadline passes (a ``SetTimer``; answered False; a timeout <= 0 answers False at once).
  Dask wakes every waiter on each release and lets them race; its waiters retry in the
  order they parked, so serving them in that order on the spot is the same outcome.
* ``semaphore_release(name, lease_id)``: frees the lease; an unknown semaphore or a lease
  not held (released twice, or expired) is only a warning in the log (semaphore.py:171-194).
  Always answers None.
* ``semaphore_value(name)``: the number of leases held (0 for an unknown name).
* ``semaphore_refresh_leases(name, lease_ids)``: stamps each lease with ``now``; an unknown
  lease is *created* (after a critical log line: semaphore.py:90-101), as in Dask.
* ``semaphore_close(name)``: forgets the semaphore and its leases without telling holders.
  Acquires parked on it stay parked but are never served (Dask deletes the asyncio.Event
  they wait on): only their timeout answers them (False).

Lease expiry: Dask checks every lease every ``distributed.scheduler.locks.lease-validation-
interval`` (a periodic callback, semaphore.py:64-71, 196-217) and releases those not
refreshed for more than their semaphore's lease_timeout, which wakes the waiters. Here the
check is a timer armed while there are leases that can expire (a semaphore with a truthy
lease_timeout holding leases) and re-armed every interval while there still are, so an
idle scheduler has no timer; an unrefreshed lease goes between lease_timeout and
lease_timeout + interval after its last refresh, as in Dask.

A parked acquire whose peer went away is forgotten. (Dask cannot notice: it would still
grant that acquire a lease, which nobody refreshes, so the lease would block others until
it expires.)
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from typing import Any, ClassVar, Final

from dsched.ext.protocol import (
    CancelTimer,
    Effect,
    Effects,
    Extension,
    Log,
    Reply,
    Request,
    SetTimer,
)
from dsched.ext.requests import (
    PARKED,
    dask_args,
    dask_signature,
    deadline,
    deadline_timer,
    expired,
    serve,
)

VALIDATION_INTERVAL_KEY: Final = "distributed.scheduler.locks.lease-validation-interval"
_CHECK: Final = ("check-leases",)


@dask_signature("SemaphoreExtension.create")
def _create(name: Any, max_leases: Any, lease_timeout: Any) -> tuple[Any, Any, Any]:
    return name, max_leases, lease_timeout


@dask_signature("SemaphoreExtension.acquire")
def _acquire(name: Any = None, timeout: Any = None, lease_id: Any = None) -> tuple[Any, Any, Any]:
    return name, timeout, lease_id


@dask_signature("SemaphoreExtension.release")
def _release(name: Any = None, lease_id: Any = None) -> tuple[Any, Any]:
    return name, lease_id


@dask_signature("SemaphoreExtension.close")
def _close(name: Any = None) -> Any:
    return name


@dask_signature("SemaphoreExtension.refresh_leases")
def _refresh_leases(name: Any = None, lease_ids: Any = None) -> tuple[Any, Any]:
    return name, lease_ids


@dask_signature("SemaphoreExtension.get_value")
def _get_value(name: Any = None) -> Any:
    return name


class _Acquire:
    """A parked ``semaphore_acquire``."""

    __slots__ = ("lease_id", "name", "request", "timed")

    def __init__(self, request: int, name: Hashable, lease_id: Hashable, timed: bool) -> None:
        self.request = request
        self.name = name
        self.lease_id = lease_id
        self.timed = timed


class Semaphores(Extension):
    name = "semaphores"
    rpc_ops: ClassVar = {
        "semaphore_register": "rpc_register",
        "semaphore_acquire": "rpc_acquire",
        "semaphore_release": "rpc_release",
        "semaphore_close": "rpc_close",
        "semaphore_refresh_leases": "rpc_refresh_leases",
        "semaphore_value": "rpc_value",
    }

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> Semaphores:
        """The registry's factory: the lease-validation interval, parsed as Dask does."""
        from dask.utils import parse_timedelta

        interval = parse_timedelta(config[VALIDATION_INTERVAL_KEY], default="s")
        return cls(validation_interval=float(interval) if interval is not None else 0.0)

    def __init__(self, validation_interval: float = 10.0) -> None:
        if not validation_interval > 0:
            # Dask's PeriodicCallback refuses it, and the scheduler does not start.
            raise ValueError(
                f"{VALIDATION_INTERVAL_KEY} must be positive, got {validation_interval!r}"
            )
        self.validation_interval = float(validation_interval)
        self.max_leases: dict[Hashable, int] = {}
        self.lease_timeouts: dict[Hashable, Any] = {}
        self.leases: dict[Hashable, dict[Hashable, float]] = {}
        # name -> parked acquires of the registered semaphore, in arrival order
        self.waiting: dict[Hashable, dict[int, _Acquire]] = {}
        # every parked acquire, including those orphaned by a close
        self._parked: dict[int, _Acquire] = {}
        self._check_at: float | None = None

    # ------------------------------------------------------------------ requests
    def rpc_register(self, request: Request, now: float) -> Effects:
        return serve(request, now, self._register)

    def _register(self, request: Request, now: float, effects: list[Effect]) -> Any:
        name, max_leases, lease_timeout = dask_args(_create, request.args, unpickle=True)
        if name not in self.max_leases:
            if not isinstance(max_leases, int):
                raise AssertionError(max_leases)
            self.max_leases[name] = max_leases
            self.lease_timeouts[name] = lease_timeout
            if self.leases.get(name):  # leases refreshed before the register
                self._arm(name, now, effects)
        elif max_leases != self.max_leases[name]:
            raise ValueError(
                f"Inconsistent max leases: {max_leases}, expected: {self.max_leases[name]}"
            )
        return None

    def rpc_acquire(self, request: Request, now: float) -> Effects:
        return serve(request, now, self._acquire)

    def _acquire(self, request: Request, now: float, effects: list[Effect]) -> Any:
        name, timeout, lease_id = dask_args(_acquire, request.args, unpickle=True)
        if name not in self.max_leases:
            raise RuntimeError(f"Semaphore or Lock `{name}` not known.")
        at = deadline(now, timeout)
        if self._get_lease(name, lease_id, now, effects):
            return True
        if expired(at, now):
            return False
        timers = deadline_timer(("acquire", request.id), at)
        waiter = _Acquire(request.id, name, lease_id, bool(timers))
        self.waiting.setdefault(name, {})[request.id] = waiter
        self._parked[request.id] = waiter
        effects.extend(timers)
        return PARKED

    def rpc_release(self, request: Request, now: float) -> Effects:
        return serve(request, now, self._release)

    def _release(self, request: Request, now: float, effects: list[Effect]) -> Any:
        name, lease_id = dask_args(_release, request.args, unpickle=True)
        if name not in self.max_leases:
            effects.append(
                Log("warning", f"Tried to release Lock or Semaphore `{name}` but it is not known.")
            )
            return None
        if name in self.leases and lease_id in self.leases[name]:
            del self.leases[name][lease_id]
            self._serve_waiters(name, now, effects)
        else:
            effects.append(
                Log(
                    "warning",
                    f"Tried to release Lock or Semaphore but it was already released: "
                    f"{name=}, {lease_id=}. "
                    f"This can happen if the Lock or Semaphore timed out before.",
                )
            )
        return None

    def rpc_value(self, request: Request, now: float) -> Effects:
        return serve(request, now, self._value)

    def _value(self, request: Request, now: float, effects: list[Effect]) -> Any:
        name = dask_args(_get_value, request.args, unpickle=True)
        return len(self.leases.get(name, ()))

    def rpc_refresh_leases(self, request: Request, now: float) -> Effects:
        return serve(request, now, self._refresh_leases)

    def _refresh_leases(self, request: Request, now: float, effects: list[Effect]) -> Any:
        name, lease_ids = dask_args(_refresh_leases, request.args, unpickle=True)
        for id_ in lease_ids:
            leases = self.leases.setdefault(name, {})
            if id_ not in leases:
                effects.append(
                    Log(
                        "error",
                        f"Refreshing an unknown lease ID {id_} for {name}. This might be due "
                        f"to leases timing out and may cause overbooking of the semaphore!"
                        f"This is often caused by long-running GIL-holding in the task which "
                        f"acquired the lease.",
                    )
                )
            leases[id_] = now
            self._arm(name, now, effects)
        return None

    def rpc_close(self, request: Request, now: float) -> Effects:
        return serve(request, now, self._close)

    def _close(self, request: Request, now: float, effects: list[Effect]) -> Any:
        name = dask_args(_close, request.args, unpickle=True)
        if name not in self.max_leases:
            return None
        del self.max_leases[name]
        del self.lease_timeouts[name]
        # Parked acquires stay parked (only their timeouts answer them), never served.
        orphans = self.waiting.pop(name, {})
        leases = self.leases.get(name)
        if leases is not None:
            if leases:
                effects.append(
                    Log(
                        "warning",
                        f"Closing semaphore {name} but there remain unreleased leases "
                        f"{sorted(leases)}",  # type: ignore[type-var]  # Dask's own sort
                    )
                )
            del self.leases[name]
        if orphans:
            effects.append(
                Log("warning", f"Closing semaphore {name} but there remain pending leases")
            )
        return None

    # ------------------------------------------------------------------ leases
    def _get_lease(
        self, name: Hashable, lease_id: Hashable, now: float, effects: list[Effect]
    ) -> bool:
        """semaphore.py:103-117: grant (or renew) ``lease_id`` if it holds one or one is free."""
        leases = self.leases.setdefault(name, {})
        if lease_id in leases or len(leases) < self.max_leases[name]:
            leases[lease_id] = now
            self._arm(name, now, effects)
            return True
        return False

    def _serve_waiters(self, name: Hashable, now: float, effects: list[Effect]) -> None:
        """Leases of ``name`` were freed: the parked acquires try again, oldest first."""
        waiting = self.waiting.get(name)
        if not waiting:
            return
        for request, waiter in list(waiting.items()):
            if self._get_lease(name, waiter.lease_id, now, effects):
                del waiting[request]
                del self._parked[request]
                effects.append(Reply(request, True))
                if waiter.timed:
                    effects.append(CancelTimer(("acquire", request)))
        if not waiting:
            del self.waiting[name]

    def _arm(self, name: Hashable, now: float, effects: list[Effect]) -> None:
        """Leases of ``name`` can now expire: make sure the validation timer runs."""
        if self._check_at is None and self.lease_timeouts.get(name):
            self._check_at = now + self.validation_interval
            effects.append(SetTimer(_CHECK, self._check_at))

    def _check_lease_timeouts(self, now: float, effects: list[Effect]) -> None:
        """semaphore.py:196-217: release every lease not refreshed within its timeout."""
        expiring = False
        for name in list(self.leases):
            lease_timeout = self.lease_timeouts.get(name)
            if not lease_timeout:
                continue
            leases = self.leases[name]
            freed = False
            for id_, last_seen in list(leases.items()):
                try:
                    timed_out = now - last_seen > lease_timeout
                except TypeError as exc:
                    # An ill-typed lease_timeout from a garbage register. Dask's periodic
                    # check would raise here and skip every semaphore after this one, each
                    # time; only this one is skipped here.
                    effects.append(Log("error", f"cannot expire leases of {name!r}: {exc}"))
                    break
                if timed_out:
                    effects.append(
                        Log(
                            "debug",
                            f"Lease {id_} for {name} timed out after {now - last_seen}s.",
                        )
                    )
                    del leases[id_]
                    freed = True
            if freed:
                self._serve_waiters(name, now, effects)
            expiring = expiring or bool(leases)
        if expiring:
            self._check_at = now + self.validation_interval
            effects.append(SetTimer(_CHECK, self._check_at))

    # ------------------------------------------------------------------ timers, drops
    def on_timer(self, token: Hashable, now: float) -> Effects:
        effects: list[Effect] = []
        if token == _CHECK:
            self._check_at = None
            self._check_lease_timeouts(now, effects)
        elif isinstance(token, tuple) and len(token) == 2 and token[0] == "acquire":
            waiter = self._leave(token[1])
            if waiter is not None:
                effects.append(Reply(waiter.request, False))
        return effects

    def on_request_dropped(self, request: int, now: float) -> Effects:
        waiter = self._leave(request)
        if waiter is not None and waiter.timed:
            return [CancelTimer(("acquire", request))]
        return ()

    def _leave(self, request: int) -> _Acquire | None:
        waiter = self._parked.pop(request, None)
        if waiter is None:
            return None
        waiting = self.waiting.get(waiter.name)
        if waiting is not None and waiting.get(request) is waiter:
            del waiting[request]
            if not waiting:
                del self.waiting[waiter.name]
        return waiter

    # ------------------------------------------------------------------ checking
    def validate(self) -> None:
        """The invariants (for tests)."""
        for name, waiting in self.waiting.items():
            assert waiting, f"empty waiting list for {name!r}"
            assert name in self.max_leases, f"waiters on unregistered {name!r}"
            held = self.leases.get(name, {})
            assert len(held) >= self.max_leases[name], f"{name!r} has waiters and free leases"
            for request, waiter in waiting.items():
                # (its lease id may hold a lease: a retry of it got one meanwhile)
                assert self._parked.get(request) is waiter
        assert self.max_leases.keys() == self.lease_timeouts.keys()
        expiring = any(self.lease_timeouts.get(n) and held for n, held in self.leases.items())
        assert not expiring or self._check_at is not None, "leases can expire, no timer"
