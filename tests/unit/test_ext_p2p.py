"""The P2P extension without an event loop: runs, pinning, the barrier broadcast, ending,
restarting on worker loss, and the state events it drives.

The graph is a shuffle's shape: inputs -> transfer tasks -> one barrier -> output tasks,
with a small ``ShuffleSpec`` of our own (range-sharded like dask's dataframe spec).
"""

from __future__ import annotations

import pickle
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import pytest
from distributed.shuffle._core import ShuffleId, ShuffleSpec
from distributed.shuffle._exceptions import P2PConsistencyError
from harness import Harness

from dsched.ext.lifecycle import Lifecycle
from dsched.ext.p2p import P2PShuffles
from dsched.ext.protocol import Fail, Reply, Rpc
from dsched.ext.pubsub import PubSub
from dsched.policy.dask_like import DaskPolicy
from dsched.state import events as ev

pytestmark = pytest.mark.timeout(60)

W0, W1, W2 = "tcp://w0:1", "tcp://w1:1", "tcp://w2:1"
N = 4  # inputs, transfers and outputs per shuffle


@dataclass(frozen=True)
class RangeSpec(ShuffleSpec[int]):
    npartitions: int = N

    @property
    def output_partitions(self) -> Iterator[int]:
        yield from range(self.npartitions)

    def pick_worker(self, partition: int, workers: Sequence[str]) -> str:
        return workers[len(workers) * partition // self.npartitions]

    def create_run_on_worker(self, *args: Any, **kwargs: Any) -> Any:
        raise AssertionError("workers only")


def barrier(name: str) -> str:
    return f"shuffle-barrier-{name}"


def shuffle_graph(name: str, outputs: str | None = None) -> dict[Any, tuple[Any, ...]]:
    """inputs -> transfers -> barrier -> outputs; ``outputs`` names shared output tasks
    (a hash join's two shuffles feed the same ones)."""
    out = outputs or f"out-{name}"
    graph: dict[Any, tuple[Any, ...]] = {}
    for i in range(N):
        graph[(f"in-{name}", i)] = ()
        graph[(f"transfer-{name}", i)] = ((f"in-{name}", i),)
    graph[barrier(name)] = tuple((f"transfer-{name}", i) for i in range(N))
    for i in range(N):
        graph[(out, i)] = (*graph.get((out, i), ()), barrier(name))
    return graph


def submit(h: Harness, graph: dict[Any, tuple[Any, ...]], *names: str) -> None:
    tasks = [ev.NewTask(key, deps, f"run-{key}", {}) for key, deps in graph.items()]
    order = {key: i for i, key in enumerate(graph)}
    wanted = [key for key in graph if isinstance(key, tuple) and key[0].startswith("out")]
    specs = {barrier(name): RangeSpec(ShuffleId(name), disk=False) for name in names}
    h.step(ev.GraphReceived("c", tasks, wanted, order, shuffle_specs=specs))


def ask(h: Harness, op: str, **args: Any) -> Any:
    """One RPC answered in its tick: a Reply's value, or the Fail."""
    rid = h.core.request(op, "tcp://worker", args, h.now)
    h.tick()
    assert h.last_flush is not None
    (answer,) = [a for a in h.last_flush.answers if a.request == rid]
    return answer.value if isinstance(answer, Reply) else answer


def run_spec(reply: dict[str, Any]) -> Any:
    assert reply["status"] == "OK", reply
    return reply["run_spec"].unpickle()


def error_of(reply: dict[str, Any]) -> BaseException:
    assert reply["status"] == "error", reply
    exc = pickle.loads(reply["exception"])
    assert isinstance(exc, BaseException)
    return exc


def setup(workers: Sequence[str] = (W0, W1)) -> tuple[Harness, P2PShuffles, PubSub]:
    pubsub = PubSub()
    p2p = P2PShuffles(pubsub)
    h = Harness(policy=DaskPolicy(), extensions=[pubsub, p2p])
    for address in workers:
        h.add_worker(address, nthreads=2)
    h.add_client("c")
    return h, p2p, pubsub


def run_inputs(h: Harness, name: str) -> None:
    for i in range(N):
        h.finish((f"in-{name}", i))


def create(h: Harness, name: str = "S", key_index: int = 0) -> Any:
    key = (f"transfer-{name}", key_index)
    worker = h.state.tasks[key].processing_on.address
    return run_spec(ask(h, "shuffle_get_or_create", shuffle_id=name, key=key, worker=worker))


def through_barrier(h: Harness, name: str = "S") -> None:
    for i in range(N):
        h.finish((f"transfer-{name}", i))
    assert h.state.tasks[barrier(name)].state == "processing"
    h.finish(barrier(name))


def reply_all(h: Harness, rpcs: list[tuple[str, Rpc]], error: BaseException | None = None) -> None:
    for extension, rpc in rpcs:
        h.core.rpc_reply(extension, rpc.token, None, error, h.now)
    h.tick()


# ----------------------------------------------------------------------------- runs
def test_the_first_transfer_creates_the_run_with_range_sharded_outputs() -> None:
    h, p2p, _ = setup()
    submit(h, shuffle_graph("S"), "S")
    run_inputs(h, "S")
    spec = create(h)
    assert spec.spec.id == "S"
    assert sorted(spec.worker_for) == list(range(N))
    assert set(spec.worker_for.values()) == {W0, W1}
    # Every output is exempt from root-task queuing (Dask's _queueable = False).
    assert {ts.key for ts in h.state.unqueueable} == {("out-S", i) for i in range(N)}
    # The other workers get the same run; run ids only grow.
    again = run_spec(ask(h, "shuffle_get", id="S", worker=W1))
    assert again.run_id == spec.run_id
    assert p2p.participating_workers() == {W0, W1}


def test_refusals_are_error_dicts_the_worker_raises() -> None:
    h, _, _ = setup()
    submit(h, shuffle_graph("S"), "S")
    unknown = error_of(ask(h, "shuffle_get", id="S", worker=W0))
    assert isinstance(unknown, P2PConsistencyError) and "No active shuffle" in str(unknown)
    # The transfer task is not processing yet (its input is not done).
    not_running = ask(h, "shuffle_get_or_create", shuffle_id="S", key=("transfer-S", 0), worker=W0)
    assert "to be processing" in str(error_of(not_running))
    no_barrier = ask(h, "shuffle_get_or_create", shuffle_id="X", key=("in-S", 0), worker=W0)
    assert "does not exist" in str(error_of(no_barrier))
    stranger = ask(h, "shuffle_get", id="S", worker="tcp://nobody:1")
    assert "unaware of this worker" in str(error_of(stranger))
    # Dask's TypeError for a request that does not fit the handler's signature.
    wrong = ask(h, "shuffle_get", id="S", worker=W0, extra=1)
    assert isinstance(wrong, Fail) and "unexpected keyword argument 'extra'" in str(wrong.exception)


def test_hash_join_shuffles_align_their_shared_outputs() -> None:
    h, _, _ = setup((W0, W1, W2))
    graph = {**shuffle_graph("L", outputs="out-join"), **shuffle_graph("R", outputs="out-join")}
    for i in range(N):
        graph[("out-join", i)] = (barrier("L"), barrier("R"))
    submit(h, graph, "L", "R")
    run_inputs(h, "L")
    run_inputs(h, "R")
    left, right = create(h, "L"), create(h, "R")
    # Without alignment the rotation per shuffle would have moved every partition.
    assert left.worker_for == right.worker_for


# ----------------------------------------------------------------------------- pinning
def test_outputs_pinned_on_reschedule_and_restored_when_the_shuffle_ends() -> None:
    h, p2p, _ = setup()
    submit(h, shuffle_graph("S"), "S")
    run_inputs(h, "S")
    spec = create(h)
    through_barrier(h)
    key = ("out-S", 0)
    home = spec.worker_for[0]
    stale = ask(h, "shuffle_restrict_task", id="S", run_id=spec.run_id - 1, key=key, worker=home)
    assert "stale" in str(error_of(stale))
    ahead = ask(h, "shuffle_restrict_task", id="S", run_id=spec.run_id + 1, key=key, worker=home)
    assert "invalid" in str(error_of(ahead))
    ok = ask(h, "shuffle_restrict_task", id="S", run_id=spec.run_id, key=key, worker=home)
    assert ok == {"status": "OK"}
    assert h.state.tasks[key].worker_restrictions == {home}
    # The worker raises Reschedule: the task lands on its pinned worker.
    running_on = h.state.tasks[key].processing_on.address
    h.step(ev.Reschedule(running_on, key))
    assert h.state.tasks[key].processing_on.address == home
    h.run_until_idle()
    # The client still holds the outputs: the barrier is no longer needed and is released,
    # which ends the shuffle on the workers and lifts the pin.
    assert h.state.tasks[barrier("S")].state == "released"
    fails = [m for w in (W0, W1) for m in h.worker_ops(w, "shuffle-fail")]
    assert {m["shuffle_id"] for m in fails} == {"S"} and len(fails) == 2
    assert all(m["run_id"] == spec.run_id for m in fails)
    assert h.state.tasks[key].worker_restrictions is None
    assert not p2p.active and not p2p.original_restrictions


def test_forgetting_the_shuffle_forgets_everything() -> None:
    h, p2p, _ = setup()
    submit(h, shuffle_graph("S"), "S")
    run_inputs(h, "S")
    create(h)
    through_barrier(h)
    h.run_until_idle()
    h.step(ev.ClientReleasesKeys("c", [("out-S", i) for i in range(N)]))
    assert not h.state.tasks
    assert not (p2p.active or p2p.runs or p2p.specs or p2p.archived_by_stimulus)
    assert not h.state.observe_transitions  # transitions are observed only while needed


# ----------------------------------------------------------------------------- the barrier
def test_barrier_broadcasts_inputs_done_and_retries_connection_errors() -> None:
    h, p2p, _ = setup()
    submit(h, shuffle_graph("S"), "S")
    run_inputs(h, "S")
    spec = create(h)
    rid = h.core.request("shuffle_barrier", W0, {"id": "S", "run_id": spec.run_id,
                                                 "consistent": True}, h.now)  # fmt: skip
    h.tick()
    assert not h.last_flush.answers  # parked until every participant answered
    rpcs = list(h.last_flush.rpcs)
    assert sorted(rpc.address for _, rpc in rpcs) == [W0, W1]
    assert all(rpc.msg["op"] == "shuffle_inputs_done" for _, rpc in rpcs)
    # W1 cannot be reached this round: a retry after Dask's 0.1 s, to W1 only.
    (w0,) = [r for r in rpcs if r[1].address == W0]
    (w1,) = [r for r in rpcs if r[1].address == W1]
    reply_all(h, [w0])
    reply_all(h, [w1], error=ConnectionRefusedError("no"))
    assert not h.last_flush.answers
    ((extension, timer),) = h.last_flush.timers
    h.core.timer(extension, timer.token, h.now + 0.1)
    h.tick()
    retry = list(h.last_flush.rpcs)
    assert [rpc.address for _, rpc in retry] == [W1]
    reply_all(h, retry)
    assert [(a.request, a.value) for a in h.last_flush.answers] == [(rid, None)]
    assert not p2p.barriers


def test_barrier_of_a_stale_run_or_unknown_shuffle_fails() -> None:
    h, _, _ = setup()
    submit(h, shuffle_graph("S"), "S")
    run_inputs(h, "S")
    spec = create(h)
    stale = ask(h, "shuffle_barrier", id="S", run_id=spec.run_id + 1, consistent=True)
    assert isinstance(stale, Fail) and "does not match" in str(stale.exception)
    unknown = ask(h, "shuffle_barrier", id="X", run_id=1, consistent=True)
    assert isinstance(unknown, Fail) and isinstance(unknown.exception, KeyError)


def test_barrier_with_a_departed_participant_fails() -> None:
    h, _, _ = setup()
    submit(h, shuffle_graph("S"), "S")
    run_inputs(h, "S")
    spec = create(h)
    rid = h.core.request(
        "shuffle_barrier", W0, {"id": "S", "run_id": spec.run_id, "consistent": True}, h.now
    )
    h.tick()
    rpcs = list(h.last_flush.rpcs)
    h.step(ev.WorkerDisconnected(W1))
    reply_all(h, rpcs, error=ConnectionRefusedError("gone"))
    (answer,) = [a for a in h.last_flush.answers if a.request == rid]
    assert isinstance(answer, Fail) and "left during shuffle" in str(answer.exception)


def test_inconsistent_barrier_restarts_the_shuffle() -> None:
    h, _, _ = setup()
    submit(h, shuffle_graph("S"), "S")
    run_inputs(h, "S")
    spec = create(h)
    for i in range(N):
        h.finish(("transfer-S", i))
    assert ask(h, "shuffle_barrier", id="S", run_id=spec.run_id, consistent=False) is None
    # Transfers are computed again (and so their inputs, released once the transfers had
    # run); the barrier waits for them.
    assert h.state.tasks[barrier("S")].state == "waiting"
    assert all(h.state.tasks[("in-S", i)].state == "processing" for i in range(N))
    assert all(h.state.tasks[("transfer-S", i)].state == "waiting" for i in range(N))


# ----------------------------------------------------------------------------- failures
def test_a_participant_leaving_fails_the_run_and_restarts_the_shuffle() -> None:
    h, p2p, _ = setup()
    submit(h, shuffle_graph("S"), "S")
    run_inputs(h, "S")
    first = create(h)
    for i in range(N):
        if h.state.tasks[("transfer-S", i)].processing_on.address == W0:
            h.finish(("transfer-S", i))
    h.step(ev.WorkerDisconnected(W1))
    (fail,) = h.worker_ops(W0, "shuffle-fail")
    assert fail["run_id"] == first.run_id and "left during active" in fail["message"]
    assert not p2p.active
    # Everything of the shuffle runs again, on the worker that is left.
    transfers = [h.state.tasks[("transfer-S", i)] for i in range(N)]
    assert not any(ts.state == "memory" for ts in transfers)
    while any(ts.state != "processing" for ts in transfers):
        (running,) = [key for key in h.processing() if key[0] == "in-S"][:1]
        h.finish(running)
    second = create(h)
    assert second.run_id > first.run_id
    assert set(second.worker_for.values()) == {W0}
    through_barrier(h)
    h.run_until_idle()
    assert all(h.state.tasks[("out-S", i)].state == "memory" for i in range(N))


def test_losing_the_barriers_result_restarts_the_shuffle() -> None:
    h, p2p, _ = setup((W0, W1, W2))
    submit(h, shuffle_graph("S"), "S")
    run_inputs(h, "S")
    create(h)
    for i in range(N):
        h.finish(("transfer-S", i))
    barrier_ts = h.state.tasks[barrier("S")]
    h.finish(barrier("S"))
    (holder,) = [ws.address for ws in barrier_ts.who_has]
    # The holder only computed the barrier: its loss is not a participant leaving, so
    # only the barrier's release (lost with it) can end and restart the shuffle.
    p2p.active["S"].participating_workers.discard(holder)
    others = sorted(p2p.active["S"].participating_workers)
    h.step(ev.WorkerDisconnected(holder))
    assert "S" not in p2p.active
    for address in others:
        (fail,) = h.worker_ops(address, "shuffle-fail")
        assert fail["message"].endswith("forgotten")  # the barrier ended it, not a departure
    assert any("restarted" in text for _, text in h.logs)
    assert barrier_ts.state == "waiting"  # computed again, after its transfers


def test_an_erring_transfer_ends_the_shuffle_and_reports_p2p_failed() -> None:
    h, p2p, pubsub = setup()
    submit(h, shuffle_graph("S"), "S")
    run_inputs(h, "S")
    create(h)
    h.fail(("transfer-S", 0))
    assert not p2p.active
    assert h.state.tasks[barrier("S")].state == "erred"
    assert {m["shuffle_id"] for m in h.worker_ops(W0, "shuffle-fail")} == {"S"}
    (event,) = pubsub.topics["p2p"].events
    assert event[1]["action"] == "p2p-failed" and event[1]["shuffle"] == "S"


def test_restart_forgets_every_shuffle() -> None:
    h, p2p, _ = setup()
    submit(h, shuffle_graph("S"), "S")
    run_inputs(h, "S")
    create(h)
    h.step(ev.Restart())
    assert not (p2p.active or p2p.runs or p2p.specs or p2p.original_restrictions)


# ----------------------------------------------------------------------------- state events
def test_recompute_tasks_restarts_running_dependents_and_keeps_what_is_wanted() -> None:
    h = Harness()
    h.add_worker(W0)
    h.add_client("c")
    h.submit({"a": (), "b": ("a",), "c": ("b",)}, keys=["c"])
    h.finish("a")
    h.finish("b")
    assert h.state.tasks["c"].state == "processing"
    h.step(ev.RecomputeTasks(["c", "b"]))
    assert "b" in h.freed_on(W0) and "c" in h.freed_on(W0)
    # b's input was released once b had run: it is computed again first.
    assert [h.state.tasks[k].state for k in "abc"] == ["processing", "waiting", "waiting"]
    h.run_until_idle()
    assert h.state.tasks["c"].state == "memory"


def test_set_worker_restrictions_offers_no_worker_tasks_again() -> None:
    h = Harness()
    h.add_worker(W0)
    h.add_client("c")
    h.submit({"x": ()}, keys=["x"], annotations={"x": {"workers": ["tcp://elsewhere:1"]}})
    assert h.state.tasks["x"].state == "no-worker"
    h.step(ev.SetWorkerRestrictions({"x": frozenset({W0}), "unknown": None}))
    assert h.state.tasks["x"].processing_on.address == W0


def test_participants_are_not_picked_for_downscaling() -> None:
    pubsub = PubSub()
    p2p = P2PShuffles(pubsub)
    lifecycle = Lifecycle(pubsub, busy_workers=p2p.participating_workers)
    h = Harness(policy=DaskPolicy(), extensions=[pubsub, p2p, lifecycle])
    for address in (W0, W1):
        h.add_worker(address, nthreads=2)
    h.add_client("c")
    submit(h, shuffle_graph("S"), "S")
    run_inputs(h, "S")
    create(h)
    h.add_worker(W2, nthreads=2)  # joined after the run was created: not a participant
    h.core.request("retire_workers", "tcp://client", {"n": 2}, h.now)
    h.tick()
    # W2 holds nothing, so it is retired at once; the participants stay, although n=2.
    assert {address: ws.status for address, ws in h.state.workers.items()} == {
        W0: "running",
        W1: "running",
    }
