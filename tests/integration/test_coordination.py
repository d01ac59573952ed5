"""Lock, Semaphore, Event and MultiLock end to end: real Clients and `dask worker`s.

Used from the client and from inside tasks (Lock and Semaphore go through the worker's own
scheduler connection, Event and MultiLock through the worker's client); timeouts; two
clients contending; a client SIGKILLed while holding a lock, whose lease the scheduler
expires (a dedicated cluster with a short lease-validation interval); and ill-typed
requests, which must fail with the stock scheduler's exception type and message.

Every wait is bounded and waits for a condition; names are unique per test, so a failed
test cannot block the next one. ``DSCHED_TEST_SCHEDULER=dask`` runs them against
`dask scheduler`, which is how the expected behaviour was checked.
"""

from __future__ import annotations

import os
import queue
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import dask
import pytest
from distributed import Client, Event, Lock, MultiLock, Semaphore

from dsched.testing.cluster import DASK_SCHEDULER_KINDS, ProcessCluster

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

SCHEDULER_KIND = os.environ.get("DSCHED_TEST_SCHEDULER", "dsched")
CONNECT_TIMEOUT_S = 30
# Bound of every wait that should end (a lock coming free, an event being set).
WAIT_S = 30
# The scheduler of the expiry cluster checks leases this often (Dask's default: 10 s)...
VALIDATION_INTERVAL = "200ms"
# ... and the clients there register their semaphores with this lease timeout.
LEASE_TIMEOUT = "2s"

WaitUntil = Callable[[Callable[[], bool], float, Callable[[], str]], None]


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


# ----------------------------------------------------------------------------- task functions
def hold_lock_until(lock_name: str, event_name: str) -> bool:
    """Take the lock, then keep it until the event is set."""
    with Lock(lock_name):
        Event(f"{event_name}-holding").set()
        return Event(event_name).wait(timeout=WAIT_S)


def critical_section(semaphore: Semaphore, seconds: float) -> tuple[float, float]:
    """Run under the semaphore; returns when the section started and ended."""
    with semaphore:
        start = time.monotonic()
        time.sleep(seconds)  # the work inside the section, not a wait
        return start, time.monotonic()


def wait_for_event(name: str, timeout: float) -> bool:
    return Event(name).wait(timeout=timeout)


def set_event(name: str) -> None:
    Event(name).set()


def multi_lock_section(names: list[str]) -> tuple[float, float]:
    with MultiLock(names):
        start = time.monotonic()
        time.sleep(0.05)  # the work inside the section, not a wait
        return start, time.monotonic()


def assert_disjoint(intervals: list[tuple[float, float]], at_most: int = 1) -> None:
    """No instant is inside more than ``at_most`` of the intervals."""
    points = sorted([(s, 1) for s, _ in intervals] + [(e, -1) for _, e in intervals])
    inside = 0
    for _, delta in points:
        inside += delta
        assert inside <= at_most, f"more than {at_most} at once: {sorted(intervals)}"


def in_thread(function: Callable[[], Any]) -> tuple[threading.Thread, queue.Queue[Any]]:
    """Run ``function`` in a thread; its result (or exception) lands in the queue."""
    results: queue.Queue[Any] = queue.Queue()

    def run() -> None:
        try:
            results.put(function())
        except BaseException as exc:
            results.put(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, results


# ============================================================================ Lock
def test_lock_from_the_client(client: Client) -> None:
    name = unique("lock")
    lock = Lock(name)
    assert lock.acquire(timeout=WAIT_S) is True
    assert lock.locked() is True
    other = Lock(name)
    assert other.acquire(blocking=False) is False
    started = time.monotonic()
    assert other.acquire(timeout=0.5) is False
    assert 0.4 <= time.monotonic() - started < WAIT_S
    assert lock.release() is True
    assert lock.locked() is False
    assert other.acquire(timeout=WAIT_S) is True
    other.release()
    with pytest.raises(RuntimeError, match="Released too often"):
        other.release()  # client-side check
    with Lock(name):
        assert Lock(name).locked()
    assert not Lock(name).locked()


def test_a_task_holds_a_lock_and_the_client_waits_for_it(
    client: Client, wait_until: WaitUntil
) -> None:
    lock_name, event_name = unique("lock"), unique("go")
    future = client.submit(hold_lock_until, lock_name, event_name, pure=False)
    assert Event(f"{event_name}-holding").wait(timeout=WAIT_S), "the task never took the lock"
    lock = Lock(lock_name)
    assert lock.locked()
    assert lock.acquire(timeout=0.2) is False
    waiting, result = in_thread(lambda: lock.acquire(timeout=WAIT_S))
    Event(event_name).set()
    assert future.result(timeout=WAIT_S) is True
    assert result.get(timeout=WAIT_S) is True
    waiting.join(WAIT_S)
    assert lock.locked()
    lock.release()
    del future


def test_tasks_take_turns_under_a_lock(client: Client) -> None:
    name = unique("lock")
    futures = client.map(critical_section, [Lock(name)] * 6, seconds=0.05, pure=False)
    intervals = client.gather(futures)
    assert_disjoint(intervals)
    assert not Lock(name).locked()
    del futures


def test_two_clients_contend_for_a_lock(client: Client, cluster_address: str) -> None:
    name = unique("lock")
    with Client(cluster_address, timeout=CONNECT_TIMEOUT_S, set_as_default=False) as other:
        mine = Lock(name)
        theirs = Lock(name, scheduler_rpc=other.scheduler, loop=other.loop)
        assert mine.acquire(timeout=WAIT_S)
        assert theirs.acquire(timeout=0.2) is False
        waiting, result = in_thread(lambda: theirs.acquire(timeout=WAIT_S))
        mine.release()
        assert result.get(timeout=WAIT_S) is True
        waiting.join(WAIT_S)
        assert mine.acquire(blocking=False) is False
        assert theirs.locked()
        theirs.release()
        assert mine.acquire(blocking=False) is True
        mine.release()


# ============================================================================ Semaphore
def test_semaphore_leases(client: Client) -> None:
    name = unique("sem")
    sem = Semaphore(max_leases=2, name=name)
    assert sem.acquire(timeout=WAIT_S) is True
    assert sem.acquire(timeout=WAIT_S) is True
    assert sem.get_value() == 2
    assert sem.acquire(timeout=0.3) is False
    same = Semaphore(max_leases=2, name=name)
    waiting, result = in_thread(lambda: same.acquire(timeout=WAIT_S))
    assert sem.release() is True
    assert result.get(timeout=WAIT_S) is True
    waiting.join(WAIT_S)
    assert sem.get_value() == 2
    sem.release()
    same.release()
    assert sem.get_value() == 0
    with pytest.raises(RuntimeError, match="Released too often"):
        sem.release()
    sem.close()
    assert sem.get_value() == 0


def test_tasks_share_a_semaphore(client: Client) -> None:
    sem = Semaphore(max_leases=1, name=unique("sem"))
    futures = client.map(critical_section, [sem] * 6, seconds=0.05, pure=False)
    intervals = client.gather(futures)
    assert_disjoint(intervals, at_most=1)
    assert sem.get_value() == 0
    sem.close()
    del futures


def test_closing_a_semaphore_forgets_its_leases(client: Client) -> None:
    name = unique("sem")
    sem = Semaphore(max_leases=1, name=name)
    assert sem.acquire(timeout=WAIT_S)
    sem.close()
    assert sem.get_value() == 0
    fresh = Semaphore(max_leases=1, name=name)
    assert fresh.acquire(timeout=WAIT_S) is True  # registered anew, free
    fresh.release()
    fresh.close()


# ============================================================================ Event
def test_event_from_the_client(client: Client) -> None:
    event = Event(unique("event"))
    assert event.is_set() is False
    started = time.monotonic()
    assert event.wait(timeout=0.5) is False
    assert 0.4 <= time.monotonic() - started < WAIT_S
    assert event.wait(timeout="100ms") is False
    event.set()
    assert event.is_set() is True
    assert event.wait() is True
    assert event.wait(timeout=0) is True
    event.clear()
    assert event.is_set() is False
    assert event.wait(timeout=0) is False


def test_setting_an_event_wakes_waiting_tasks_and_clients(client: Client) -> None:
    name = unique("event")
    # One worker thread waits; the other (two single-threaded workers) runs the setter.
    waiter = client.submit(wait_for_event, name, WAIT_S, pure=False)
    waiting, result = in_thread(lambda: Event(name).wait(timeout=WAIT_S))
    setter = client.submit(set_event, name, pure=False)
    setter.result(timeout=WAIT_S)
    assert waiter.result(timeout=WAIT_S) is True
    assert result.get(timeout=WAIT_S) is True
    waiting.join(WAIT_S)
    assert Event(name).is_set()
    del waiter, setter


def test_a_task_waiting_on_an_event_times_out(client: Client) -> None:
    future = client.submit(wait_for_event, unique("event"), 0.3, pure=False)
    assert future.result(timeout=WAIT_S) is False
    del future


# ============================================================================ MultiLock
def test_multi_lock_from_the_client(client: Client) -> None:
    a, b, c = unique("a"), unique("b"), unique("c")
    first = MultiLock([a, b])
    assert first.acquire(timeout=WAIT_S) is True
    blocked = MultiLock([b, c])
    assert blocked.acquire(timeout=0.3) is False  # and it let go of c
    only_c = MultiLock([c])
    assert only_c.acquire(timeout=0.3) is True
    only_c.release()
    any_one = MultiLock([a, b, unique("d")])
    assert any_one.acquire(timeout=WAIT_S, num_locks=1) is True  # d was free
    any_one.release()
    waiting = MultiLock([a])
    thread, result = in_thread(lambda: waiting.acquire(timeout=WAIT_S))
    first.release()
    assert result.get(timeout=WAIT_S) is True
    thread.join(WAIT_S)
    waiting.release()
    with pytest.raises(ValueError, match="Lock is not yet acquired"):
        waiting.release()  # client-side check


def test_tasks_take_turns_under_a_multi_lock(client: Client) -> None:
    x, y = unique("x"), unique("y")
    futures = client.map(multi_lock_section, [[x, y], [y], [x], [y, x]] * 2, pure=False)
    intervals = client.gather(futures)
    assert_disjoint([intervals[i] for i in range(len(intervals)) if i % 4 != 1])  # all hold x
    assert_disjoint([intervals[i] for i in range(len(intervals)) if i % 4 != 2])  # all hold y
    del futures


# ============================================================================ bad input
def expect_error(exc_type: type[BaseException], message: str, call: Callable[[], Any]) -> None:
    with pytest.raises(exc_type) as info:
        call()
    assert type(info.value) is exc_type
    assert str(info.value) == message


def test_ill_typed_requests_fail_as_on_the_stock_scheduler(client: Client) -> None:
    rpc = client.scheduler
    sync = client.sync
    name = unique("sem")
    Semaphore(max_leases=2, name=name).register()
    expect_error(
        ValueError,
        "Inconsistent max leases: 3, expected: 2",
        lambda: Semaphore(max_leases=3, name=name).acquire(timeout=1),
    )
    expect_error(
        AssertionError, "2", lambda: Semaphore(max_leases="2", name=unique("sem")).register()
    )
    expect_error(
        RuntimeError,
        "Semaphore or Lock `never-registered` not known.",
        lambda: sync(rpc.semaphore_acquire, name="never-registered", lease_id="x"),
    )
    expect_error(
        TypeError,
        "SemaphoreExtension.create() missing 2 required positional arguments: "
        "'max_leases' and 'lease_timeout'",
        lambda: sync(rpc.semaphore_register, name=name),
    )
    expect_error(
        TypeError,
        "unsupported operand type(s) for +: 'float' and 'str'",
        lambda: sync(rpc.semaphore_acquire, name=name, timeout="soon", lease_id="x"),
    )
    expect_error(
        TypeError,
        "'NoneType' object is not iterable",
        lambda: sync(rpc.semaphore_refresh_leases, name=name),
    )
    assert sync(rpc.semaphore_release, name="never-registered", lease_id="x") is None
    assert sync(rpc.semaphore_value, name="never-registered") == 0

    expect_error(TypeError, "unhashable type: 'dict'", lambda: Event({"a": 1}).set())
    expect_error(
        TypeError,
        "unsupported operand type(s) for +: 'float' and 'str'",
        lambda: sync(rpc.event_wait, name=unique("event"), timeout="soon"),
    )
    expect_error(
        TypeError,
        "EventExtension.event_set() got an unexpected keyword argument 'nam'",
        lambda: sync(rpc.event_set, nam="x"),
    )

    expect_error(
        AssertionError, "", lambda: MultiLock([unique("m")]).acquire(timeout=1, num_locks=5)
    )
    expect_error(KeyError, "'nobody'", lambda: sync(rpc.multi_lock_release, id="nobody"))
    expect_error(
        TypeError,
        "'>=' not supported between instances of 'int' and 'NoneType'",
        lambda: sync(rpc.multi_lock_acquire, locks=[unique("m")], id=unique("id")),
    )


# ============================================================================ lease expiry
@pytest.fixture(scope="module")
def expiry_cluster() -> Iterator[ProcessCluster]:
    """A scheduler that validates leases every 200 ms (and one worker: a cluster needs one)."""
    with ProcessCluster(
        scheduler_kind=SCHEDULER_KIND,
        n_workers=1,
        scheduler_env={
            "DASK_DISTRIBUTED__SCHEDULER__LOCKS__LEASE_VALIDATION_INTERVAL": VALIDATION_INTERVAL
        },
        extra_pythonpath=[Path(__file__).parent],
    ) as started:
        yield started


@pytest.fixture
def expiry_client(expiry_cluster: ProcessCluster) -> Iterator[Client]:
    assert expiry_cluster.address is not None
    with (
        dask.config.set({"distributed.scheduler.locks.lease-timeout": LEASE_TIMEOUT}),
        Client(expiry_cluster.address, timeout=CONNECT_TIMEOUT_S) as expiry_client,
    ):
        yield expiry_client


HOLDER = """
import sys
from distributed import Client, Lock
client = Client(sys.argv[1], timeout=30)
assert Lock(sys.argv[2]).acquire(timeout=30)
print("acquired", flush=True)
sys.stdin.read()  # hold it until killed
"""


def test_a_lock_held_by_a_killed_client_is_freed_after_the_lease_timeout(
    expiry_client: Client, expiry_cluster: ProcessCluster
) -> None:
    name = unique("lock")
    env = {**os.environ, "DASK_DISTRIBUTED__SCHEDULER__LOCKS__LEASE_TIMEOUT": LEASE_TIMEOUT}
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(expiry_cluster.address), name],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env=env,
    )
    try:
        assert holder.stdout is not None
        _, line = in_thread(holder.stdout.readline)
        assert line.get(timeout=WAIT_S).strip() == b"acquired"
        lock = Lock(name)
        # Held, and kept past the lease timeout: the holder refreshes its lease every
        # lease_timeout / 5.
        assert lock.acquire(timeout=3) is False
        holder.kill()  # SIGKILL: it never releases
        holder.wait(WAIT_S)
        started = time.monotonic()
        assert lock.acquire(timeout=WAIT_S) is True
        assert time.monotonic() - started < WAIT_S
        lock.release()
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait(WAIT_S)


def test_an_unrefreshed_lease_expires_and_the_waiter_gets_it(expiry_client: Client) -> None:
    name = unique("sem")
    stale = Semaphore(max_leases=1, name=name)
    stale.refresh_leases = False  # as if its client hung
    assert stale.acquire(timeout=WAIT_S)
    waiter = Semaphore(max_leases=1, name=name)
    assert waiter.acquire(timeout=WAIT_S) is True  # once the stale lease expired
    assert waiter.get_value() == 1
    # The stale holder's release is only a warning on the scheduler.
    assert stale.release() is True
    assert waiter.get_value() == 1
    waiter.release()
    assert waiter.get_value() == 0


def test_a_refreshed_lease_outlives_the_lease_timeout(expiry_client: Client) -> None:
    name = unique("lock")
    lock = Lock(name)
    assert lock.acquire(timeout=WAIT_S)
    # Past the lease timeout: an unrefreshed lease would have expired by then.
    assert Lock(name).acquire(timeout=3) is False
    assert lock.locked()
    lock.release()


WAITER = """
import sys
from distributed import Client, Lock
client = Client(sys.argv[1], timeout=30)
print("waiting", flush=True)
Lock(sys.argv[2]).acquire()
print("acquired", flush=True)  # never: killed while it waits
sys.stdin.read()
"""


def parked_acquires(client: Client, name: str) -> int:
    """Acquires of ``name`` waiting on the scheduler (dsched: every parked request)."""
    if SCHEDULER_KIND in DASK_SCHEDULER_KINDS:
        return int(
            client.run_on_scheduler(
                lambda dask_scheduler: dask_scheduler.extensions["semaphores"].metrics["pending"][
                    name
                ]
            )
        )
    return int(client.sync(client.scheduler.dsched_info)["parked_requests"])


def test_an_acquire_whose_client_died_is_forgotten(
    expiry_client: Client, expiry_cluster: ProcessCluster, wait_until: WaitUntil
) -> None:
    """dsched forgets a waiting request whose connection closed. The stock scheduler does
    not notice: it grants the dead acquire the lease when it comes free, and the lease
    blocks everyone until it expires (nobody refreshes it)."""
    name = unique("lock")
    lock = Lock(name)
    assert lock.acquire(timeout=WAIT_S)
    waiter = subprocess.Popen(
        [sys.executable, "-c", WAITER, str(expiry_cluster.address), name],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env={**os.environ, "DASK_DISTRIBUTED__SCHEDULER__LOCKS__LEASE_TIMEOUT": LEASE_TIMEOUT},
    )
    try:
        wait_until(
            lambda: parked_acquires(expiry_client, name) == 1,
            WAIT_S,
            lambda: f"the other client's acquire never waited (alive: {waiter.poll() is None})",
        )
        waiter.kill()  # SIGKILL, while its acquire waits
        waiter.wait(WAIT_S)
        after = Lock(name)
        if SCHEDULER_KIND in DASK_SCHEDULER_KINDS:
            lock.release()
            assert after.acquire(timeout=0.5) is False  # the dead acquire got it
            assert after.acquire(timeout=WAIT_S) is True  # once its lease expired
        else:
            wait_until(
                lambda: parked_acquires(expiry_client, name) == 0,
                WAIT_S,
                lambda: "the dead client's acquire is still parked",
            )
            lock.release()
            assert after.acquire(blocking=False) is True
        after.release()
    finally:
        if waiter.poll() is None:
            waiter.kill()
            waiter.wait(WAIT_S)
