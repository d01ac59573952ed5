"""Protocol errors, split by who is to blame (the h11 convention).

``RemoteProtocolError``: the peer sent bytes we cannot accept (bad framing, malformed
msgpack, a payload marker pointing outside the message). The connection that carried them
is unusable from then on and must be dropped; nothing else is affected.

``LocalProtocolError``: we tried to send something the protocol cannot carry (an object
that neither msgpack nor pickle can encode). Nothing was written, so the connection is
still fine; the bug is in the caller. The error names the offending type and where in the
message it sits (``path``), so the caller can fail just the affected keys.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

__all__ = [
    "LocalProtocolError",
    "MapKey",
    "ProtocolError",
    "RemoteProtocolError",
    "format_path",
]


class ProtocolError(Exception):
    """Base class of every wire-level error."""


class RemoteProtocolError(ProtocolError):
    """The peer sent something invalid; the message says what."""


@dataclass(frozen=True, slots=True)
class MapKey:
    """A path step into a map's *key* (not the value stored under it).

    ``(0, "who_has", MapKey(("x", obj)), 1)`` is the second element of the tuple key
    ``("x", obj)`` of the ``who_has`` map of the batch's first message.
    """

    key: object


class LocalProtocolError(ProtocolError):
    """We tried to send something that cannot be encoded; the message says what and where.

    ``offending_type``: the type of the object that could not be encoded (None when msgpack
    refused the message as a whole, e.g. nesting too deep).
    ``path``: the steps from the top of the message down to that object: a list/tuple
    index (int), a map value's key, or ``MapKey(key)`` for a step into a map key; None
    when unknown. For a batch (a list of messages) ``path[0]`` is the message's index.
    """

    def __init__(
        self,
        message: str,
        *,
        offending_type: type | None = None,
        path: tuple[object, ...] | None = None,
    ) -> None:
        super().__init__(message)
        self.offending_type = offending_type
        self.path = path


def _short_repr(obj: object, limit: int = 60) -> str:
    try:
        text = repr(obj)
    except Exception:  # a broken __repr__ must not hide the encoding error
        text = f"<{type(obj).__name__} object>"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def format_path(path: Sequence[object]) -> str:
    """``msg[0]['who_has'][<key ('x', 1)>][1]``: readable, for error messages."""
    parts = ["msg"]
    for step in path:
        if isinstance(step, MapKey):
            parts.append(f"[<key {_short_repr(step.key)}>]")
        else:
            parts.append(f"[{_short_repr(step)}]")
    return "".join(parts)
