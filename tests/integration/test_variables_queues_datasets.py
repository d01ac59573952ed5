"""Variables, queues and published datasets with real Clients and real workers.

Each API is used from the client and from inside a task (the worker's client), across
clients (a variable's future outliving its setter, two clients sharing a queue, a dataset
outliving its publisher), and with bad input, which must fail as it does on Dask. Every
test deletes what it created: the `client` fixture then checks that the cluster is empty.

Task functions are module-level: Dask pickles them by reference, and the cluster fixture
puts this directory on the workers' and the scheduler's PYTHONPATH.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator

import dask.bag as db
import pytest
from dask.utils import parse_timedelta
from distributed import Client, Future, Queue, Variable, get_client, worker_client

from dsched.testing.workloads import inc

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

WaitUntil = Callable[[Callable[[], bool], float, Callable[[], str]], None]

# Upper bound for any single result or get; the pytest timeout is the backstop.
RESULT_TIMEOUT_S = 60
CONNECT_TIMEOUT_S = 30


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


@pytest.fixture
def other_client(cluster_address: str) -> Iterator[Client]:
    """A second client of the same cluster (closed by the test or at the end)."""
    with Client(cluster_address, timeout=CONNECT_TIMEOUT_S, set_as_default=False) as second:
        yield second


# ----------------------------------------------------------------------------- task functions
def set_variable_in_task(name: str, value: int) -> str:
    Variable(name).set(value)
    return "set"


def get_variable_in_task(name: str) -> object:
    return Variable(name).get(timeout=RESULT_TIMEOUT_S)


def set_variable_to_future_in_task(name: str, x: int) -> str:
    with worker_client() as client:
        future = client.submit(inc, x, key=f"inc-from-task-{name}")
        Variable(name, client=client).set(future)
        future.result(timeout=RESULT_TIMEOUT_S)
    return "set"


def result_of_variable_in_task(name: str) -> int:
    client = get_client()
    future = Variable(name, client=client).get(timeout=RESULT_TIMEOUT_S)
    return int(future.result(timeout=RESULT_TIMEOUT_S))


def fill_queue_in_task(queue: Queue, n: int) -> int:
    for i in range(n):
        queue.put(i, timeout=RESULT_TIMEOUT_S)
    queue.close()  # the unpickled Queue registered itself: release that
    return n


def drain_queue_in_task(queue: Queue, n: int) -> list[int]:
    out = [queue.get(timeout=RESULT_TIMEOUT_S) for _ in range(n)]
    queue.close()
    return out


def put_future_in_queue_in_task(queue: Queue, x: int) -> str:
    client = get_client()
    future = client.submit(inc, x, key=f"inc-queued-{queue.name}")
    queue.put(future, timeout=RESULT_TIMEOUT_S)
    queue.close()
    return "put"


def sum_dataset_in_task(name: str) -> int:
    client = get_client()
    futures = client.get_dataset(name)
    return sum(client.gather(futures))


def publish_in_task(name: str) -> str:
    with worker_client() as client:
        futures = client.map(inc, range(3), key=[f"published-by-task-{i}" for i in range(3)])
        client.publish_dataset(futures, name=name)
    return "published"


# ============================================================================= variables
def test_variable_data_and_futures_from_the_client(client: Client) -> None:
    v = Variable(unique("var"), client=client)
    v.set({"a": [1, 2]})
    # msgpack data comes back as msgpack decodes it on the scheduler: lists as tuples.
    assert v.get(timeout=RESULT_TIMEOUT_S) == {"a": (1, 2)}
    v.set("replaced")
    assert v.get(timeout=RESULT_TIMEOUT_S) == "replaced"
    future = client.submit(inc, 1)
    v.set(future)
    got = v.get(timeout=RESULT_TIMEOUT_S)
    assert isinstance(got, Future) and got.key == future.key
    assert got.result(timeout=RESULT_TIMEOUT_S) == 2
    v.set(client.submit(inc, 10))  # the old future is let go of by the variable
    assert v.get(timeout=RESULT_TIMEOUT_S).result(timeout=RESULT_TIMEOUT_S) == 11
    v.delete()


def test_variable_get_waits_for_a_set_and_times_out(client: Client) -> None:
    v = Variable(unique("var"), client=client)
    started = time.monotonic()
    with pytest.raises(TimeoutError):
        v.get(timeout=0.5)
    elapsed = time.monotonic() - started
    assert 0.4 <= elapsed < RESULT_TIMEOUT_S
    with pytest.raises(TimeoutError):
        v.get(timeout=0)
    # A get parked before the set is answered by it (the set comes from a task). Each on a
    # worker of its own: the blocked getter holds its worker's only thread.
    first, second = sorted(client.nthreads())
    waiting = client.submit(get_variable_in_task, v.name, pure=False, workers=[first])
    setter = client.submit(set_variable_in_task, v.name, 7, pure=False, workers=[second])
    assert setter.result(timeout=RESULT_TIMEOUT_S) == "set"
    assert waiting.result(timeout=RESULT_TIMEOUT_S) == 7
    assert v.get(timeout=RESULT_TIMEOUT_S) == 7
    v.delete()


def test_variable_future_outlives_its_setter(client: Client, cluster_address: str) -> None:
    name = unique("var")
    with Client(cluster_address, timeout=CONNECT_TIMEOUT_S, set_as_default=False) as setter:
        future = setter.submit(inc, 41, key=f"held-by-{name}")
        Variable(name, client=setter).set(future)
        future.result(timeout=RESULT_TIMEOUT_S)
        del future
    # The setter is gone; the variable still holds its future.
    got = Variable(name, client=client).get(timeout=RESULT_TIMEOUT_S)
    assert got.key == f"held-by-{name}"
    assert got.status == "finished"
    assert got.result(timeout=RESULT_TIMEOUT_S) == 42
    Variable(name, client=client).delete()


def test_variable_from_inside_tasks(client: Client) -> None:
    name = unique("var")
    assert client.submit(set_variable_to_future_in_task, name, 5).result(RESULT_TIMEOUT_S) == "set"
    # The task's client is gone with the task; the variable kept the future.
    got = Variable(name, client=client).get(timeout=RESULT_TIMEOUT_S)
    assert got.result(timeout=RESULT_TIMEOUT_S) == 6
    assert client.submit(result_of_variable_in_task, name).result(RESULT_TIMEOUT_S) == 6
    del got
    Variable(name, client=client).delete()


def test_variable_holding_an_erred_future(client: Client) -> None:
    v = Variable(unique("var"), client=client)
    bad = client.submit(inc, "not a number")
    with pytest.raises(TypeError):
        bad.result(timeout=RESULT_TIMEOUT_S)
    v.set(bad)
    got = v.get(timeout=RESULT_TIMEOUT_S)
    assert got.status == "error"
    with pytest.raises(TypeError):
        got.result(timeout=RESULT_TIMEOUT_S)
    v.delete()


def test_variable_errors_are_dasks(client: Client) -> None:
    v = Variable(unique("var"), client=client)
    never = Future(f"never-submitted-{v.name}", client)
    with pytest.raises(TimeoutError, match=f"Task {never.key} unknown to scheduler."):
        v.set(never, timeout=0.3)
    with pytest.raises(KeyError) as bad_timeout:
        v.set(1, timeout="3 parsecs")
    with pytest.raises(KeyError) as expected:
        parse_timedelta("3 parsecs")
    assert str(bad_timeout.value) == str(expected.value)
    with pytest.raises(TypeError, match=r"VariableExtension.get\(\) got an unexpected keyword"):
        client.sync(client.scheduler.variable_get, name=v.name, bogus=1)
    v.delete()


# ============================================================================= queues
def test_queue_from_the_client(client: Client) -> None:
    q = Queue(unique("queue"), client=client, maxsize=2)
    q.put(1)
    q.put("two")
    assert q.qsize() == 2
    with pytest.raises(TimeoutError):
        q.put(3, timeout=0.3)  # full
    assert q.get(timeout=RESULT_TIMEOUT_S) == 1
    q.put(3, timeout=RESULT_TIMEOUT_S)
    assert q.get(batch=True) == ["two", 3]
    assert q.get(batch=True) == []
    with pytest.raises(TimeoutError):
        q.get(timeout=0.3)  # empty
    futures = client.map(inc, range(3))
    for future in futures:
        q.put(future, timeout=RESULT_TIMEOUT_S)
        assert q.get(timeout=RESULT_TIMEOUT_S).result(timeout=RESULT_TIMEOUT_S) in {1, 2, 3}
    q.put(client.submit(inc, 100))
    q.put(client.submit(inc, 200))
    assert [f.result(timeout=RESULT_TIMEOUT_S) for f in q.get(batch=2)] == [101, 201]
    q.close()


def test_two_clients_share_a_queue(client: Client, other_client: Client) -> None:
    name = unique("queue")
    producer = Queue(name, client=client)
    consumer = Queue(name, client=other_client)
    futures = client.map(inc, range(5), key=[f"{name}-{i}" for i in range(5)])
    for future in futures:
        producer.put(future)
    producer.put("done")
    del futures  # the queue alone holds the keys from now on
    results = []
    while (item := consumer.get(timeout=RESULT_TIMEOUT_S)) != "done":
        results.append(item.result(timeout=RESULT_TIMEOUT_S))
    assert sorted(results) == [1, 2, 3, 4, 5]
    assert producer.qsize() == 0
    producer.close()
    consumer.close()


def test_queue_from_inside_tasks(client: Client) -> None:
    q = Queue(unique("queue"), client=client)
    filled = client.submit(fill_queue_in_task, q, 4, pure=False)
    assert filled.result(timeout=RESULT_TIMEOUT_S) == 4
    assert [q.get(timeout=RESULT_TIMEOUT_S) for _ in range(4)] == [0, 1, 2, 3]
    drained = client.submit(drain_queue_in_task, q, 2, pure=False)
    q.put("x")
    q.put("y")
    assert drained.result(timeout=RESULT_TIMEOUT_S) == ["x", "y"]
    put = client.submit(put_future_in_queue_in_task, q, 1, pure=False)
    assert put.result(timeout=RESULT_TIMEOUT_S) == "put"
    got = q.get(timeout=RESULT_TIMEOUT_S)
    assert got.result(timeout=RESULT_TIMEOUT_S) == 2
    del got
    q.close()


def test_queue_errors_are_dasks(client: Client) -> None:
    name = unique("queue")
    with pytest.raises(KeyError, match=name):
        client.sync(client.scheduler.queue_qsize, name=name)
    with pytest.raises(KeyError, match=name):
        client.sync(client.scheduler.queue_put, name=name, data=1)
    q = Queue(name, client=client)
    with pytest.raises(NotImplementedError, match="integer batch sizes and timeouts"):
        q.get(batch=2, timeout=1)
    with pytest.raises(TypeError, match="'str' object cannot be interpreted as an integer"):
        q.get(batch="x")
    with pytest.raises(TypeError, match=r"QueueExtension.qsize\(\) got an unexpected keyword"):
        client.sync(client.scheduler.queue_qsize, name=name, bogus=1)
    q.close()
    bad = Queue(unique("queue"), client=client, maxsize="3")
    with pytest.raises(TypeError, match="'<=' not supported between instances of 'str' and"):
        bad.put(1)
    assert bad.qsize() == 0
    bad.close()


# ============================================================================= datasets
def test_dataset_survives_its_publisher(client: Client, cluster_address: str) -> None:
    name = unique("ds")
    with Client(cluster_address, timeout=CONNECT_TIMEOUT_S, set_as_default=False) as publisher:
        bag = publisher.persist(db.from_sequence(range(10), npartitions=3).map(inc))
        publisher.publish_dataset(bag, name=name)
        futures = publisher.map(inc, range(3), key=[f"{name}-{i}" for i in range(3)])
        publisher.publish_dataset(**{f"{name}-futures": futures})
    assert name in client.list_datasets()
    got = client.get_dataset(name)
    assert sum(got.compute()) == sum(range(1, 11))
    assert client.gather(client.get_dataset(f"{name}-futures")) == [1, 2, 3]
    del got
    client.unpublish_dataset([name, f"{name}-futures"])
    assert name not in client.list_datasets()


def test_datasets_mapping(client: Client) -> None:
    name = unique("ds")
    future = client.submit(inc, 1)
    client.datasets[name] = future
    assert name in client.datasets
    assert name in list(client.datasets)
    assert len(client.datasets) >= 1
    assert client.datasets[name].result(timeout=RESULT_TIMEOUT_S) == 2
    client.publish_dataset(future, name=name, override=True)
    del client.datasets[name]
    assert name not in client.datasets
    assert client.get_dataset(name, default="absent") == "absent"


def test_datasets_from_inside_tasks(client: Client) -> None:
    name = unique("ds")
    assert client.submit(publish_in_task, name, pure=False).result(RESULT_TIMEOUT_S) == "published"
    assert client.submit(sum_dataset_in_task, name, pure=False).result(RESULT_TIMEOUT_S) == 6
    client.unpublish_dataset(name)


def test_dataset_errors_are_dasks(client: Client) -> None:
    name = unique("ds")
    client.publish_dataset(1, name=name)
    with pytest.raises(KeyError, match=f"Dataset {name} already exists"):
        client.publish_dataset(2, name=name)
    assert client.get_dataset(name) == 1
    client.publish_dataset(2, name=name, override=True)
    assert client.get_dataset(name) == 2
    client.unpublish_dataset(name)
    with pytest.raises(KeyError, match=f"Dataset '{name}' not found"):
        client.get_dataset(name)
    client.unpublish_dataset(name)  # unknown: nothing happens
    with pytest.raises(TypeError, match=r"PublishExtension.list\(\) got an unexpected keyword"):
        client.sync(client.scheduler.publish_list, bogus=1)
