"""The parts of the policy protocol beyond ready/done: ``Unplaceable`` versus ``NoWorker``,
the optional replica and bandwidth events, and what the runtime and the policies do with
them. Through the in-memory harness and by feeding policies events directly (no sockets)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import pytest
from harness import Harness

from dsched.core.inbound import reported_bandwidth
from dsched.policy import POLICIES, PolicyConfig, make_policy
from dsched.policy import protocol as p
from dsched.policy.common import WorkerInfo, unplaceable_reason
from dsched.policy.locality import LocalityPolicy
from dsched.state import events as ev
from dsched.state.outbox import Outbox

pytestmark = pytest.mark.timeout(60)

W1, W2, W3 = "tcp://w1:1", "tcp://w2:1", "tcp://w3:1"
GPU_WORKER = "tcp://gpu:1"
GPU = {"resources": {"GPU": 1}}
GPU_WARNING = "can never run on the current workers: no worker offers resources {'GPU': 1}"


class Recorder:
    """Wraps a policy and keeps every event it was sent; ``wants`` is what it asks for."""

    def __init__(self, wants: frozenset[type] = p.OPTIONAL_EVENTS) -> None:
        self.inner = LocalityPolicy()
        self.wants = wants
        self.events: list[p.PolicyEvent] = []

    def handle(self, events: Sequence[p.PolicyEvent], now: float) -> list[p.Decision]:
        self.events.extend(events)
        return self.inner.handle(events, now)

    def of(self, *types: type) -> list[p.PolicyEvent]:
        return [e for e in self.events if isinstance(e, types)]


def cluster(*addresses: str, policy: p.Policy | None = None, **kwargs: object) -> Harness:
    h = Harness(policy)
    for address in addresses:
        h.add_worker(address, **kwargs)  # type: ignore[arg-type]
    h.add_client("c")
    return h


def warnings(h: Harness) -> list[str]:
    return [text for level, text in h.logs if level == "warning"]


def offered(out: Outbox) -> list[int]:
    return [e.task for e in out.policy if isinstance(e, p.TaskReady)]


# ---------------------------------------------------------------------------- Unplaceable
def test_an_unplaceable_task_waits_for_a_worker_that_can_run_it_and_is_warned_about_once():
    h = cluster(W1, W2)
    h.submit({"gpu": ()}, keys=["gpu"], annotations={"gpu": GPU})
    ts = h.state.tasks["gpu"]
    assert ts.state == "no-worker" and h.state.unplaceable == {ts}
    assert warnings(h) == [
        f"1 task {GPU_WARNING} (e.g. 'gpu' with resources={{'GPU': 1}}); "
        "waiting for a suitable worker to join"
    ]
    # A worker pausing and resuming cannot help: the task is not offered again.
    assert offered(h.step(ev.WorkerStatusChanged(W1, "paused"))) == []
    assert offered(h.step(ev.WorkerStatusChanged(W1, "running"))) == []
    # A new worker might: offered again, still unplaceable, and no second warning.
    assert offered(h.add_worker(W3)) == [ts.id]
    assert ts in h.state.unplaceable and len(warnings(h)) == 1
    h.add_worker(GPU_WORKER, resources={"GPU": 1})
    assert h.processing() == {"gpu": GPU_WORKER}
    assert not h.state.unplaceable and not h.state.no_worker
    h.run_until_idle()
    assert h.client_ops() == [("key-in-memory", "gpu")]


def test_unplaceable_warnings_are_one_per_batch_and_reason():
    h = cluster(W1)
    graph = {f"gpu-{i}": () for i in range(5)} | {f"pinned-{i}": () for i in range(3)}
    annotations = {f"gpu-{i}": GPU for i in range(5)}
    annotations |= {f"pinned-{i}": {"workers": ["tcp://gone:1"]} for i in range(3)}
    h.submit(graph, keys=list(graph), annotations=annotations)
    assert len(h.state.unplaceable) == 8
    assert sorted(w.split(" (")[0] for w in warnings(h)) == [
        "3 tasks can never run on the current workers: none of the workers it is restricted "
        "to is connected",
        f"5 tasks {GPU_WARNING}",
    ]
    assert "workers=['tcp://gone:1']" in next(w for w in warnings(h) if w.startswith("3"))
    # The worker they are pinned to registers: they run there; the GPU tasks keep waiting.
    h.add_worker("tcp://gone:1")
    assert set(h.processing()) == {f"pinned-{i}" for i in range(3)}
    assert len(h.state.unplaceable) == 5 and len(warnings(h)) == 2


def test_a_suitable_worker_that_is_paused_means_no_worker_not_unplaceable():
    h = cluster(W1)
    h.add_worker(GPU_WORKER, resources={"GPU": 1}, status="paused")
    h.submit({"gpu": ()}, keys=["gpu"], annotations={"gpu": GPU})
    ts = h.state.tasks["gpu"]
    assert ts.state == "no-worker" and not h.state.unplaceable and warnings(h) == []
    h.step(ev.WorkerStatusChanged(GPU_WORKER, "running"))
    assert h.processing() == {"gpu": GPU_WORKER}


def test_losing_the_only_suitable_worker_makes_a_waiting_task_unplaceable():
    h = cluster(W1)
    h.add_worker(GPU_WORKER, resources={"GPU": 1}, status="paused")
    h.submit({"gpu": ()}, keys=["gpu"], annotations={"gpu": GPU})
    assert warnings(h) == []
    h.step(ev.WorkerDisconnected(GPU_WORKER))
    assert h.state.unplaceable == {h.state.tasks["gpu"]}
    assert len(warnings(h)) == 1 and GPU_WARNING in warnings(h)[0]


def test_no_workers_at_all_is_a_cluster_starting_not_a_mistake():
    h = cluster()
    h.submit({"gpu": (), "plain": ()}, keys=["gpu", "plain"], annotations={"gpu": GPU})
    assert {ts.state for ts in h.state.tasks.values()} == {"no-worker"}
    assert not h.state.unplaceable and warnings(h) == []
    h.add_worker(W1)  # now the GPU task has a worker to be compared with
    assert h.processing() == {"plain": W1}
    assert h.state.unplaceable == {h.state.tasks["gpu"]} and len(warnings(h)) == 1


def test_a_task_that_ran_and_becomes_unplaceable_again_is_warned_about_again():
    h = cluster(W1)
    h.add_worker(GPU_WORKER, resources={"GPU": 1})
    h.submit({"gpu": ()}, keys=["gpu"], annotations={"gpu": GPU})
    h.finish("gpu")
    h.step(ev.WorkerDisconnected(GPU_WORKER))  # its result is lost: it must run again
    assert h.state.tasks["gpu"] in h.state.unplaceable and len(warnings(h)) == 1
    h.add_worker("tcp://gpu2:1", resources={"GPU": 1})
    h.finish("gpu")
    h.step(ev.WorkerDisconnected("tcp://gpu2:1"))
    assert len(warnings(h)) == 2


def test_a_stale_unplaceable_decision_changes_nothing():
    h = cluster(W1)
    h.submit({"a": ()}, keys=["a"])
    out = h.step(ev.PolicyDecisions([p.Unplaceable(h.state.tasks["a"].id, "made up")]))
    assert h.processing() == {"a": W1} and not h.state.unplaceable and out.logs == []


def test_unplaceable_reason_names_what_is_missing():
    workers = {
        0: WorkerInfo(p.WorkerAdded(0, 1, (("GPU", 1.0),), running=False)),
        1: WorkerInfo(p.WorkerAdded(1, 1)),
    }

    def reason(**fields: object) -> str | None:
        return unplaceable_reason(p.TaskReady(7, (0,), **fields), workers)  # type: ignore[arg-type]

    assert reason() is None
    assert reason(resources=(("GPU", 1.0),)) is None  # worker 0 offers it, though paused
    assert reason(resources=(("GPU", 2.0),)) == "no worker offers resources {'GPU': 2.0}"
    assert reason(allowed=frozenset({1}), resources=(("GPU", 1.0),)) == (
        "no allowed worker offers resources {'GPU': 1.0}"
    )
    assert reason(allowed=frozenset({1}), resources=(("GPU", 1.0),), loose=True) is None
    assert reason(allowed=frozenset()) == "none of the workers it is restricted to is connected"
    assert reason(allowed=frozenset(), loose=True) is None
    assert unplaceable_reason(p.TaskReady(7, (0,), resources=(("GPU", 9.0),)), {}) is None


@pytest.mark.parametrize("name", sorted(POLICIES))
def test_every_policy_tells_unplaceable_from_no_worker(name):
    policy = make_policy(name, PolicyConfig())
    tpu = (("TPU", 1.0),)
    decisions = policy.handle(
        [
            p.WorkerAdded(0, 1),
            p.WorkerAdded(1, 1, (("GPU", 1.0),), running=False),
            p.TaskReady(10, (0, 0, 10), resources=(("GPU", 1.0),)),
            p.TaskReady(11, (0, 0, 11), resources=tpu),
            p.TaskReady(12, (0, 0, 12), allowed=frozenset()),
            p.TaskReady(13, (0, 0, 13), allowed=frozenset({1})),
            p.TaskReady(14, (0, 0, 14), allowed=frozenset({1}), resources=tpu),
            p.TaskReady(15, (0, 0, 15), allowed=frozenset(), loose=True),
        ],
        0.0,
    )
    assert {d.task: d for d in decisions} == {
        10: p.NoWorker(10),
        11: p.Unplaceable(11, "no worker offers resources {'TPU': 1.0}"),
        12: p.Unplaceable(12, "none of the workers it is restricted to is connected"),
        13: p.NoWorker(13),
        14: p.Unplaceable(14, "no allowed worker offers resources {'TPU': 1.0}"),
        15: p.Assignment(15, 0),
    }


@pytest.mark.parametrize("name", sorted(POLICIES))
def test_every_policy_sees_a_worker_added_later_in_the_same_batch(name):
    policy = make_policy(name, PolicyConfig())
    decisions = policy.handle(
        [
            p.WorkerAdded(0, 1),
            p.TaskReady(5, (0, 0, 0), resources=(("GPU", 1.0),)),
            p.WorkerAdded(1, 1, (("GPU", 1.0),)),
        ],
        0.0,
    )
    assert decisions == [p.Assignment(5, 1)]


# ---------------------------------------------------------------------------- replicas
def pinned(h: Harness) -> None:
    """a runs on W1, b (needs a) on W2, c (needs a and b) on W2: W2 fetches a."""
    h.submit(
        {"a": (), "b": ("a",), "c": ("a", "b")},
        keys=["c"],
        annotations={"a": {"workers": [W1]}, "b": {"workers": [W2]}, "c": {"workers": [W2]}},
    )


def test_replica_events_follow_every_copy_fetched_or_freed():
    rec = Recorder()
    h = cluster(W1, W2, policy=rec)
    pinned(h)
    a, b, c = (h.state.tasks[k].id for k in "abc")
    w1, w2 = h.state.workers[W1].id, h.state.workers[W2].id
    h.finish("a", nbytes=100)
    # Computed for an assignment: TaskDone says where and how big; no ReplicaAdded.
    assert p.TaskDone(a, w1, None, 100) in rec.events and rec.of(p.ReplicaAdded) == []
    h.step(ev.AddKeys(W2, ["a"]))  # W2 fetched a to run b
    h.step(ev.AddKeys(W2, ["a"]))  # told twice: one replica
    assert rec.of(p.ReplicaAdded) == [p.ReplicaAdded(a, w2, 100)]
    h.finish("b", nbytes=5)
    h.finish("c")
    # a and b are freed everywhere once c is in memory.
    assert sorted(rec.of(p.ReplicaRemoved), key=lambda e: (e.task, e.worker)) == [
        p.ReplicaRemoved(a, w1),
        p.ReplicaRemoved(a, w2),
        p.ReplicaRemoved(b, w2),
    ]
    assert h.state.tasks["a"].state == h.state.tasks["b"].state == "released"
    h.step(ev.ClientReleasesKeys("c", ["c"]))  # c goes, and with it a and b for good
    assert rec.of(p.ReplicaRemoved)[-1] == p.ReplicaRemoved(c, w2)
    assert rec.events.index(p.ReplicaRemoved(c, w2)) < rec.events.index(p.TaskForgotten(c))


def test_a_worker_dropping_a_replica_is_a_replica_removed_but_a_worker_leaving_is_not():
    rec = Recorder()
    h = cluster(W1, W2, policy=rec)
    pinned(h)
    h.finish("a", nbytes=100)
    h.step(ev.AddKeys(W2, ["a"]))
    a = h.state.tasks["a"].id
    h.step(ev.ReleaseWorkerData(W2, "a"))
    assert rec.of(p.ReplicaRemoved) == [p.ReplicaRemoved(a, h.state.workers[W2].id)]
    rec.events.clear()
    h.step(ev.WorkerDisconnected(W1))  # the only replica of a goes with the worker
    assert rec.of(p.ReplicaRemoved) == []
    assert rec.of(p.WorkerRemoved) and h.state.tasks["a"].state != "memory"


def test_scattered_data_is_announced_then_each_replica():
    rec = Recorder()
    h = cluster(W1, W2, policy=rec)
    h.step(ev.DataPlaced("c", {"s": [W1, W2]}, {"s": 50}))
    s = h.state.tasks["s"].id
    w1, w2 = h.state.workers[W1].id, h.state.workers[W2].id
    added = [e for e in rec.events if isinstance(e, p.TaskAdded | p.ReplicaAdded)]
    assert added[0] == p.TaskAdded(s, (0, 0, 0), (), "s")
    assert sorted(added[1:], key=lambda e: e.worker) == [
        p.ReplicaAdded(s, w1, 50),
        p.ReplicaAdded(s, w2, 50),
    ]
    h.add_worker(W3)
    h.step(ev.DataPlaced(None, {"s": [W3]}, {"s": 50}))  # update_data without a client
    assert rec.of(p.ReplicaAdded)[-1] == p.ReplicaAdded(s, h.state.workers[W3].id, 50)


def test_a_seceded_task_result_and_a_second_computation_arrive_as_replicas():
    rec = Recorder()
    h = cluster(W1, W2, policy=rec)
    h.submit({"a": ()}, keys=["a"])
    ts = h.state.tasks["a"]
    worker = ts.processing_on.address
    h.step(ev.LongRunning(worker, "a"))  # its TaskDone goes out now, without a size
    assert rec.of(p.TaskDone) == [p.TaskDone(ts.id, h.state.workers[worker].id)]
    h.finish("a", nbytes=30)
    assert rec.of(p.TaskDone) == [p.TaskDone(ts.id, h.state.workers[worker].id)]
    assert rec.of(p.ReplicaAdded) == [p.ReplicaAdded(ts.id, h.state.workers[worker].id, 30)]
    other = W2 if worker == W1 else W1
    h.step(ev.TaskFinished(other, "a", None, 30))  # e.g. the loser of a steal race
    assert rec.of(p.ReplicaAdded)[-1] == p.ReplicaAdded(ts.id, h.state.workers[other].id, 30)


def test_optional_events_are_not_even_built_for_a_policy_that_does_not_want_them():
    rec = Recorder(wants=frozenset())
    h = cluster(W1, W2, policy=rec)
    pinned(h)
    h.finish("a")
    h.step(ev.AddKeys(W2, ["a"]))
    h.step(ev.ReleaseWorkerData(W2, "a"))
    h.step(ev.BandwidthReported(W1, 1e6))
    h.run_until_idle()
    assert rec.of(p.ReplicaAdded, p.ReplicaRemoved, p.BandwidthMeasured) == []
    assert h.state.bandwidth == pytest.approx(50.5e6)  # the estimate is kept all the same


def test_wanted_events_reads_the_class_attribute_and_refuses_anything_else():
    class Nothing:
        pass

    class Wrong:
        wants = frozenset({p.ReplicaAdded, p.TaskReady})

    assert p.wanted_events(Nothing()) == frozenset()
    assert p.wanted_events(make_policy("blevel")) == p.OPTIONAL_EVENTS
    assert p.wanted_events(make_policy("dask")) == frozenset({p.BandwidthMeasured})
    assert p.wanted_events(make_policy("random")) == frozenset()
    with pytest.raises(ValueError, match="TaskReady"):
        p.wanted_events(Wrong())


def test_blevel_places_by_where_the_inputs_are_now_not_when_the_task_became_ready():
    policy = make_policy("blevel", PolicyConfig())
    policy.handle(
        [
            p.WorkerAdded(0, 1),
            p.WorkerAdded(1, 1),
            p.TaskAdded(1, (0, 0, 1)),
            p.TaskAdded(2, (0, 0, 2), (1,)),
        ],
        0.0,
    )
    # Worker 1 holds the 1 GB input; worker 0 is busy with an unrelated pinned task.
    policy.handle(
        [p.TaskReady(9, (0, 0, 0), allowed=frozenset({0})), p.TaskDone(1, 1, 0.1, 10**9)], 0.0
    )
    # The ready event's snapshot says worker 0 holds it (stale); the replica map knows
    # better: worker 0 dropped its copy and only worker 1 has one.
    stale = p.TaskReady(2, (0, 0, 2), (p.TaskInput(10**9, (0,)),))
    decisions = policy.handle([p.ReplicaAdded(1, 0, 10**9), p.ReplicaRemoved(1, 0), stale], 0.0)
    assert decisions == [p.Assignment(2, 1)]


# ---------------------------------------------------------------------------- bandwidth
def test_bandwidth_estimate_follows_dasks_heartbeat_rule_and_the_policy_hears_big_moves():
    rec = Recorder()
    h = cluster(W1, W2, policy=rec)
    h.step(ev.BandwidthReported(W1, 50e6))  # weight 1 / 2 workers
    assert h.state.bandwidth == pytest.approx(75e6)
    assert rec.of(p.BandwidthMeasured) == [p.BandwidthMeasured(pytest.approx(75e6))]
    h.step(ev.BandwidthReported(W2, 73e6))  # 74e6: within 5 % of what the policy knows
    assert h.state.bandwidth == pytest.approx(74e6)
    assert len(rec.of(p.BandwidthMeasured)) == 1
    for bad in (0.0, -1.0, math.inf, math.nan):
        h.step(ev.BandwidthReported(W1, bad))
    h.step(ev.BandwidthReported("tcp://unknown:1", 1.0))
    assert h.state.bandwidth == pytest.approx(74e6)
    assert rec.inner._bandwidth == pytest.approx(75e6)  # locality uses what it was told


def test_heartbeat_metrics_give_the_workers_bandwidth_estimate_or_nothing():
    assert reported_bandwidth({"bandwidth": {"total": 12_345_678, "workers": {}}}) == 12345678.0
    for garbage in (None, [], {}, {"bandwidth": 5}, {"bandwidth": {"total": "fast"}},
                    {"bandwidth": {"total": True}}, {"bandwidth": {"total": -3}}):  # fmt: skip
        assert reported_bandwidth(garbage) is None


def load_worker_0_then_offer_a_task_whose_input_it_holds(policy: p.Policy) -> list[p.Decision]:
    """Worker 0 holds a 100 MB input and has three pinned tasks queued; worker 1 is idle."""
    setup: list[p.PolicyEvent] = [p.WorkerAdded(0, 1), p.WorkerAdded(1, 1)]
    setup += [p.TaskReady(i, (0, 0, i), allowed=frozenset({0})) for i in range(3)]
    policy.handle(setup, 0.0)
    return policy.handle([p.TaskReady(10, (0, 0, 10), (p.TaskInput(100_000_000, (0,)),))], 0.0)


@pytest.mark.parametrize("name", ["dask", "blevel", "locality"])
def test_policies_move_data_or_not_by_the_measured_bandwidth(name):
    # Transfers assumed free: the idle worker wins...
    fast = make_policy(name, PolicyConfig(bandwidth=1e15))
    assert load_worker_0_then_offer_a_task_whose_input_it_holds(fast) == [p.Assignment(10, 1)]
    # ...until the runtime measures 1 MB/s: then moving 100 MB costs more than waiting.
    measured = make_policy(name, PolicyConfig(bandwidth=1e15))
    measured.handle([p.BandwidthMeasured(1e6)], 0.0)
    assert load_worker_0_then_offer_a_task_whose_input_it_holds(measured) == [p.Assignment(10, 0)]
