"""The state machine's own errors: both mean a bug in dsched, never a peer's fault.

Theory of operation
-------------------
Peers cannot cause these: every event is checked against the records before it changes
anything (a stale or unknown key, worker or run id is dropped or answered, not raised).
What is left is our own logic going wrong, and it is raised explicitly rather than with
``assert``, so that it is caught the same way under ``python -O``.

* ``InvalidTransition``: a state change was asked for that the automaton does not allow
  (an edge missing from ``dsched.state.edges.EDGES``), or one lacking what it needs.
* ``InvariantError``: the records contradict each other (raised by ``validate()``, and by
  code paths that find a record in an impossible shape). The message names the broken
  invariant and the task, worker or client concerned.
"""

from __future__ import annotations


class InvalidTransition(Exception):
    """A bug in the state machine: a transition was asked for that has no meaning."""


class InvariantError(Exception):
    """A bug in the state machine: the records break one of its invariants."""
