"""The task state machine, driven through the in-memory harness (no sockets, no loop)."""

from __future__ import annotations

import pytest
from harness import Harness

from dsched.state import events as ev

pytestmark = pytest.mark.timeout(60)


def two_workers(**kwargs: object) -> Harness:
    h = Harness(**kwargs)  # type: ignore[arg-type]
    h.add_worker("tcp://w1:1")
    h.add_worker("tcp://w2:2")
    h.add_client("c")
    return h


def test_chain_runs_in_order_and_frees_inputs_as_soon_as_unneeded():
    h = two_workers()
    h.submit({"a": (), "b": ("a",), "c": ("b",)}, keys=["c"])
    assert list(h.processing()) == ["a"]
    worker = h.processing()["a"]
    h.finish("a")
    assert list(h.processing()) == ["b"]
    compute_b = h.worker_ops(h.processing()["b"], "compute-task")[-1]
    assert compute_b["key"] == "b"
    assert compute_b["who_has"] == {"a": (worker,)}
    assert compute_b["nbytes"] == {"a": 8}
    h.finish("b")
    assert "a" in h.freed_on(worker)  # b is in memory: nobody needs a any more
    h.finish("c")
    assert h.client_ops() == [("key-in-memory", "c")]
    h.step(ev.ClientReleasesKeys("c", ["c"]))
    assert h.state.tasks == {}


def test_compute_task_carries_every_field_a_worker_requires():
    h = two_workers()
    h.submit({"x": ()}, keys=["x"], annotations={"x": {"priority": 5, "retries": 0}})
    (msg,) = [m for msgs in h.to_workers.values() for m in msgs if m["op"] == "compute-task"]
    assert set(msg) == {
        "op", "key", "run_id", "priority", "stimulus_id", "who_has", "nbytes", "run_spec",
        "resource_restrictions", "actor", "annotations", "span_id",
    }  # fmt: skip
    assert msg["run_spec"] == "run-x"
    assert msg["priority"][0] == -5
    assert msg["annotations"] == {"priority": 5, "retries": 0}


def test_merge_spreads_roots_over_workers_and_releases_everything_at_the_end():
    h = two_workers()
    graph: dict[object, tuple[object, ...]] = {("f", i): () for i in range(100)}
    graph["merge"] = tuple(graph)
    h.submit(graph, keys=["merge"])
    placed = h.processing()
    assert len(placed) == 100
    assert sorted(list(placed.values()).count(w) for w in ("tcp://w1:1", "tcp://w2:2")) == [
        50,
        50,
    ]
    h.run_until_idle()
    assert h.client_ops() == [("key-in-memory", "merge")]
    freed = h.freed_on("tcp://w1:1") + h.freed_on("tcp://w2:2")
    assert sorted(map(str, freed)) == sorted(str(("f", i)) for i in range(100))
    h.step(ev.ClientReleasesKeys("c", ["merge"]))
    assert h.state.tasks == {}
    assert all(not ws.has_what for ws in h.state.workers.values())


def test_fresh_run_id_per_dispatch_and_stale_results_are_freed():
    h = two_workers()
    h.submit({"a": ()}, keys=["a"])
    ts = h.state.tasks["a"]
    first_worker, first_run = ts.processing_on.address, ts.run_id
    other = "tcp://w2:2" if first_worker == "tcp://w1:1" else "tcp://w1:1"
    h.step(ev.WorkerDisconnected(first_worker))
    assert ts.processing_on.address == other
    assert ts.run_id != first_run
    # A result for the old dispatch from a worker that no longer runs the task: dropped.
    h.add_worker(first_worker)
    out = h.step(ev.TaskFinished(first_worker, "a", first_run, 8))
    assert out.messages("free-keys") == [
        (
            first_worker,
            {
                "op": "free-keys",
                "keys": ["a"],
                "stimulus_id": out.messages("free-keys")[0][1]["stimulus_id"],
            },
        )
    ]
    assert ts.state == "processing"
    h.finish("a")
    assert ts.state == "memory"


def test_task_error_reaches_the_client_and_every_dependent():
    h = two_workers()
    h.add_client("d")
    h.submit({"a": (), "b": ("a",)}, keys=["b"], client="c")
    h.submit({"a": ()}, keys=["a"], client="d")
    h.fail("a", exception="ZeroDivisionError")
    erred_c = [m for m in h.to_clients["c"] if m["op"] == "task-erred"]
    erred_d = [m for m in h.to_clients["d"] if m["op"] == "task-erred"]
    assert [(m["key"], m["exception"]) for m in erred_c] == [("b", "ZeroDivisionError")]
    assert [(m["key"], m["exception"]) for m in erred_d] == [("a", "ZeroDivisionError")]
    assert h.state.tasks["b"].state == "erred"
    # A client asking again gets the error again, and releasing everything forgets it all.
    h.step(ev.ReportKey("c", "b"))
    assert h.to_clients["c"][-1]["op"] == "task-erred"
    h.step(ev.ClientReleasesKeys("c", ["b"]))
    h.step(ev.ClientReleasesKeys("d", ["a"]))
    assert h.state.tasks == {}
    # The worker that saw the error is told to forget it.
    assert "a" in h.freed_on("tcp://w1:1") + h.freed_on("tcp://w2:2")


def test_retries_rerun_a_failing_task_before_it_errs():
    h = two_workers()
    h.submit({"a": ()}, keys=["a"], annotations={"a": {"retries": 2}})
    h.fail("a")
    h.fail("a")
    assert h.state.tasks["a"].state == "processing"
    h.fail("a")
    assert h.state.tasks["a"].state == "erred"
    assert h.client_ops() == [("task-erred", "a")]


def test_retry_rpc_resets_the_erred_chain():
    h = two_workers()
    h.submit({"a": (), "b": ("a",)}, keys=["b"])
    h.fail("a")
    out = h.step(ev.RetryKeys("c", ["b"]))
    assert out.reply == ("a",)
    assert ("task-retried", "b") in h.client_ops()
    h.run_until_idle()
    assert h.client_ops()[-1] == ("key-in-memory", "b")


def test_retry_also_resets_erred_dependents_other_clients_want():
    # Found by the property test: d's b erred because of c's a; when c retries a, b must be
    # reset too (Dask sends erred dependents back to waiting), not left blaming a task that
    # is no longer erred.
    h = two_workers()
    h.add_client("d")
    h.submit({"a": ()}, keys=["a"], client="c")
    h.submit({"a": (), "b": ("a",)}, keys=["b"], client="d")
    h.fail("a")
    assert h.state.tasks["b"].state == "erred"
    h.step(ev.RetryKeys("c", ["a"]))
    assert ("task-retried", "b") in h.client_ops("d")
    h.run_until_idle()
    assert h.client_ops("d")[-1] == ("key-in-memory", "b")


def test_losing_a_worker_recomputes_lost_data_and_reschedules_its_tasks():
    h = two_workers()
    h.submit({"a": (), "b": (), "c": ("a", "b")}, keys=["a", "c"])
    h.finish("a")
    lost_worker = next(iter(h.state.tasks["a"].who_has)).address
    h.step(ev.WorkerDisconnected(lost_worker))
    assert ("lost-data", "a") in h.client_ops()
    survivor = next(iter(h.state.workers))
    removes = h.worker_ops(survivor, "remove-worker")
    assert removes and removes[-1]["worker"] == lost_worker
    h.run_until_idle()
    assert h.state.tasks["c"].state == "memory"
    assert h.state.tasks["a"].state == "memory"
    assert {ws.address for ws in h.state.tasks["a"].who_has} == {survivor}


def test_a_task_on_too_many_dying_workers_fails_with_killed_worker():
    h = Harness(allowed_failures=1)
    h.add_client("c")
    h.add_worker("tcp://w1:1")
    h.submit({"a": (), "b": ("a",)}, keys=["b"])
    h.step(ev.WorkerDisconnected("tcp://w1:1"))
    h.add_worker("tcp://w2:2")
    assert h.processing() == {"a": "tcp://w2:2"}
    h.step(ev.WorkerDisconnected("tcp://w2:2"))
    erred = [m for m in h.to_clients["c"] if m["op"] == "task-erred"]
    assert [m["key"] for m in erred] == ["b"]
    assert erred[0]["exception"] == ("KilledWorker", "a", "tcp://w2:2", 1)


def test_expected_worker_loss_does_not_count_against_tasks():
    h = Harness(allowed_failures=0)
    h.add_client("c")
    h.add_worker("tcp://w1:1")
    h.submit({"a": ()}, keys=["a"])
    h.step(ev.WorkerDisconnected("tcp://w1:1", expected=True))
    assert h.state.tasks["a"].state == "no-worker"
    h.add_worker("tcp://w2:2")
    assert h.processing() == {"a": "tcp://w2:2"}


def test_client_disconnect_releases_everything_it_wanted():
    h = two_workers()
    h.submit({"a": (), "b": ("a",), "c": ()}, keys=["b", "c"])
    h.finish("a")
    running = h.processing()
    h.step(ev.ClientDisconnected("c"))
    assert h.state.tasks == {}
    for key, worker in running.items():
        assert key in h.freed_on(worker)


def test_shared_keys_stay_while_another_client_wants_them():
    h = two_workers()
    h.add_client("d")
    h.submit({"a": ()}, keys=["a"], client="c")
    h.submit({"a": (), "b": ("a",)}, keys=["b"], client="d")
    h.run_until_idle()
    h.step(ev.ClientDisconnected("d"))
    assert set(h.state.tasks) == {"a"}
    assert h.state.tasks["a"].state == "memory"


def test_cancel_releases_the_key_and_its_dependents_and_tells_every_client():
    h = two_workers()
    h.add_client("d")
    h.submit({"a": (), "b": ("a",)}, keys=["a", "b"])
    worker = h.processing()["a"]
    h.step(ev.CancelKeys("c", ["a"], reason="user"))
    assert h.state.tasks == {}
    assert "a" in h.freed_on(worker)
    for client in ("c", "d"):
        cancelled = [m for m in h.to_clients[client] if m["op"] == "cancelled-keys"]
        assert set(cancelled[-1]["keys"]) == {"a", "b"}


def test_scattered_data_is_used_by_tasks_and_cancelled_when_its_worker_dies():
    h = two_workers()
    h.step(ev.DataPlaced("c", {"x": ["tcp://w1:1"]}, {"x": 100}))
    assert h.client_ops() == [("key-in-memory", "x")]
    h.submit({"y": ("x",)}, keys=["y"])
    assert h.processing() == {"y": "tcp://w1:1"}  # locality: the data is there
    h.step(ev.WorkerDisconnected("tcp://w1:1"))
    cancelled = [m for m in h.to_clients["c"] if m["op"] == "cancelled-keys"]
    assert set(cancelled[-1]["keys"]) == {"x", "y"}
    assert h.state.tasks == {}


def test_data_placed_without_a_client_only_adds_replicas_of_known_data():
    h = two_workers()
    h.step(ev.DataPlaced(None, {"orphan": ["tcp://w1:1"]}, {"orphan": 8}))
    assert "orphan" not in h.state.tasks  # nobody would ever release it
    h.step(ev.DataPlaced("c", {"x": ["tcp://w1:1"]}, {"x": 8}))
    h.step(ev.DataPlaced(None, {"x": ["tcp://w2:2"]}, {"x": 8}))
    assert {ws.address for ws in h.state.tasks["x"].who_has} == {"tcp://w1:1", "tcp://w2:2"}
    h.step(ev.ClientReleasesKeys("c", ["x"]))
    assert h.state.tasks == {}


def test_graph_with_unknown_dependency_is_cancelled():
    h = two_workers()
    out = h.submit({"b": ("missing",)}, keys=["b"])
    assert out.messages("cancelled-keys")[0][1]["reason"] == "lost dependencies"
    assert h.state.tasks == {}


def test_graph_reusing_a_future_in_memory():
    h = two_workers()
    h.submit({"a": ()}, keys=["a"])
    h.run_until_idle()
    h.submit({"b": ("a",)}, keys=["b"])
    h.run_until_idle()
    assert h.client_ops()[-1] == ("key-in-memory", "b")
    h.step(ev.ClientReleasesKeys("c", ["a", "b"]))
    assert h.state.tasks == {}


def test_worker_restrictions_wait_for_a_matching_worker():
    h = two_workers()
    h.submit({"a": ()}, keys=["a"], annotations={"a": {"workers": ["tcp://w3:3"]}})
    assert h.state.tasks["a"].state == "no-worker"
    h.add_worker("tcp://w3:3")
    assert h.processing() == {"a": "tcp://w3:3"}


def test_loose_restrictions_fall_back_to_any_worker():
    h = two_workers()
    h.submit(
        {"a": ()},
        keys=["a"],
        annotations={"a": {"workers": ["tcp://w9:9"], "allow_other_workers": True}},
    )
    assert h.state.tasks["a"].state == "processing"


def test_restriction_by_worker_name_and_resources():
    h = Harness()
    h.add_client("c")
    h.add_worker("tcp://w1:1", name="alice")
    h.add_worker("tcp://w2:2", resources={"GPU": 1})
    h.submit(
        {"a": (), "b": ()},
        keys=["a", "b"],
        annotations={"a": {"workers": ["alice"]}, "b": {"resources": {"GPU": 1}}},
    )
    assert h.processing() == {"a": "tcp://w1:1", "b": "tcp://w2:2"}


def test_paused_worker_gets_no_new_tasks():
    h = two_workers()
    h.step(ev.WorkerStatusChanged("tcp://w1:1", "paused"))
    h.submit(dict.fromkeys(range(10), ()), keys=list(range(10)))
    assert set(h.processing().values()) == {"tcp://w2:2"}


def test_fire_and_forget_keeps_a_task_alive_until_it_finishes():
    h = two_workers()
    h.submit({"a": ()}, keys=["a"])
    h.step(ev.ClientDesiresKeys("fire-and-forget", ["a"]))
    h.step(ev.ClientReleasesKeys("c", ["a"]))
    assert h.state.tasks["a"].state == "processing"
    h.finish("a")
    assert h.state.tasks == {}


def test_results_are_stored_once_and_replicas_tracked():
    h = two_workers()
    h.submit({"a": ()}, keys=["a"])
    h.finish("a")
    other = next(
        a for a in h.state.workers if a not in {w.address for w in h.state.tasks["a"].who_has}
    )
    h.step(ev.AddKeys(other, ["a", "zzz"]))
    assert {w.address for w in h.state.tasks["a"].who_has} == set(h.state.workers)
    assert h.worker_ops(other, "remove-replicas")[-1]["keys"] == ["zzz"]
    h.step(ev.ReleaseWorkerData(other, "a"))
    assert h.state.tasks["a"].state == "memory"


def test_refresh_who_has_answers_known_keys_and_frees_unknown_ones():
    h = two_workers()
    h.submit({"a": ()}, keys=["a"])
    h.finish("a")
    holder = next(iter(h.state.tasks["a"].who_has)).address
    out = h.step(ev.RequestRefreshWhoHas("tcp://w1:1", ["a", "gone"]))
    ((_, refresh),) = out.messages("refresh-who-has")
    assert refresh["who_has"] == {"a": [holder]}
    assert "gone" in h.freed_on("tcp://w1:1")


def test_reschedule_and_long_running():
    h = two_workers()
    h.submit({"a": ()}, keys=["a"])
    ts = h.state.tasks["a"]
    worker, run_id = ts.processing_on.address, ts.run_id
    h.step(ev.LongRunning(worker, "a", run_id))
    assert ts.long_running
    h.step(ev.Reschedule(worker, "a"))
    assert ts.state == "processing" and ts.run_id != run_id and not ts.long_running


def test_graph_failure_errs_every_requested_key():
    h = two_workers()
    h.step(ev.GraphFailed("c", ["a", "b"], "exc", None))
    assert h.client_ops() == [("task-erred", "a"), ("task-erred", "b")]


def test_priorities_follow_generations_and_user_priority():
    h = two_workers()
    h.submit({"a": ()}, keys=["a"], annotations={"a": {"priority": 7}})
    assert h.state.tasks["a"].priority[0] == -7
    first_gen = h.state.tasks["a"].priority[1]
    h.now += 10
    h.submit({"b": ()}, keys=["b"])
    assert h.state.tasks["b"].priority[1] == first_gen + 1
