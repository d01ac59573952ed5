"""The automaton drawn: ``EDGES`` as a Mermaid state diagram and as a Markdown table.

Theory of operation
-------------------
``mermaid()`` and ``markdown_table()`` render ``dsched.state.edges.EDGES``, nothing else,
so the drawing cannot drift from the code: docs/state-machine.md holds their output, and a
unit test (tests/unit/test_state_edges.py) fails when it differs from what they render now.
Update the doc with ``python -m dsched.state.diagram``, which prints both
(``document_block``), ready to paste between the markers in that file. Pure functions
returning strings; printing happens only in ``main``.
"""

from __future__ import annotations

from dsched.state.edges import EDGES, FORGOTTEN, RELEASED, STATES


def _node(state: str) -> str:
    """A Mermaid id for a state (``no-worker`` -> ``no_worker``)."""
    return state.replace("-", "_")


def mermaid() -> str:
    """``EDGES`` as a Mermaid ``stateDiagram-v2`` (each edge labelled with its description)."""
    lines = ["stateDiagram-v2"]
    lines += [f'    state "{s}" as {_node(s)}' for s in STATES if _node(s) != s]
    lines.append(f"    [*] --> {_node(RELEASED)}")
    for (start, finish), description in EDGES.items():
        lines.append(f"    {_node(start)} --> {_node(finish)}: {description}")
    lines.append(f"    {_node(FORGOTTEN)} --> [*]")
    return "\n".join(lines) + "\n"


def markdown_table() -> str:
    """``EDGES`` as a Markdown table: start, finish, when."""
    lines = ["| from | to | when |", "|---|---|---|"]
    lines += [f"| {start} | {finish} | {when} |" for (start, finish), when in EDGES.items()]
    return "\n".join(lines) + "\n"


def document_block() -> str:
    """What docs/state-machine.md holds between its ``BEGIN``/``END`` markers: the diagram
    (a fenced ``mermaid`` block) and the table."""
    return f"```mermaid\n{mermaid()}```\n\n{markdown_table()}"


def main() -> None:
    print(document_block(), end="")


if __name__ == "__main__":
    main()
