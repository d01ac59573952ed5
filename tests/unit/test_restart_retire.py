"""Restart and worker retirement in the state machine (no sockets, no loop)."""

from __future__ import annotations

import pytest
from harness import Harness

from dsched.state import events as ev

pytestmark = pytest.mark.timeout(60)

W1, W2, W3 = "tcp://w1:1", "tcp://w2:2", "tcp://w3:3"


def cluster(*workers: str) -> Harness:
    h = Harness()
    for address in workers:
        h.add_worker(address)
    h.add_client("c")
    return h


def test_restart_forgets_every_task_and_tells_every_client():
    h = cluster(W1, W2)
    h.add_client("other")
    h.submit({"a": (), "b": ("a",), "c": ("b",)}, keys=["c"])
    h.submit({"x": ()}, keys=["x"], client="other")
    h.step(ev.ClientDesiresKeys("fire-and-forget", ["x"]))
    h.finish("a")  # a in memory, b processing, x processing
    running = h.processing()
    out = h.step(ev.Restart())
    assert h.state.tasks == {}
    assert ("c", {"op": "restart"}) in out.messages("restart")
    assert ("other", {"op": "restart"}) in out.messages("restart")
    # Running tasks and data are freed on the workers.
    freed = {key for worker in (W1, W2) for key in h.freed_on(worker)}
    assert {"a", *running} <= freed
    # The cluster works as before.
    h.submit({"y": ()}, keys=["y"])
    h.run_until_idle()
    assert ("key-in-memory", "y") in h.client_ops()


def test_restart_with_erred_tasks_and_nothing_at_all():
    h = cluster(W1)
    h.step(ev.Restart())  # nothing to do
    h.submit({"a": (), "b": ("a",)}, keys=["b"])
    h.run_until_idle(fail=["a"])
    assert h.state.tasks["b"].state == "erred"
    h.step(ev.Restart())
    assert h.state.tasks == {}


def test_retire_copies_unique_data_then_removal_loses_nothing():
    h = cluster(W1, W2, W3)
    h.submit({("x", i): () for i in range(6)}, keys=[("x", i) for i in range(6)])
    h.run_until_idle()
    on_w1 = sorted(ts.key for ts in h.state.workers[W1].has_what)
    assert on_w1, "the policy put nothing on w1; the test needs some data there"
    assert sorted(h.state.unique_keys_on([W1])) == on_w1

    out = h.step(ev.RetireWorkers([W1]))
    assert h.state.workers[W1].status == "closing_gracefully"
    assert out.to_workers[W1][0]["op"] == "worker-status-change"
    requests = out.messages("acquire-replicas")
    asked = {key for _, msg in requests for key in msg["who_has"]}
    assert asked == set(on_w1)
    assert all(addr in (W2, W3) for addr, _ in requests)
    for _, msg in requests:
        assert all(holders == [W1] for holders in msg["who_has"].values())

    # Repeating the event asks again (idempotent), and sends no second status change.
    again = h.step(ev.RetireWorkers([W1]))
    assert not again.messages("worker-status-change")

    # The recipients report their new replicas; then nothing is unique to w1 any more.
    for address, msg in requests:
        h.step(ev.AddKeys(address, list(msg["who_has"])))
    assert h.state.unique_keys_on([W1]) == []
    # No new work goes to a retiring worker.
    h.submit({"later": ()}, keys=["later"])
    assert h.processing()["later"] != W1
    h.run_until_idle()

    out = h.step(ev.WorkerDisconnected(W1, expected=True, stimulus_id="retire-workers"))
    assert not out.messages("lost-data")
    assert all(h.state.tasks[("x", i)].state == "memory" for i in range(6))


def test_retire_without_another_running_worker_moves_nothing():
    h = cluster(W1)
    h.submit({"a": ()}, keys=["a"])
    h.run_until_idle()
    out = h.step(ev.RetireWorkers([W1]))
    assert not out.messages("acquire-replicas")
    assert any("no running worker" in text for _, text in out.logs)


def test_retiring_unknown_workers_is_a_no_op():
    h = cluster(W1)
    out = h.step(ev.RetireWorkers(["tcp://nowhere:1"]))
    assert not out.to_workers
