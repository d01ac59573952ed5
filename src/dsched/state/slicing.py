"""Cut a big received graph into parts the state machine takes in one loop iteration each.

Theory of operation
-------------------
Taking a graph in costs the state machine 15-20 us of CPU a task (creating records, linking
edges, the ``waiting`` cascade, the first placement), all on the event loop: a million
tasks in one ``GraphReceived`` stalled heartbeats and every other client for 29 s. So the
server feeds a big graph as consecutive ``GraphReceived`` *parts* of ``PART_SIZE`` tasks,
yielding to the loop between them; the first tasks run while the rest is still coming in.

Each part must leave a state ``validate()`` accepts, in which no task of the graph is
forgotten before the part that needs it arrives. Parts therefore follow a topological
order (dependencies first; ``dask.order`` priorities already are one, checked, else Kahn's
algorithm by priority), and the graph's *intake holder*, a pseudo-client of the submitting
client (``intake_holder``), wants whatever a later part will need:

* ``hold``: the tasks of this part with a dependent in a later part or wanted by the client
  (its keys come with the last part), and, in the first part, the graph's dependencies on
  tasks the scheduler already had (so another client cannot release them meanwhile);
* ``release``: the held tasks whose last dependent is in this part: the holder lets go of
  them once this part's tasks wait on them.

The last part has ``hold=None``: the client wants its keys, the holder lets go of the rest
and is dropped. A task without dependents that the client does not want is never held and
is forgotten on arrival, as in a whole graph. Cutting costs O(tasks + edges) (plus a sort),
in the server's intake thread, not on the loop.
"""

from __future__ import annotations

import dataclasses
import heapq
from collections.abc import Mapping, Sequence

from dsched.state import events as ev
from dsched.state.records import ClientState, Key

# About 0.1 s of state-machine CPU per part on a free core: heartbeats stay answered well
# within a second on a loaded machine, and the per-part overhead (one flush) is negligible.
PART_SIZE = 5_000


@dataclasses.dataclass(slots=True)
class GraphInProgress:
    """A client's graph whose last part has not arrived yet."""

    holder: ClientState  # the intake holder, a pseudo-client in ``Engine.clients``
    generation: float  # the graph's priority generation, fixed by its first part


def intake_holder(client: str) -> str:
    """The pseudo-client that holds a graph's tasks while its parts arrive."""
    return f"graph-intake-{client}"


def graph_parts(event: ev.GraphReceived, size: int = PART_SIZE) -> list[ev.GraphReceived]:
    """``event`` itself if it has at most ``size`` tasks, else its parts (see the module)."""
    if len(event.tasks) <= size:
        return [event]
    specs = _topological(event.tasks, event.order)
    in_graph = {spec.key for spec in specs}
    # The part of each needed key's last user in the graph; the keys outside it, in order.
    last_user: dict[Key, int] = {}
    external: dict[Key, None] = {}
    for i, spec in enumerate(specs):
        for dep in spec.dependencies:
            last_user[dep] = i // size
            if dep not in in_graph:
                external[dep] = None
    wanted = set(event.keys)
    count = (len(specs) + size - 1) // size
    holds: list[list[Key]] = [[] for _ in range(count)]
    releases: list[list[Key]] = [[] for _ in range(count)]
    # Keys the scheduler already had and a later part needs: held from the first part on
    # (the ones only the first part needs are checked, and kept, by its own dependencies).
    # A key the client wants is held until its want arrives, with the last part.
    for key in external:
        if last_user[key] > 0:
            holds[0].append(key)
            if key not in wanted:
                releases[last_user[key]].append(key)
    # A wanted key outside the graph that no later part needs (a future the client already
    # has, asked for again) is held from the first part too: let go of by another client
    # meanwhile, it would be gone by the last part, which would cancel the whole graph.
    held_first = set(holds[0])
    holds[0].extend(
        key
        for key in dict.fromkeys(event.keys)
        if key not in in_graph and key not in held_first and last_user.get(key, 0) == 0
    )
    for i, spec in enumerate(specs):
        part = i // size
        last = last_user.get(spec.key, part)
        if spec.key in wanted:
            if part < count - 1:
                holds[part].append(spec.key)
        elif last > part:
            holds[part].append(spec.key)
            releases[last].append(spec.key)
    parts = []
    for part in range(count):
        final = part == count - 1
        tasks = specs[part * size : (part + 1) * size]
        parts.append(
            dataclasses.replace(
                event,
                tasks=tasks,
                # Its own priorities only, so that each part, once taken in, frees its share.
                order={spec.key: event.order.get(spec.key, 0) for spec in tasks},
                part=part,
                hold=None if final else holds[part],
                release=() if final else releases[part],
                actors=event.actors if final else (),  # they name the client's keys
            )
        )
    return parts


def _topological(
    tasks: Sequence[ev.TaskSpecLike], order: Mapping[Key, int]
) -> list[ev.TaskSpecLike]:
    """The tasks in priority order, which ``dask.order`` makes topological; if it is not
    (a client's own ``internal_priority``), Kahn's algorithm, lowest priority first."""
    ranked = sorted(tasks, key=lambda spec: order.get(spec.key, 0))
    seen: set[Key] = set()
    in_graph = {spec.key for spec in ranked}
    for spec in ranked:
        if any(dep in in_graph and dep not in seen for dep in spec.dependencies):
            break
        seen.add(spec.key)
    else:
        return ranked
    missing = {
        spec.key: sum(1 for dep in set(spec.dependencies) if dep in in_graph) for spec in ranked
    }
    dependents: dict[Key, list[Key]] = {}
    for spec in ranked:
        for dep in set(spec.dependencies):
            if dep in in_graph:
                dependents.setdefault(dep, []).append(spec.key)
    rank = {spec.key: i for i, spec in enumerate(ranked)}
    heap = [rank[key] for key, n in missing.items() if n == 0]
    heapq.heapify(heap)
    result: list[ev.TaskSpecLike] = []
    while heap:
        spec = ranked[heapq.heappop(heap)]
        result.append(spec)
        for key in dependents.get(spec.key, ()):
            missing[key] -= 1
            if missing[key] == 0:
                heapq.heappush(heap, rank[key])
    if len(result) != len(ranked):
        cyclic = next(key for key, n in missing.items() if n > 0)
        raise ValueError(f"the graph has a cycle through {cyclic!r}")
    return result
