"""A big graph taken in as parts (``dsched.state.slicing``) ends exactly as the whole graph
would, whatever runs, fails or leaves between its parts. ``validate()`` runs after every
step (the harness)."""

from __future__ import annotations

import random
from typing import Any

import pytest
from harness import Harness

from dsched.state import events as ev
from dsched.state.slicing import graph_parts, intake_holder


def graph_event(
    graph: dict[Any, tuple[Any, ...]], keys: list[Any], order: dict[Any, int] | None = None
) -> ev.GraphReceived:
    tasks = [ev.NewTask(key, deps, f"run-{key}", {}) for key, deps in graph.items()]
    order = order if order is not None else {key: i for i, key in enumerate(graph)}
    return ev.GraphReceived("c", tasks, keys, order)


def random_graph(seed: int, size: int) -> tuple[dict[Any, tuple[Any, ...]], list[Any]]:
    """A random DAG over ``t0..``; its sinks wanted except a few (dead tasks, which a
    whole graph forgets on arrival), and a few inner tasks wanted too."""
    rng = random.Random(seed)
    graph: dict[Any, tuple[Any, ...]] = {}
    for i in range(size):
        deps = rng.sample(range(i), min(i, rng.choice([0, 1, 1, 2, 3])))
        graph[f"t{i}"] = tuple(f"t{d}" for d in deps)
    used = {dep for deps in graph.values() for dep in deps}
    sinks = [key for key in graph if key not in used]
    inner = [key for key in graph if key in used]
    keys = [key for key in sinks if rng.random() < 0.9] + rng.sample(inner, min(3, len(inner)))
    return graph, keys


def finish_some(harness: Harness, count: int) -> None:
    for key in list(harness.processing())[:count]:
        harness.finish(key)


def end_states(harness: Harness) -> dict[Any, str]:
    return {key: ts.state for key, ts in harness.state.tasks.items()}


def in_memory(harness: Harness) -> set[Any]:
    return {key for key, state in end_states(harness).items() if state == "memory"}


def new_harness() -> Harness:
    harness = Harness()
    harness.add_worker("tcp://w1")
    harness.add_worker("tcp://w2")
    harness.add_client("c")
    return harness


@pytest.mark.parametrize("seed", range(12))
def test_a_graph_in_parts_ends_as_the_whole_graph(seed: int) -> None:
    graph, keys = random_graph(seed, 60)
    whole = new_harness()
    whole.step(graph_event(graph, keys))
    whole.run_until_idle()

    parted = new_harness()
    parts = graph_parts(graph_event(graph, keys), size=7)
    assert len(parts) == 9
    for part in parts:
        parted.step(part)
        finish_some(parted, seed % 4)  # tasks run, and finish, between parts
    parted.run_until_idle()

    assert end_states(parted) == end_states(whole)
    assert in_memory(parted) == set(keys)
    assert {k for op, k in parted.client_ops() if op == "key-in-memory"} == set(keys)
    assert intake_holder("c") not in parted.state.clients
    assert not parted.state.graphs_in_progress


def test_a_task_finished_before_its_dependent_arrives_is_kept_for_it() -> None:
    harness = new_harness()
    part_a, part_b = graph_parts(graph_event({"a": (), "b": ("a",)}, ["b"]), size=1)
    assert part_a.hold == ["a"] and part_b.hold is None
    harness.step(part_a)
    harness.finish("a")
    assert harness.state.tasks["a"].state == "memory"  # the holder keeps it
    harness.step(part_b)
    harness.run_until_idle()
    assert harness.client_ops() == [("key-in-memory", "b")]
    assert end_states(harness) == {"a": "released", "b": "memory"}


def test_a_wanted_task_that_a_later_part_needs_stays_until_the_client_wants_it() -> None:
    harness = new_harness()
    graph = {"a": (), "b": ("a",), "c": ("b",)}
    parts = graph_parts(graph_event(graph, ["a", "c"]), size=1)
    assert [part.hold for part in parts] == [["a"], ["b"], None]
    assert [part.release for part in parts] == [[], [], ()]  # a is not let go before c
    for part in parts:
        harness.step(part)
        harness.run_until_idle()
    assert sorted(harness.client_ops()) == [("key-in-memory", "a"), ("key-in-memory", "c")]
    assert in_memory(harness) == {"a", "c"}


def test_a_known_key_a_later_part_needs_is_held_from_the_first_part() -> None:
    harness = new_harness()
    harness.add_client("d")
    harness.submit({"x": ()}, ["x"], client="d")
    harness.run_until_idle()
    graph = {"a": (), "b": ("a",), "c": ("b", "x")}
    parts = graph_parts(graph_event(graph, ["c"]), size=1)
    assert parts[0].hold == ["x", "a"] and parts[2].hold is None
    harness.step(parts[0])
    harness.step(ev.ClientReleasesKeys("d", ["x"]))  # another client lets go meanwhile
    assert harness.state.tasks["x"].state == "memory"
    for part in parts[1:]:
        harness.step(part)
        harness.run_until_idle()
    assert ("key-in-memory", "c") in harness.client_ops()
    assert in_memory(harness) == {"c"}


def test_a_known_key_the_client_wants_again_is_held_from_the_first_part() -> None:
    harness = new_harness()
    harness.add_client("d")
    harness.submit({"x": ()}, ["x"], client="d")
    harness.run_until_idle()
    graph = {"a": (), "b": ("a",)}
    parts = graph_parts(graph_event(graph, ["b", "x"]), size=1)
    assert sorted(parts[0].hold or ()) == ["a", "x"]
    harness.step(parts[0])
    harness.step(ev.ClientReleasesKeys("d", ["x"]))  # another client lets go meanwhile
    assert harness.state.tasks["x"].state == "memory"
    harness.step(parts[1])
    harness.run_until_idle()
    assert ("cancelled-keys", ["b", "x"]) not in harness.client_ops()
    assert in_memory(harness) == {"b", "x"}


def test_a_lost_dependency_cancels_the_graph_and_keeps_nothing() -> None:
    harness = new_harness()
    graph = {"a": (), "b": ("a",), "c": ("b", "gone")}
    parts = graph_parts(graph_event(graph, ["c"]), size=1)
    harness.step(parts[0])
    assert harness.client_ops() == [("cancelled-keys", ["c"])]
    assert not harness.state.tasks and not harness.state.graphs_in_progress
    for part in parts[1:]:
        harness.step(part)  # the rest of an abandoned graph is dropped
    assert not harness.state.tasks
    assert ("info", "dropping part 2 of an abandoned graph from c") in harness.logs


def test_a_client_leaving_between_parts_drops_what_came_in() -> None:
    harness = new_harness()
    graph, keys = random_graph(3, 40)
    parts = graph_parts(graph_event(graph, keys), size=10)
    harness.step(parts[0])
    harness.step(parts[1])
    finish_some(harness, 3)
    harness.step(ev.ClientDisconnected("c"))
    assert not harness.state.tasks
    assert set(harness.state.clients) == set()
    harness.step(parts[2])  # (the server stops feeding parts; the state copes anyway)
    assert not harness.state.tasks


def test_a_restart_between_parts_drops_the_graph_and_its_holder() -> None:
    harness = new_harness()
    graph, keys = random_graph(5, 40)
    parts = graph_parts(graph_event(graph, keys), size=10)
    harness.step(parts[0])
    harness.step(ev.Restart())
    assert not harness.state.graphs_in_progress
    assert set(harness.state.clients) == {"c"}
    # The client's next graph starts clean.
    for part in graph_parts(graph_event(graph, keys), size=10):
        harness.step(part)
    harness.run_until_idle()
    assert in_memory(harness) == set(keys)


def test_a_new_graph_drops_an_earlier_one_whose_parts_stopped_coming() -> None:
    harness = new_harness()
    graph, keys = random_graph(7, 30)
    first = graph_parts(graph_event(graph, keys), size=10)
    harness.step(first[0])
    second = graph_parts(graph_event({"z": ()}, ["z"]))
    harness.step(second[0])
    harness.run_until_idle()
    assert set(harness.state.tasks) == {"z"}
    assert not harness.state.graphs_in_progress


def test_a_dead_task_is_forgotten_on_arrival_as_in_a_whole_graph() -> None:
    harness = new_harness()
    parts = graph_parts(graph_event({"dead": (), "a": (), "b": ("a",)}, ["b"]), size=1)
    assert parts[0].hold == []
    harness.step(parts[0])
    assert "dead" not in harness.state.tasks
    for part in parts[1:]:
        harness.step(part)
    harness.run_until_idle()
    assert end_states(harness) == {"a": "released", "b": "memory"}


def test_a_small_graph_is_one_part() -> None:
    event = graph_event({"a": (), "b": ("a",)}, ["b"])
    assert graph_parts(event, size=2) == [event]


def test_parts_follow_dependencies_when_the_priorities_do_not() -> None:
    graph = {"a": (), "b": ("a",), "c": ("b",), "d": ()}
    # A client's own priorities that put a dependent first.
    order = {"c": 0, "b": 1, "a": 2, "d": 3}
    parts = graph_parts(graph_event(graph, ["c", "d"], order), size=1)
    assert [part.tasks[0].key for part in parts] == ["a", "b", "c", "d"]
    assert [part.order for part in parts] == [{"a": 2}, {"b": 1}, {"c": 0}, {"d": 3}]
    harness = new_harness()
    for part in parts:
        harness.step(part)
    harness.run_until_idle()
    assert in_memory(harness) == {"c", "d"}


def test_actors_come_with_the_last_part() -> None:
    event = ev.GraphReceived(
        "c",
        [ev.NewTask(k, (), f"run-{k}", {}) for k in "abc"],
        ["a", "b", "c"],
        {k: i for i, k in enumerate("abc")},
        actors=True,
    )
    parts = graph_parts(event, size=1)
    assert [part.actors for part in parts] == [(), (), True]


def test_the_holder_lets_go_as_the_parts_that_need_its_tasks_arrive() -> None:
    """It holds only the frontier, so the last part does not release the whole graph."""
    harness = new_harness()
    chain = {f"t{i}": ((f"t{i - 1}",) if i else ()) for i in range(100)}
    parts = graph_parts(graph_event(chain, ["t99"]), size=10)
    holder = intake_holder("c")
    for part in parts[:-1]:
        harness.step(part)
        assert {ts.key for ts in harness.state.clients[holder].wants} == {part.tasks[-1].key}
    harness.step(parts[-1])
    harness.run_until_idle()
    assert in_memory(harness) == {"t99"}


def test_a_cycle_is_refused_when_the_parts_are_cut() -> None:
    graph = {"a": ("b",), "b": ("a",), "c": ()}
    with pytest.raises(ValueError, match="cycle"):
        graph_parts(graph_event(graph, ["a"], {"a": 0, "b": 1, "c": 2}), size=1)


@pytest.mark.parametrize("seed", range(4))
def test_the_dashboards_prefix_counts_stay_exact_through_parts_and_failures(seed: int) -> None:
    """``validate()`` (after every step) recounts them while they are kept."""
    graph, keys = random_graph(seed, 50)
    graph = {
        f"{'xy'[i % 2]}-{key}": tuple(f"{'xy'[int(d[1:]) % 2]}-{d}" for d in deps)
        for i, (key, deps) in enumerate(graph.items())
    }
    keys = [f"{'xy'[int(k[1:]) % 2]}-{k}" for k in keys]
    harness = new_harness()
    harness.state.count_prefixes(True)
    for part in graph_parts(graph_event(graph, keys), size=6):
        harness.step(part)
        finish_some(harness, 2)
    failing = sorted(harness.processing())[:2]
    harness.run_until_idle(fail=failing)
    harness.step(ev.ClientReleasesKeys("c", keys))
    counts = harness.state.prefix_counts
    assert counts is not None and set(counts) == {"x", "y"}
