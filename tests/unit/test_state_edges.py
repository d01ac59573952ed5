"""The automaton as a table (``dsched.state.edges.EDGES``), the per-key story, transitions
as observations, stimulus ids, and the explicit errors of the state machine.

The state machine is driven by hand here (no policy: every assignment is a decision the
test makes), so that tasks can be held in ``ready`` and scenarios reach edges that the
random histories of test_state_properties.py rarely do.
"""

from __future__ import annotations

import dataclasses
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from dsched.policy import protocol as p
from dsched.state import InvalidTransition, InvariantError
from dsched.state import events as ev
from dsched.state.diagram import document_block, markdown_table, mermaid
from dsched.state.edges import EDGES, NEXT, STATES
from dsched.state.machine import SchedulerState
from dsched.state.outbox import Outbox

pytestmark = pytest.mark.timeout(60)

W1, W2, W3 = "tcp://w1:1", "tcp://w2:1", "tcp://w3:1"
DOC = Path(__file__).resolve().parents[2] / "docs" / "state-machine.md"


class Driver:
    """The state machine alone: events in, ``validate()`` after each, decisions by hand."""

    def __init__(self, workers: tuple[str, ...] = (W1, W2), **kwargs: Any) -> None:
        self.state = SchedulerState(
            killed_worker=lambda key, address, n: ("KilledWorker", key, address), **kwargs
        )
        self.now = 0.0
        for address in workers:
            self.step(ev.WorkerConnected(address, 1))
        self.step(ev.ClientConnected("c"))

    def step(self, event: ev.Event) -> Outbox:
        self.now += 1.0
        out = self.state.handle(event, self.now)
        self.state.validate()
        return out

    def submit(self, graph: dict[str, tuple[str, ...]], keys: list[str], **kw: Any) -> Outbox:
        tasks = [
            ev.NewTask(k, deps, f"run-{k}", kw.get("annotations", {}).get(k, {}))
            for k, deps in graph.items()
        ]
        order = {k: i for i, k in enumerate(graph)}
        return self.step(ev.GraphReceived("c", tasks, keys, order))

    def decide(self, *decisions: p.Decision) -> Outbox:
        return self.step(ev.PolicyDecisions(list(decisions)))

    def assign(self, key: str, address: str) -> Outbox:
        return self.decide(p.Assignment(self.id(key), self.state.workers[address].id))

    def id(self, key: str) -> int:
        return self.state.tasks[key].id

    def finish(self, key: str) -> Outbox:
        ts = self.state.tasks[key]
        assert ts.processing_on is not None
        return self.step(
            ev.TaskFinished(
                ts.processing_on.address, key, ts.run_id, 8, stimulus_id=f"task-finished-{key}"
            )
        )

    def fail(self, key: str) -> Outbox:
        ts = self.state.tasks[key]
        assert ts.processing_on is not None
        return self.step(
            ev.TaskErred(ts.processing_on.address, key, ts.run_id, "boom", "tb", "boom")
        )

    def edges(self) -> set[tuple[str, str]]:
        return {(start, finish) for _, start, finish, _, _ in self.state.transition_log}


# ----------------------------------------------------------------------------- scenarios
def chain() -> Driver:
    """a -> b computed and released: the common path of a task's life."""
    d = Driver()
    d.submit({"a": (), "b": ("a",)}, ["b"])
    d.assign("a", W1)
    d.finish("a")
    d.assign("b", W2)
    d.finish("b")
    d.step(ev.ClientReleasesKeys("c", ["b"]))
    assert d.state.tasks == {}
    return d


def scatter() -> Driver:
    d = Driver()
    d.step(ev.DataPlaced("c", {"s": [W1]}, {"s": 8}))
    d.step(ev.DataPlaced("c", {"s": [W2]}, {"s": 8}))  # more replicas: no move
    assert d.state.tasks["s"].state == "memory"
    return d


def killed_worker() -> Driver:
    d = Driver(allowed_failures=0)
    d.submit({"k": ()}, ["k"])
    d.assign("k", W1)
    d.step(ev.WorkerDisconnected(W1))
    assert d.state.tasks["k"].state == "erred"
    d.step(ev.ClientReleasesKeys("c", ["k"]))
    return d


def released_while_running() -> Driver:
    d = Driver()
    d.submit({"a": (), "b": ("a",)}, ["b"])
    d.assign("a", W1)
    d.step(ev.ClientReleasesKeys("c", ["b"]))
    assert d.state.tasks == {}
    return d


def error_and_retry() -> Driver:
    d = Driver()
    d.submit({"a": (), "b": ("a",)}, ["b"])
    d.assign("a", W1)
    d.fail("a")
    assert d.state.tasks["b"].state == "erred"
    d.step(ev.RetryKeys("c", ["b"]))
    assert d.state.tasks["a"].state == "ready"
    return d


def no_worker() -> Driver:
    d = Driver()
    d.submit({"n": (), "m": ()}, ["n", "m"])
    d.decide(p.NoWorker(d.id("n")), p.NoWorker(d.id("m")))
    d.step(ev.WorkerConnected(W3, 1))  # offered again
    assert d.state.tasks["n"].state == "ready"
    d.decide(p.NoWorker(d.id("n")))
    d.step(ev.ClientReleasesKeys("c", ["n", "m"]))  # one no-worker, one ready
    assert d.state.tasks == {}
    return d


def lost_input_errs(park: bool) -> Driver:
    """``d`` is ready (or no-worker) when its input ``t`` loses its only replica, and ``t``'s
    own input ``e`` erred since ``t`` was computed: recomputing ``t`` errs it, and ``d``."""
    d = Driver()
    d.submit({"e": (), "t": ("e",), "d": ("t",)}, ["d"])
    d.assign("e", W1)
    d.finish("e")
    d.assign("t", W1)
    d.finish("t")
    if park:
        d.decide(p.NoWorker(d.id("d")))
    assert d.state.tasks["e"].state == "released"
    d.step(ev.ClientDesiresKeys("c", ["e"]))
    d.assign("e", W2)
    d.fail("e")
    assert d.state.tasks["t"].state == "memory"
    d.step(ev.ReleaseWorkerData(W1, "t"))
    assert d.state.tasks["t"].state == "erred"
    assert d.state.tasks["d"].state == "erred"
    return d


def steal() -> Driver:
    d = Driver()
    d.submit({"x": ()}, ["x"])
    d.assign("x", W1)
    out = d.decide(p.Steal(d.id("x"), d.state.workers[W2].id))
    ((_, request),) = out.messages("steal-request")
    d.step(ev.StealResponse(W1, "x", "ready", request["stimulus_id"]))
    ts = d.state.tasks["x"]
    assert ts.processing_on is not None and ts.processing_on.address == W2
    return d


def actor_lost() -> Driver:
    """An actor's worker dies: the actor errs from memory, it is not recomputed."""
    d = Driver()
    task = ev.NewTask("act", (), "run-act", {})
    d.step(ev.GraphReceived("c", [task], ["act"], {"act": 0}, actors=True))
    ts = d.state.tasks["act"]
    assert ts.processing_on is not None  # placed by the state machine, not the policy
    home = ts.processing_on.address
    d.finish("act")
    d.step(ev.WorkerDisconnected(home))
    assert ts.state == "erred"
    return d


SCENARIOS = [
    chain,
    actor_lost,
    scatter,
    killed_worker,
    released_while_running,
    error_and_retry,
    no_worker,
    lambda: lost_input_errs(park=False),
    lambda: lost_input_errs(park=True),
    steal,
]


def test_every_edge_of_the_table_is_taken_and_none_other():
    taken: set[tuple[str, str]] = set()
    for scenario in SCENARIOS:
        taken |= scenario().edges()
    assert taken == set(EDGES)


def test_the_table_is_well_formed():
    assert set(NEXT) == set(STATES)
    for (start, finish), description in EDGES.items():
        assert start in STATES and finish in STATES
        assert start != "forgotten", "forgotten is final"
        # A Mermaid transition label ends at ';' and must not hold another ':'.
        assert description and not re.search("[:;\n]", description), description
    assert {start for start, _ in EDGES} == set(STATES) - {"forgotten"}


def test_every_recommendation_the_engine_carries_out_is_an_edge():
    state = Driver().state
    assert set(state._transitions) <= set(EDGES)


def test_the_state_machine_doc_shows_the_current_table():
    text = DOC.read_text()
    begin = "<!-- BEGIN generated by python -m dsched.state.diagram -->\n"
    end = "<!-- END generated by python -m dsched.state.diagram -->"
    assert begin in text and end in text, f"{DOC}: the markers are missing"
    shown = text.split(begin, 1)[1].split(end, 1)[0]
    assert shown == document_block(), (
        f"{DOC} is out of date: paste the output of `python -m dsched.state.diagram` "
        "between its markers"
    )


def test_the_diagram_names_every_edge():
    diagram = mermaid()
    assert diagram.startswith("stateDiagram-v2\n")
    assert "    [*] --> released\n" in diagram and "    forgotten --> [*]\n" in diagram
    assert 'state "no-worker" as no_worker' in diagram
    assert "    ready --> no_worker: the policy found no worker for it\n" in diagram
    assert diagram.count(" --> ") == len(EDGES) + 2
    assert markdown_table().count("\n") == len(EDGES) + 2


def test_the_diagram_module_runs():
    result = subprocess.run(
        [sys.executable, "-m", "dsched.state.diagram"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert result.stdout == document_block()


# ----------------------------------------------------------------------------- moves
def test_a_move_off_the_table_raises_and_changes_nothing():
    d = Driver()
    d.submit({"a": (), "b": ("a",)}, ["b"])
    ts = d.state.tasks["b"]
    logged = len(d.state.transition_log)
    with pytest.raises(InvalidTransition, match="waiting -> memory"):
        d.state._move(ts, "memory", Outbox())
    assert ts.state == "waiting"
    assert len(d.state.transition_log) == logged
    d.state.validate()


def test_processing_needs_a_worker_and_erring_needs_a_blame():
    d = Driver()
    d.submit({"a": ()}, ["a"])
    ts = d.state.tasks["a"]
    with pytest.raises(InvariantError, match="runs on no worker"):
        d.state._stop_processing(ts, Outbox())
    with pytest.raises(InvalidTransition, match="no exception_blame"):
        d.state._to_erred(ts, {}, Outbox())
    assert ts.state == "ready"


# ----------------------------------------------------------------------------- story
def test_the_story_of_a_key_lists_its_moves_with_their_stimuli():
    d = Driver()
    graph_at = d.now + 1
    d.submit({"a": (), "b": ("a",)}, ["b"])
    d.assign("a", W1)
    assigned_at = d.now
    d.finish("a")
    finished_at = d.now
    d.assign("b", W2)
    d.finish("b")
    b_finished_at = d.now
    d.step(ev.ClientReleasesKeys("c", ["b"]))
    released_at = d.now
    assert d.state.story("a") == [
        ("a", "released", "waiting", f"GraphReceived-{graph_at}", graph_at),
        ("a", "waiting", "ready", f"GraphReceived-{graph_at}", graph_at),
        ("a", "ready", "processing", f"PolicyDecisions-{assigned_at}", assigned_at),
        ("a", "processing", "memory", "task-finished-a", finished_at),
        ("a", "memory", "released", "task-finished-b", b_finished_at),
        ("a", "released", "forgotten", f"ClientReleasesKeys-{released_at}", released_at),
    ]
    both = d.state.story("b", "a")
    assert [entry[:3] for entry in both] == [
        ("b", "released", "waiting"),
        ("a", "released", "waiting"),
        ("a", "waiting", "ready"),
        ("a", "ready", "processing"),
        ("a", "processing", "memory"),
        ("b", "waiting", "ready"),
        ("b", "ready", "processing"),
        ("b", "processing", "memory"),
        ("a", "memory", "released"),
        ("b", "memory", "released"),
        ("b", "released", "forgotten"),
        ("a", "released", "forgotten"),
    ]
    assert both == [e for e in d.state.transition_log if e[0] in ("a", "b")]
    assert d.state.story("nope") == []


def test_the_transition_log_is_bounded():
    full = chain().state.transition_log
    d = Driver(transition_log_length=4)
    d.submit({"a": (), "b": ("a",)}, ["b"])
    d.assign("a", W1)
    d.finish("a")
    d.assign("b", W2)
    d.finish("b")
    d.step(ev.ClientReleasesKeys("c", ["b"]))
    assert len(d.state.transition_log) == 4
    assert [e[:3] for e in d.state.transition_log] == [e[:3] for e in list(full)[-4:]]
    assert SchedulerState(killed_worker=print).transition_log.maxlen == 1000


# ----------------------------------------------------------------------------- observations
def test_transitions_are_reported_in_the_outbox_only_when_observed():
    quiet = Driver()
    out = quiet.submit({"a": ()}, ["a"])
    assert out.transitions == []
    loud = Driver(observe_transitions=True)
    before = len(loud.state.transition_log)
    out = loud.submit({"a": ()}, ["a"])
    story = list(loud.state.transition_log)[before:]
    assert out.transitions == [entry[:4] for entry in story]
    assert [t[1:3] for t in out.transitions] == [("released", "waiting"), ("waiting", "ready")]
    # It can be switched on after construction (an extension asking for it).
    quiet.state.observe_transitions = True
    out = quiet.assign("a", W1)
    assert out.transitions == [("a", "ready", "processing", f"PolicyDecisions-{quiet.now}")]


def test_an_outbox_with_transitions_only_is_not_empty_and_merges_them():
    a, b = Outbox(), Outbox()
    assert not a
    b.transitions.append(("k", "released", "waiting", "s"))
    assert b
    a.transitions.append(("j", "released", "waiting", "s"))
    a.merge(b)
    assert a.transitions == [("j", "released", "waiting", "s"), ("k", "released", "waiting", "s")]


# ----------------------------------------------------------------------------- stimulus ids
WORKER_EVENTS = [
    ev.TaskFinished,
    ev.TaskErred,
    ev.ReleaseWorkerData,
    ev.AddKeys,
    ev.RequestRefreshWhoHas,
    ev.LongRunning,
    ev.Reschedule,
    ev.WorkerStatusChanged,
    ev.StealResponse,
]


def test_every_event_of_a_worker_message_has_a_stimulus_id_defaulting_to_empty():
    for cls in WORKER_EVENTS:
        fields = {f.name: f for f in dataclasses.fields(cls)}
        assert "stimulus_id" in fields, cls
    for cls in vars(ev).values():
        if dataclasses.is_dataclass(cls) and isinstance(cls, type):
            for f in dataclasses.fields(cls):
                if f.name == "stimulus_id":
                    assert f.default == "", cls


def test_the_events_stimulus_id_is_the_id_of_what_it_causes_else_one_is_made_up():
    d = Driver()
    out = d.step(ev.RequestRefreshWhoHas(W1, ["gone"], stimulus_id="refresh-7"))
    assert [m["stimulus_id"] for _, m in out.messages("free-keys")] == ["refresh-7"]
    assert [m["stimulus_id"] for _, m in out.messages("refresh-who-has")] == ["refresh-7"]
    out = d.step(ev.RequestRefreshWhoHas(W1, ["gone"]))
    made_up = f"RequestRefreshWhoHas-{d.now}"
    assert [m["stimulus_id"] for _, m in out.messages("refresh-who-has")] == [made_up]
    # The reactor's own ids (a worker removed) reach the workers told about it.
    out = d.step(ev.WorkerDisconnected(W2, stimulus_id="worker-closed"))
    assert [m["stimulus_id"] for _, m in out.messages("remove-worker")] == ["worker-closed"]


def test_a_stolen_task_is_sent_to_the_thief_under_the_steals_id():
    d = steal()
    (entry,) = [e for e in d.state.story("x") if e[1:3] == ("processing", "processing")]
    assert entry[3].startswith("steal-")


# ----------------------------------------------------------------------------- invariants
def test_validate_raises_invariant_error_naming_the_invariant_and_the_task():
    d = Driver()
    d.submit({"a": ()}, ["a"])
    d.assign("a", W1)
    ts = d.state.tasks["a"]
    assert ts.processing_on is not None
    ts.processing_on.processing.discard(ts)
    with pytest.raises(InvariantError, match=r"processing is mirrored: <TaskState 'a' processing>"):
        d.state.validate()
    ts.processing_on.processing.add(ts)
    d.state.no_worker.add(ts)
    with pytest.raises(InvariantError, match="no_worker holds exactly the no-worker tasks"):
        d.state.validate()


def test_validate_checks_under_python_minus_o():
    script = """
from dsched.state import InvariantError
from dsched.state import events as ev
from dsched.state.machine import SchedulerState
assert False, "asserts are on"
s = SchedulerState(killed_worker=print)
s.handle(ev.ClientConnected("c"), 0.0)
s.handle(ev.DataPlaced("c", {}, {}), 0.0)
s.bandwidth = 0.0
try:
    s.validate()
except InvariantError as exc:
    print("raised:", exc)
"""
    result = subprocess.run(
        [sys.executable, "-O", "-c", script], capture_output=True, text=True, check=True
    )
    assert result.stdout.startswith("raised: bandwidth is positive and finite"), result
