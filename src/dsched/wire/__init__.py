"""Pure Dask wire protocol: TCP framing (bytes <-> frames) and codec (frames <-> messages).

No sockets, no event loop, no clock: bytes in, messages out, and back.
"""

from dsched.wire.codec import HANDSHAKE, PICKLE_PROTOCOL, Pickled, Serialized, dumps, loads
from dsched.wire.errors import LocalProtocolError, ProtocolError, RemoteProtocolError
from dsched.wire.framing import FrameDecoder, encode_frames

__all__ = [
    "HANDSHAKE",
    "PICKLE_PROTOCOL",
    "FrameDecoder",
    "LocalProtocolError",
    "Pickled",
    "ProtocolError",
    "RemoteProtocolError",
    "Serialized",
    "dumps",
    "encode_frames",
    "loads",
]
