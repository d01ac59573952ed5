"""Protocol errors, split by who is to blame (the h11 convention).

``RemoteProtocolError``: the peer sent bytes we cannot accept (bad framing, malformed
msgpack, a payload marker pointing outside the message). The connection that carried them
is unusable from then on and must be dropped; nothing else is affected.

``LocalProtocolError``: we tried to send something the protocol cannot carry (an object
msgpack cannot encode). Nothing was written, so the connection is still fine; the bug is
in the caller.
"""

from __future__ import annotations

__all__ = ["LocalProtocolError", "ProtocolError", "RemoteProtocolError"]


class ProtocolError(Exception):
    """Base class of every wire-level error."""


class RemoteProtocolError(ProtocolError):
    """The peer sent something invalid; the message says what."""


class LocalProtocolError(ProtocolError):
    """We tried to send something that cannot be encoded; the message says what."""
