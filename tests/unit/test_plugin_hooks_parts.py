"""Scheduler plugins' ``update_graph`` over a graph in parts (``dsched.server.plugins``):
the parts buffered for the one call are dropped once that graph cannot complete."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from dsched.server.plugins import PluginHooks
from dsched.state import events as ev


class _UpdateGraphRecorder:
    def __init__(self) -> None:
        self.calls: list[dict[str, Any]] = []

    def update_graph(self, scheduler: Any, **kwargs: Any) -> None:
        self.calls.append(kwargs)


def _hooks() -> PluginHooks:
    plugin = _UpdateGraphRecorder()
    plugins = SimpleNamespace(
        facade=None, with_hook=lambda hook: [plugin] if hasattr(plugin, hook) else []
    )
    return PluginHooks(plugins)  # type: ignore[arg-type]


def _first_part(client: str) -> ev.GraphReceived:
    task = ev.NewTask("a", (), b"run-a", {})
    return ev.GraphReceived(client, [task], ["b"], {"a": 0}, part=0, hold=["a"], release=[])


def test_a_restart_drops_the_parts_of_every_graph_in_progress() -> None:
    hooks = _hooks()
    hooks.on_event(_first_part("c1"), 0.0)
    hooks.on_event(_first_part("c2"), 0.0)
    assert set(hooks._graph_parts) == {"c1", "c2"}
    hooks.on_event(ev.Restart(), 0.0)
    assert not hooks._graph_parts


def test_a_whole_graph_drops_the_parts_of_the_clients_abandoned_one() -> None:
    hooks = _hooks()
    hooks.state = SimpleNamespace(tasks={})  # type: ignore[assignment]
    hooks.on_event(_first_part("c1"), 0.0)
    whole = ev.GraphReceived("c1", [ev.NewTask("z", (), b"run-z", {})], ["z"], {"z": 0})
    hooks.on_event(whole, 0.0)
    assert not hooks._graph_parts
