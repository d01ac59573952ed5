"""Message codec: Python messages <-> frames, compatible with ``distributed.protocol``.

Theory of operation
-------------------
A message is one msgpack document (frame 0) followed by the frames of any out-of-band
payloads it references (protocol.md §2). Inside frame 0 a payload is a small marker map:

* ``{"__Serialized__": i}`` -> ``Serialized``: ``frames[i]`` is a msgpack sub-header whose
  ``num-sub-frames`` says how many payload frames follow it. We never deserialize these;
  the scheduler passes user data (results, scattered data, exceptions) through untouched.
* ``{"__Pickled__": i}`` -> ``Pickled``: ``frames[i]`` is a sub-header holding the pickle
  bytes (``pickled-obj``) and ``num-sub-frames`` out-of-band buffers. Unlike
  ``distributed.protocol.loads`` we do not unpickle on receipt: the scheduler calls
  ``Pickled.unpickle()`` only where it needs the object.
* ``{"__Set__": True, "as-list": [...]}`` -> ``set`` (and back, for sets and frozensets).

``dumps`` runs msgpack's C packer over the whole message; it calls our ``default`` hook
only for objects msgpack does not know, which is where payloads are swapped for markers
and their frames appended (in traversal order, exactly as ``distributed`` numbers them).
Each thread reuses one packer, because building a packer costs as much as packing a small
message and a packer is not safe to share while it calls back into Python.

``loads`` runs msgpack's C unpacker with an ``object_hook`` that is called for every map;
the hook rejects non-marker maps with one ``len()`` test, keeping the common path cheap.
(Skipping the hook for documents that contain no marker name was measured: the byte
search costs about what the hook does, so it is not worth the code.)
Lists decode as tuples (``use_list=False``), which also makes tuple map keys (Dask keys
such as ``("x", 3)``) decodable. Anything the peer got wrong becomes
``RemoteProtocolError``; anything we cannot encode becomes ``LocalProtocolError``.

Received payload sub-headers are kept as their original bytes and re-emitted verbatim, so
forwarding a payload is zero-copy and byte-exact even for sub-header contents we do not
model (legacy inline ``__Serialized__`` maps, compression tuples, split offsets).
"""

from __future__ import annotations

import pickle
import sys
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

import msgpack  # type: ignore[import-untyped]  # msgpack ships no type information

from dsched.wire.errors import LocalProtocolError, RemoteProtocolError

__all__ = ["HANDSHAKE", "PICKLE_PROTOCOL", "Pickled", "Serialized", "dumps", "loads"]

Frame = bytes | memoryview

PICKLE_PROTOCOL: Final = 5

# What we send when a connection opens (protocol.md §1.4). We never compress, so peers
# never send us compressed frames on our own connections.
HANDSHAKE: Final[dict[str, Any]] = {
    "compression": None,
    "python": tuple(sys.version_info[:3]),
    "pickle-protocol": PICKLE_PROTOCOL,
}


@dataclass(frozen=True, slots=True)
class Serialized:
    """An opaque ``__Serialized__`` payload: a sub-header and its frames, never deserialized.

    ``encoded_header`` is the sub-header exactly as received; when present, ``dumps``
    re-emits it instead of re-encoding ``header``. Payloads built locally leave it None.
    """

    header: dict[str, Any]
    frames: list[Frame]
    encoded_header: Frame | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        if not isinstance(self.header, dict):
            raise TypeError(f"Serialized.header must be a dict, not {type(self.header)}")


@dataclass(frozen=True, slots=True)
class Pickled:
    """A ``__Pickled__`` payload: ``header["pickled-obj"]`` (pickle bytes) + out-of-band buffers.

    Kept as bytes until someone calls ``unpickle()``; ``encoded_header`` as in
    ``Serialized``.
    """

    header: dict[str, Any]
    frames: list[Frame]
    encoded_header: Frame | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        if not isinstance(self.header, dict):
            raise TypeError(f"Pickled.header must be a dict, not {type(self.header)}")
        if not isinstance(self.header.get("pickled-obj"), bytes | bytearray | memoryview):
            raise TypeError("Pickled.header['pickled-obj'] must hold the pickle bytes")

    @classmethod
    def from_bytes(cls, pickle_bytes: bytes, buffers: Sequence[Frame] = ()) -> Pickled:
        """Wrap pickle bytes (protocol 5) and the out-of-band buffers they reference."""
        frames = list(buffers)
        return cls({"pickled-obj": pickle_bytes, "num-sub-frames": len(frames)}, frames)

    @classmethod
    def from_object(cls, obj: object, protocol: int = PICKLE_PROTOCOL) -> Pickled:
        """Pickle ``obj`` with the stdlib pickler, keeping large buffers out of band."""
        buffers: list[Frame] = []
        pickle_bytes = pickle.dumps(
            obj, protocol=protocol, buffer_callback=lambda b: buffers.append(b.raw())
        )
        return cls.from_bytes(pickle_bytes, buffers)

    @property
    def pickle_bytes(self) -> bytes:
        data = self.header["pickled-obj"]
        return data if isinstance(data, bytes) else bytes(data)

    def unpickle(self) -> Any:
        """Unpickle the payload. Runs arbitrary code from the sender: call it deliberately."""
        compression = self.header.get("compression")
        if compression and any(codec is not None for codec in compression):
            # We advertise compression=None, so a conforming peer never does this.
            raise RemoteProtocolError(
                f"compressed pickled payload ({compression}) although we negotiated none"
            )
        return pickle.loads(self.header["pickled-obj"], buffers=self.frames)


# -- encoding ---------------------------------------------------------------------------


def _encode_header_default(obj: object) -> object:
    if isinstance(obj, set | frozenset):
        return {"__Set__": True, "as-list": list(obj)}
    raise LocalProtocolError(f"cannot encode an object of type {type(obj).__name__}")


def _encode_header(header: dict[str, Any], num_sub_frames: int) -> bytes:
    if header.get("num-sub-frames") != num_sub_frames:
        header = {**header, "num-sub-frames": num_sub_frames}  # never mutate the caller's
    try:
        packed: bytes = msgpack.packb(header, use_bin_type=True, default=_encode_header_default)
    except (LocalProtocolError, TypeError, ValueError, OverflowError) as error:
        raise LocalProtocolError(f"cannot encode payload sub-header: {error}") from error
    return packed


class _Encoder:
    """One reusable packer plus the frame list of the ``dumps`` call in progress."""

    __slots__ = ("_frames", "_packer")

    def __init__(self) -> None:
        self._frames: list[Frame] | None = None
        self._packer = msgpack.Packer(use_bin_type=True, default=self._default)

    def encode(self, msg: object) -> list[Frame]:
        frames: list[Frame] = [b""]
        self._frames = frames
        try:
            frames[0] = self._packer.pack(msg)
        except LocalProtocolError:
            raise
        except (TypeError, ValueError, OverflowError) as error:
            raise LocalProtocolError(f"cannot encode message: {error}") from error
        finally:
            self._frames = None
        return frames

    def _default(self, obj: object) -> object:
        frames = self._frames
        assert frames is not None
        if isinstance(obj, Serialized | Pickled):
            offset = len(frames)
            header = obj.encoded_header
            if header is None:
                header = _encode_header(obj.header, len(obj.frames))
            frames.append(header)
            frames.extend(obj.frames)
            marker = "__Serialized__" if isinstance(obj, Serialized) else "__Pickled__"
            return {marker: offset}
        if isinstance(obj, set | frozenset):
            return {"__Set__": True, "as-list": list(obj)}
        if isinstance(obj, int):  # msgpack only calls us for ints outside 64 bits
            raise LocalProtocolError(f"integer {obj} does not fit in 64 bits")
        raise LocalProtocolError(f"cannot encode an object of type {type(obj).__name__}")


_per_thread = threading.local()


def dumps(msg: object) -> list[Frame]:
    """Encode a message: frame 0 is msgpack, then the frames of any payloads in it.

    Raises ``LocalProtocolError`` naming the type of an object msgpack cannot encode.
    """
    try:
        encoder: _Encoder = _per_thread.encoder
    except AttributeError:
        encoder = _per_thread.encoder = _Encoder()
    if encoder._frames is not None:
        # Re-entered from inside a pack on this thread (not done by our own hooks, but a
        # packer must never be re-entered): use a throwaway encoder.
        return _Encoder().encode(msg)
    return encoder.encode(msg)


# -- decoding ---------------------------------------------------------------------------

# What a malformed document can make msgpack (or a marker hook reading it) raise. KeyError
# covers a marker map missing its companion key, e.g. "__Set__" without "as-list".
_UNPACK_ERRORS = (ValueError, TypeError, OverflowError, LookupError, msgpack.UnpackException)


def _decode_set_hook(obj: dict[Any, Any]) -> object:
    if "__Set__" in obj:
        return set(obj["as-list"])
    return obj


def _payload_frames(
    frames: Sequence[Frame], marker: str, offset: int, sub_header: object
) -> list[Frame]:
    """Validate a decoded payload sub-header and return the payload frames it announces."""
    if not isinstance(sub_header, dict):
        raise RemoteProtocolError(f"{marker} sub-header is {type(sub_header).__name__}, not a map")
    count = sub_header.get("num-sub-frames")
    if type(count) is not int or count < 0:
        raise RemoteProtocolError(f"{marker} sub-header has invalid num-sub-frames {count!r}")
    start = offset + 1
    if start + count > len(frames):
        raise RemoteProtocolError(
            f"{marker} at frame {offset} claims {count} frames but the message has only "
            f"{len(frames) - start} after it"
        )
    return list(frames[start : start + count])


def _check_offset(frames: Sequence[Frame], marker: str, offset: object) -> int:
    if type(offset) is not int or not 1 <= offset < len(frames):
        raise RemoteProtocolError(
            f"{marker} marker points at frame {offset!r} of a {len(frames)}-frame message"
        )
    return offset


def _make_object_hook(frames: Sequence[Frame]) -> Callable[[dict[Any, Any]], object]:
    def object_hook(obj: dict[Any, Any]) -> object:
        # Every marker map has one or two keys; ordinary messages are bigger.
        if len(obj) > 2:
            return obj
        if "__Serialized__" in obj:
            offset = _check_offset(frames, "__Serialized__", obj["__Serialized__"])
            raw_header = frames[offset]
            try:
                header = msgpack.unpackb(
                    raw_header,
                    raw=False,
                    use_list=False,
                    strict_map_key=False,
                    object_hook=_decode_set_hook,
                )
            except _UNPACK_ERRORS as error:
                raise RemoteProtocolError(f"bad __Serialized__ sub-header: {error}") from error
            sub_frames = _payload_frames(frames, "__Serialized__", offset, header)
            return Serialized(header, sub_frames, raw_header)
        if "__Pickled__" in obj:
            offset = _check_offset(frames, "__Pickled__", obj["__Pickled__"])
            raw_header = frames[offset]
            try:
                header = msgpack.unpackb(raw_header, raw=False, strict_map_key=False)
            except _UNPACK_ERRORS as error:
                raise RemoteProtocolError(f"bad __Pickled__ sub-header: {error}") from error
            sub_frames = _payload_frames(frames, "__Pickled__", offset, header)
            if not isinstance(header.get("pickled-obj"), bytes):
                raise RemoteProtocolError("__Pickled__ sub-header lacks pickled-obj bytes")
            return Pickled(header, sub_frames, raw_header)
        if "__Set__" in obj:
            return set(obj["as-list"])
        return obj

    return object_hook


def loads(frames: Sequence[Frame]) -> object:
    """Decode one message's frames. Raises ``RemoteProtocolError`` on any malformed input."""
    if not frames:
        raise RemoteProtocolError("a message needs at least one frame")
    document = frames[0]
    try:
        return msgpack.unpackb(
            document,
            raw=False,
            use_list=False,
            strict_map_key=False,
            object_hook=_make_object_hook(frames),
        )
    except RemoteProtocolError:
        raise
    except _UNPACK_ERRORS as error:
        raise RemoteProtocolError(f"malformed message: {type(error).__name__}: {error}") from error
    except RecursionError as error:
        raise RemoteProtocolError("message nested too deeply") from error
