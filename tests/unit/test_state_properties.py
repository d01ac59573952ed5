"""Random event sequences against the state machine: every step keeps every invariant, and
when the dust settles every wanted key is in memory or erred and nothing else is held.

The policy also keeps the replica map the optional events describe (``TaskDone`` with a
size, ``ReplicaAdded``, ``ReplicaRemoved``, ``WorkerRemoved``); after every step it must
equal the runtime's ``who_has``. Some tasks need a GPU that only one worker offers, so tasks
become unplaceable and placeable again as workers come and go."""

from __future__ import annotations

import pytest
from harness import Harness
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dsched.policy import protocol as p
from dsched.policy.locality import LocalityPolicy
from dsched.policy.protocol import Steal
from dsched.state import events as ev
from dsched.state.edges import EDGES

pytestmark = pytest.mark.timeout(120)

WORKERS = ["tcp://w0:1", "tcp://w1:1", "tcp://w2:1"]
CLIENTS = ["c0", "c1"]
# Only w2 (not there at the start) can run the tasks that need a GPU.
RESOURCES = {"tcp://w2:1": {"GPU": 1}}


class ReplicaMirror:
    """Locality placement, plus the replica map a policy keeps from the events it wants."""

    wants = p.OPTIONAL_EVENTS

    def __init__(self) -> None:
        self.inner = LocalityPolicy()
        self.replicas: set[tuple[int, int]] = set()  # (task, worker)

    def handle(self, events, now):  # type: ignore[no-untyped-def]
        for e in events:
            if (isinstance(e, p.TaskDone) and e.nbytes is not None) or isinstance(
                e, p.ReplicaAdded
            ):
                assert (e.task, e.worker) not in self.replicas, e
                self.replicas.add((e.task, e.worker))
            elif isinstance(e, p.ReplicaRemoved):
                self.replicas.remove((e.task, e.worker))
            elif isinstance(e, p.WorkerRemoved):
                self.replicas = {(t, w) for t, w in self.replicas if w != e.worker}
        return self.inner.handle(events, now)


class MirroredHarness(Harness):
    """Also checks, after every step, that the transition log tells each key's story: every
    move starts where the key's previous one finished, every edge is in the table, and the
    last move of every known task finished in its current state."""

    def __init__(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        super().__init__(*args, **kwargs)
        self.logged = 0  # transition_log entries checked so far
        self.last_state: dict[object, str] = {}

    def step(self, event):  # type: ignore[no-untyped-def]
        out = super().step(event)
        who_has = {(ts.id, ws.id) for ts in self.state.tasks.values() for ws in ts.who_has}
        assert self.policy.replicas == who_has, (event, self.policy.replicas ^ who_has)
        self.check_story(event)
        return out

    def check_story(self, event: object) -> None:
        log = self.state.transition_log
        assert len(log) < log.maxlen, "the test outgrew the log"
        for key, start, finish, stimulus_id, _ in list(log)[self.logged :]:
            previous = self.last_state.get(key, "forgotten")
            expected = "released" if previous == "forgotten" else previous  # a new task
            assert start == expected, (event, key, start, finish, previous)
            assert (start, finish) in EDGES and stimulus_id, (key, start, finish)
            self.last_state[key] = finish
        self.logged = len(log)
        for key, ts in self.state.tasks.items():
            last = self.last_state.get(key, "forgotten")
            assert ts.state == ("released" if last == "forgotten" else last), (event, ts)


@st.composite
def random_graph(draw: st.DrawFn) -> tuple[dict[str, tuple[str, ...]], set[str]]:
    size = draw(st.integers(1, 12))
    graph: dict[str, tuple[str, ...]] = {}
    gpu: set[str] = set()
    for i in range(size):
        earlier = list(graph)
        deps = draw(st.lists(st.sampled_from(earlier), max_size=3, unique=True)) if earlier else []
        graph[f"t{i}"] = tuple(deps)
        if draw(st.integers(0, 5)) == 0:
            gpu.add(f"t{i}")
    return graph, gpu


actions = st.one_of(
    st.tuples(st.just("finish"), st.integers(0, 50)),
    st.tuples(st.just("fail"), st.integers(0, 50)),
    st.tuples(st.just("kill"), st.sampled_from(WORKERS)),
    st.tuples(st.just("add"), st.sampled_from(WORKERS)),
    st.tuples(st.just("pause"), st.sampled_from(WORKERS)),
    st.tuples(st.just("resume"), st.sampled_from(WORKERS)),
    st.tuples(st.just("release"), st.sampled_from(CLIENTS), st.integers(0, 50)),
    st.tuples(st.just("cancel"), st.sampled_from(CLIENTS), st.integers(0, 50)),
    st.tuples(st.just("drop-replica"), st.integers(0, 50)),
    st.tuples(st.just("stale-result"), st.integers(0, 50)),
    st.tuples(st.just("leave"), st.sampled_from(CLIENTS)),
    st.tuples(st.just("retry"), st.sampled_from(CLIENTS)),
    st.tuples(st.just("steal"), st.integers(0, 50), st.sampled_from(WORKERS)),
    st.tuples(
        st.just("steal-response"),
        st.integers(0, 50),
        st.sampled_from(["ready", "waiting", "executing", "memory", "released", None]),
        st.booleans(),  # stale: answer with a stimulus_id that was never sent
    ),
    st.tuples(st.just("retire"), st.sampled_from(WORKERS), st.booleans()),
    st.tuples(st.just("restart")),
    st.tuples(st.just("scatter"), st.sampled_from(CLIENTS), st.sampled_from(WORKERS)),
    st.tuples(st.just("copy"), st.integers(0, 50), st.sampled_from(WORKERS), st.booleans()),
    st.tuples(st.just("secede"), st.integers(0, 50)),
    st.tuples(st.just("bandwidth"), st.sampled_from(WORKERS), st.sampled_from([1e6, 5e8, 0.0])),
)


@settings(
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(
    graphs=st.lists(st.tuples(st.sampled_from(CLIENTS), random_graph()), min_size=1, max_size=3),
    warmup=st.integers(0, 8),
    script=st.lists(actions, min_size=4, max_size=40),
    allowed_failures=st.integers(0, 3),
    actor_ids=st.sets(st.integers(0, 11), max_size=3),
)
def test_random_histories_keep_invariants_and_settle(
    graphs, warmup, script, allowed_failures, actor_ids
):
    h = MirroredHarness(ReplicaMirror(), allowed_failures=allowed_failures)
    for address in WORKERS[:2]:
        h.add_worker(address)
    for client in CLIENTS:
        h.add_client(client)
    wanted: dict[str, set[str]] = {c: set() for c in CLIENTS}
    for n, (client, (drawn, gpu)) in enumerate(graphs):
        # Keys are shared across graphs on purpose: later graphs reuse earlier futures.
        prefix = f"g{n % 2}"
        renamed = {prefix + k: tuple(prefix + d for d in deps) for k, deps in drawn.items()}
        graph = {k: v for k, v in renamed.items() if k not in h.state.tasks}
        keys = [k for k in graph if not any(k in deps for deps in graph.values())]
        if not keys:
            continue
        annotations = {prefix + k: {"resources": {"GPU": 1}} for k in gpu}
        actors = [k for k in (f"{prefix}t{i}" for i in sorted(actor_ids)) if k in graph]
        tasks = [
            ev.NewTask(k, deps, f"run-{k}", dict(annotations.get(k, {})))
            for k, deps in graph.items()
        ]
        order = {k: i for i, k in enumerate(graph)}
        h.step(ev.GraphReceived(client, tasks, keys, order, actors=actors))
        wanted[client] |= set(keys)
    scattered = 0
    # Finish a few tasks first, so that the script finds data in memory to copy and drop.
    for _ in range(warmup):
        running = sorted(h.processing(), key=str)
        if running:
            h.finish(running[0])

    for action in script:
        kind = action[0]
        running = sorted(h.processing(), key=str)
        in_memory = sorted((k for k, ts in h.state.tasks.items() if ts.who_has), key=str)
        if kind in ("finish", "fail", "stale-result") and running:
            key = running[action[1] % len(running)]
            if kind == "finish":
                h.finish(key)
            elif kind == "fail":
                h.fail(key)
            else:
                ts = h.state.tasks[key]
                h.step(ev.TaskFinished(ts.processing_on.address, key, -1, 8))
        elif kind == "kill":
            h.step(ev.WorkerDisconnected(action[1]))
        elif kind == "add" and action[1] not in h.state.workers:
            h.add_worker(action[1], resources=RESOURCES.get(action[1], {}))
        elif kind in ("pause", "resume") and action[1] in h.state.workers:
            status = "paused" if kind == "pause" else "running"
            h.step(ev.WorkerStatusChanged(action[1], status))
        elif kind in ("release", "cancel") and wanted[action[1]]:
            keys = sorted(wanted[action[1]])
            key = keys[action[2] % len(keys)]
            if kind == "release":
                h.step(ev.ClientReleasesKeys(action[1], [key]))
            else:
                h.step(ev.CancelKeys(action[1], [key]))
            wanted[action[1]].discard(key)
        elif kind == "drop-replica" and in_memory:
            ts = h.state.tasks[in_memory[action[1] % len(in_memory)]]
            ws = min(ts.who_has, key=lambda w: w.address)
            h.step(ev.ReleaseWorkerData(ws.address, ts.key))
        elif kind == "leave" and action[1] in h.state.clients:
            h.step(ev.ClientDisconnected(action[1]))
            wanted[action[1]].clear()
        elif kind == "retry" and wanted[action[1]]:
            h.step(ev.RetryKeys(action[1], sorted(wanted[action[1]])))
        elif kind == "steal" and running:
            ts = h.state.tasks[running[action[1] % len(running)]]
            thief = h.state.workers.get(action[2])
            h.step(ev.PolicyDecisions([Steal(ts.id, thief.id if thief else 99)]))
        elif kind == "steal-response" and h.state.steals:
            pending = sorted(h.state.steals.items(), key=lambda item: item[1][0])
            ts, (stimulus_id, _) = pending[action[1] % len(pending)]
            if action[3]:
                stimulus_id = "steal-stale"
            h.step(ev.StealResponse(ts.processing_on.address, ts.key, action[2], stimulus_id))
        elif kind == "retire" and action[1] in h.state.workers:
            out = h.step(ev.RetireWorkers([action[1]]))
            for address, msg in out.messages("acquire-replicas"):
                h.step(ev.AddKeys(address, list(msg["who_has"])))  # the fetch succeeded
            if action[2]:  # the retirement completes: the worker leaves, as expected
                h.step(ev.WorkerDisconnected(action[1], expected=True))
        elif kind == "restart":
            h.step(ev.Restart())
            assert h.state.tasks == {}
            for keys in wanted.values():
                keys.clear()
        elif kind == "scatter" and action[2] in h.state.workers:
            scattered += 1
            key = f"s{scattered}"
            h.step(ev.DataPlaced(action[1], {key: [action[2]]}, {key: 8}))
            wanted[action[1]].add(key)
        elif kind == "copy" and in_memory and action[2] in h.state.workers:
            # A worker reports a replica it fetched, or update_data without a client.
            key = in_memory[action[1] % len(in_memory)]
            if action[3]:
                h.step(ev.AddKeys(action[2], [key]))
            else:
                h.step(ev.DataPlaced(None, {key: [action[2]]}, {key: 8}))
        elif kind == "secede" and running:
            key = running[action[1] % len(running)]
            h.step(ev.LongRunning(h.state.tasks[key].processing_on.address, key))
        elif kind == "bandwidth":
            h.step(ev.BandwidthReported(action[1], action[2]))

    # Settle: make sure a worker runs, then finish everything.
    for address in WORKERS:
        if address not in h.state.workers:
            h.add_worker(address, resources=RESOURCES.get(address, {}))
        else:
            h.step(ev.WorkerStatusChanged(address, "running"))
    h.run_until_idle()
    assert not h.state.no_worker and not h.state.unplaceable
    for client, keys in wanted.items():
        cs = h.state.clients.get(client)
        for key in keys:
            ts = h.state.tasks.get(key)
            if ts is not None and cs is not None and cs in ts.who_wants:
                assert ts.state in ("memory", "erred"), ts
    # Everybody leaves: nothing may stay behind, on the scheduler or on any worker.
    for client in list(h.state.clients):
        h.step(ev.ClientDisconnected(client))
    assert h.state.tasks == {}
    assert all(not ws.has_what and not ws.processing for ws in h.state.workers.values())
