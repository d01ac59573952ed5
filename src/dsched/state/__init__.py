"""The pure task state machine (see ``dsched.state.machine`` and docs/state-machine.md)."""

from dsched.state.errors import InvalidTransition, InvariantError

__all__ = ["InvalidTransition", "InvariantError"]
