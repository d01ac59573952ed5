"""Random event sequences against the state machine: every step keeps every invariant, and
when the dust settles every wanted key is in memory or erred and nothing else is held."""

from __future__ import annotations

import pytest
from harness import Harness
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dsched.policy.protocol import Steal
from dsched.state import events as ev

pytestmark = pytest.mark.timeout(120)

WORKERS = ["tcp://w0:1", "tcp://w1:1", "tcp://w2:1"]
CLIENTS = ["c0", "c1"]


@st.composite
def random_graph(draw: st.DrawFn) -> dict[str, tuple[str, ...]]:
    size = draw(st.integers(1, 12))
    graph: dict[str, tuple[str, ...]] = {}
    for i in range(size):
        earlier = list(graph)
        deps = draw(st.lists(st.sampled_from(earlier), max_size=3, unique=True)) if earlier else []
        graph[f"t{i}"] = tuple(deps)
    return graph


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
)


@settings(
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(
    graphs=st.lists(st.tuples(st.sampled_from(CLIENTS), random_graph()), min_size=1, max_size=3),
    script=st.lists(actions, max_size=40),
    allowed_failures=st.integers(0, 3),
)
def test_random_histories_keep_invariants_and_settle(graphs, script, allowed_failures):
    h = Harness(allowed_failures=allowed_failures)
    for address in WORKERS[:2]:
        h.add_worker(address)
    for client in CLIENTS:
        h.add_client(client)
    wanted: dict[str, set[str]] = {c: set() for c in CLIENTS}
    for n, (client, drawn) in enumerate(graphs):
        # Keys are shared across graphs on purpose: later graphs reuse earlier futures.
        prefix = f"g{n % 2}"
        renamed = {prefix + k: tuple(prefix + d for d in deps) for k, deps in drawn.items()}
        graph = {k: v for k, v in renamed.items() if k not in h.state.tasks}
        keys = [k for k in graph if not any(k in deps for deps in graph.values())]
        if not keys:
            continue
        h.submit(graph, keys, client=client)
        wanted[client] |= set(keys)

    for action in script:
        kind = action[0]
        running = sorted(h.processing(), key=str)
        tasks = sorted(h.state.tasks, key=str)
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
            h.add_worker(action[1])
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
        elif kind == "drop-replica" and tasks:
            ts = h.state.tasks[tasks[action[1] % len(tasks)]]
            for ws in list(ts.who_has)[:1]:
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

    # Settle: make sure a worker runs, then finish everything.
    for address in WORKERS:
        if address not in h.state.workers:
            h.add_worker(address)
        else:
            h.step(ev.WorkerStatusChanged(address, "running"))
    h.run_until_idle()
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
