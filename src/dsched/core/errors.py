"""Errors of the core, split by blame (h11's rule, as in ``dsched.wire.errors``).

``BadMessage``: a peer sent a message we cannot accept (a missing or ill-typed field, an op
in the wrong place). It names the peer, the op and the field; the peer gets it as an error
and the log a warning. Nothing was applied.

``InternalError``: a bug of ours (a state machine invariant broken, a policy and state that
never settle, an extension returning garbage). The shell logs it loudly with the story of
the keys involved and closes the stream that triggered it: it never tells the peer it was
at fault, and never carries on silently over half-applied state.
"""

from __future__ import annotations

from typing import Any

from dsched.wire.errors import RemoteProtocolError


class BadMessage(RemoteProtocolError):
    def __init__(self, peer: str, op: str, field: str, problem: str) -> None:
        super().__init__(f"{op!r} from {peer}: field {field!r}: {problem}")
        self.peer = peer
        self.op = op
        self.field = field
        self.problem = problem


class InternalError(Exception):
    """A bug in dsched; ``keys`` are the task keys involved, for their stories."""

    def __init__(self, message: str, keys: tuple[Any, ...] = ()) -> None:
        super().__init__(message)
        self.keys = keys


class FlushLoopError(InternalError):
    """The state <-> policy loop did not reach a fixed point."""
