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
  ``Pickled.unpickle()`` only where it needs the object. The one exception is a pickled
  numpy scalar (below). A pickle the scheduler made itself and keeps (a task's run_spec)
  is a ``PickledBytes``: the same payload on the wire, a sixth of the memory; a big one is
  kept zlib-compressed (``ZlibPickledBytes``) and sent so, as a compressed frame that
  distributed's ``loads`` decompresses.
* ``{"__Set__": True, "as-list": [...]}`` -> ``set`` (and back, for sets and frozensets).

``dumps`` runs msgpack's C packer over the whole message; it calls our ``default`` hook
only for objects msgpack does not know, which is where payloads are swapped for markers
and their frames appended (in traversal order, exactly as ``distributed`` numbers them).
Each thread reuses one packer, because building a packer costs as much as packing a small
message and a packer is not safe to share while it calls back into Python.

Objects msgpack cannot encode are encoded as ``distributed.protocol.dumps`` encodes them,
so a Dask peer decodes the very same object: an ``Enum`` of dask/distributed becomes an
``{"__Enum__": ...}`` marker; anything else (numpy scalars above all: dask.array graphs from
``vindex`` or unoptimized fancy indexing have keys such as ``("rechunk-merge-abc",
np.int64(0), np.int64(0))``) is pickled on its own into a ``__Pickled__`` payload, which
is what distributed's "falling back to pickle" pass does for each such object (pickle
protocol 5, cloudpickle when pickle fails or the object lives in ``__main__``).
distributed's own payload wrappers (``Serialize``, ``ToPickle``, its ``Serialized`` and
``Pickled``) become payloads that decode to what distributed would send (a ``Serialize``
with distributed's "pickle" serializer family). Only what neither msgpack nor pickle
can carry (an int beyond 64 bits, an unpicklable object) raises ``LocalProtocolError``,
naming the object's type and its path in the message. Plain messages never reach the
hook, so none of this costs anything on the hot path; the pickles of numpy integer
scalars are cached because a key's parts repeat in every message about that key.

On the way in, a ``__Pickled__`` payload that holds nothing but a numpy scalar (what a
Dask worker or client sends for an ``np.int64`` in a key) is decoded to that scalar, with
an unpickler that can build numpy scalars and dtypes and nothing else, so it runs no
code of the peer's. Such a key then equals, and hashes like, the key the scheduler got
from the graph (``np.int64(0) == 0`` and ``hash(np.int64(0)) == hash(0)``), in every
message. Any other ``Pickled`` compares and hashes by its pickle bytes, so it can sit in a
map key, too.

``loads`` runs msgpack's C unpacker with an ``object_hook`` that is called for every map;
the hook rejects non-marker maps with one ``len()`` test, keeping the common path cheap.
(Skipping the hook for documents that contain no marker name was measured: the byte
search costs about what the hook does, so it is not worth the code.)
Lists decode as tuples (``use_list=False``), which also makes tuple map keys (Dask keys
such as ``("x", 3)``) decodable. ``__Enum__`` markers stay plain maps (importing the
module they name is the receiving application's business). Anything the peer got wrong
becomes ``RemoteProtocolError``.

Received payload sub-headers are kept as their original bytes and re-emitted verbatim, so
forwarding a payload is zero-copy and byte-exact even for sub-header contents we do not
model (legacy inline ``__Serialized__`` maps, compression tuples, split offsets).
"""

from __future__ import annotations

import enum
import io
import pickle
import sys
import threading
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

import msgpack  # type: ignore[import-untyped]  # msgpack ships no type information

from dsched.wire.errors import LocalProtocolError, MapKey, RemoteProtocolError, format_path

__all__ = [
    "HANDSHAKE",
    "PICKLE_PROTOCOL",
    "Pickled",
    "PickledBytes",
    "Serialized",
    "ZlibPickledBytes",
    "dumps",
    "loads",
]

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


@dataclass(frozen=True, slots=True, eq=False)
class Pickled:
    """A ``__Pickled__`` payload: ``header["pickled-obj"]`` (pickle bytes) + out-of-band buffers.

    Kept as bytes until someone calls ``unpickle()``; ``encoded_header`` as in
    ``Serialized``. Two payloads are equal, and hash alike, when their pickle bytes and
    buffers are (the rest of the header does not count), so a Pickled that is part of a
    key stays the same key in every message that carries it.
    """

    header: dict[str, Any]
    frames: list[Frame]
    encoded_header: Frame | None = field(default=None, repr=False)

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

    def _content(self) -> tuple[bytes, tuple[bytes, ...]]:
        return self.pickle_bytes, tuple(bytes(frame) for frame in self.frames)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Pickled):
            return NotImplemented
        return self is other or self._content() == other._content()

    def __hash__(self) -> int:
        return hash(self._content())


class PickledBytes:
    """A pickle made here (protocol 5) and its out-of-band buffers, sent as ``__Pickled__``.

    What a ``Pickled`` carries, in the least memory: the scheduler keeps one per task (the
    run_spec pickled at graph intake) for the task's whole life, and a ``Pickled`` (its
    header dict and frame list) would cost ~250 bytes a task more than these 48. The
    sub-header is built when the payload is encoded. Compares by identity: a run_spec is
    never part of a key. ``compact`` may return a ``ZlibPickledBytes`` instead.
    """

    __slots__ = ("buffers", "data")

    def __init__(self, data: bytes, buffers: tuple[Frame, ...] = ()) -> None:
        self.data = data
        self.buffers = buffers

    @staticmethod
    def compact(data: bytes, buffers: tuple[Frame, ...] = ()) -> PickledBytes:
        """The smaller of ``data`` as it is and ``data`` compressed (``ZlibPickledBytes``)."""
        if buffers or len(data) < _COMPRESS_FROM:
            return PickledBytes(data, buffers)
        compressed = zlib.compress(data, 1)
        if len(compressed) > len(data) * _COMPRESS_UNLESS_ABOVE:
            return PickledBytes(data)
        return ZlibPickledBytes(compressed)

    @property
    def header(self) -> dict[str, Any]:
        return {"pickled-obj": self.data, "num-sub-frames": len(self.buffers)}

    @property
    def frames(self) -> list[Frame]:
        return list(self.buffers)

    @property
    def pickle_bytes(self) -> bytes:
        return self.data

    def unpickle(self) -> Any:
        """Unpickle the payload: runs code of whoever made the pickle; call it deliberately."""
        return pickle.loads(self.data, buffers=self.buffers)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({len(self.data)} bytes, {len(self.buffers)} buffers)"


class ZlibPickledBytes(PickledBytes):
    """A ``PickledBytes`` kept zlib-compressed (``data``), down to ~60 % on fused array tasks.

    Sent compressed, never decompressed here: the payload's ``pickled-obj`` is a fixed stub,
    ``pickle.loads(<buffer 0>)``, and its one out-of-band frame is the compressed pickle with
    the sub-header's ``compression: ("zlib",)``, which distributed's ``loads`` undoes before
    it unpickles (as for any compressed frame); the stub then unpickles the real object.
    """

    __slots__ = ()

    @property
    def header(self) -> dict[str, Any]:
        return {"pickled-obj": _ZLIB_STUB, "num-sub-frames": 1, "compression": ("zlib",)}

    @property
    def frames(self) -> list[Frame]:
        return [self.data]

    @property
    def pickle_bytes(self) -> bytes:
        return zlib.decompress(self.data)

    def unpickle(self) -> Any:
        return pickle.loads(zlib.decompress(self.data))


# Pickles shorter than this stay as they are: compressing them saves little (tree-14's
# 200-byte tasks by ~10 %) for ~9 us a task. Nor is a pickle kept compressed that shrinks
# to more than the given fraction of its size.
_COMPRESS_FROM: Final = 1024
_COMPRESS_UNLESS_ABOVE: Final = 0.8
# The pickle of ``pickle.loads(<out-of-band buffer 0>)``: PROTO 5, the global pickle.loads
# (SHORT_BINUNICODE x2, STACK_GLOBAL), NEXT_BUFFER, TUPLE1, REDUCE, STOP.
_ZLIB_STUB: Final = b"\x80\x05\x8c\x06pickle\x8c\x05loads\x93\x97\x85R."
_ZLIB_SUB_HEADER: Final = msgpack.packb(
    {"pickled-obj": _ZLIB_STUB, "num-sub-frames": 1, "compression": ("zlib",)},
    use_bin_type=True,
)


# -- encoding ---------------------------------------------------------------------------

# A Dask peer decodes an ``__Enum__`` marker only for an enum whose module is in its
# ``distributed.scheduler.allowed-imports`` (by default dask and distributed), so enums of
# other packages are pickled instead: the peer then gets the member, not an import error.
_ENUM_PACKAGES: Final = frozenset({"dask", "distributed"})

# distributed's payload wrappers are recognised by their module, so that the codec does
# not import distributed for objects it hardly ever sees.
_DISTRIBUTED_SERIALIZE: Final = "distributed.protocol.serialize"

# Entries per scalar cache (below); a full cache is emptied and fills up again.
_SCALAR_CACHE_SIZE: Final = 4096

# The encoded sub-header of the pickle of a numpy integer or bool scalar, by (type, value):
# pickling one costs ~10 us, and a key's parts recur in every message about the key. Only
# these kinds, for which equal values are identical values (unlike 0.0 and -0.0, or NaN).
_scalar_headers: dict[tuple[type, object], bytes] = {}
_CACHED_KINDS: Final = frozenset("biu")


class _Unencodable(Exception):
    """Raised inside the packer's hook; ``dumps`` turns it into a LocalProtocolError."""

    def __init__(self, obj: object, reason: str) -> None:
        super().__init__(reason)
        self.obj = obj
        self.reason = reason


def _encode_header_default(obj: object) -> object:
    if isinstance(obj, set | frozenset):
        return {"__Set__": True, "as-list": list(obj)}
    raise LocalProtocolError(
        f"cannot encode an object of type {_type_name(type(obj))}", offending_type=type(obj)
    )


def _encode_header(header: dict[str, Any], num_sub_frames: int) -> bytes:
    if header.get("num-sub-frames") != num_sub_frames:
        header = {**header, "num-sub-frames": num_sub_frames}  # never mutate the caller's
    try:
        packed: bytes = msgpack.packb(header, use_bin_type=True, default=_encode_header_default)
    except (LocalProtocolError, TypeError, ValueError, OverflowError) as error:
        raise LocalProtocolError(f"cannot encode payload sub-header: {error}") from error
    return packed


def _pickled_by_value(obj: object) -> bool:
    """Whether cloudpickle was told to pickle ``obj``'s module by value (distributed asks)."""
    cloudpickle = sys.modules.get("cloudpickle")
    if cloudpickle is None:
        return False
    registry = cloudpickle.list_registry_pickle_by_value()
    return bool(registry) and getattr(obj, "__module__", None) in registry


def _pickle_object(obj: object) -> tuple[bytes, list[Frame]]:
    """Pickle ``obj`` as ``distributed.protocol.pickle.dumps`` does: protocol 5 with
    out-of-band buffers; cloudpickle if pickle fails or the pickle refers to ``__main__``.
    (distributed tries its dask serializers between the two; cloudpickle covers what we
    meet.) Raises whatever the pickler raised."""
    buffers: list[Frame] = []

    def keep(buffer: pickle.PickleBuffer) -> None:
        buffers.append(buffer.raw())

    try:
        data = pickle.dumps(obj, protocol=PICKLE_PROTOCOL, buffer_callback=keep)
        if b"__main__" not in data and not _pickled_by_value(obj):
            return data, buffers
    except Exception:
        pass
    import cloudpickle  # type: ignore[import-untyped]  # only for the rare objects pickle refuses

    buffers.clear()
    data = cloudpickle.dumps(obj, protocol=PICKLE_PROTOCOL, buffer_callback=keep)
    return data, buffers


def _from_distributed(obj: Any) -> Serialized | Pickled | None:
    """distributed's payload wrappers as ours, for peers to decode as what distributed's
    dumps would have sent (None: not one of them). Duck-typed: wire/ imports no distributed."""
    name = type(obj).__name__
    if name == "Serialized":
        return Serialized(dict(obj.header), list(obj.frames))
    if name == "Pickled":
        return Pickled(dict(obj.header), list(obj.frames))
    if name == "ToPickle":
        return Pickled.from_bytes(*_pickle_object(obj.data))
    if name == "Serialize":
        # distributed's "pickle" serializer family (serialize.pickle_dumps), which every
        # peer can deserialize: the "dask" family would need distributed's registry here.
        data, buffers = _pickle_object(obj.data)
        writeable = tuple(not memoryview(buffer).readonly for buffer in buffers)
        header = {"serializer": "pickle", "writeable": writeable}
        header["compression"] = (None,) * (1 + len(buffers))
        return Serialized(header, [data, *buffers])
    return None


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
        except _Unencodable as error:
            raise _unencodable_error(msg, error.obj, error.reason) from error.__cause__
        except LocalProtocolError:
            raise
        except (TypeError, ValueError, OverflowError) as error:
            # msgpack's own refusals: nesting too deep (or a cycle), a buffer beyond 4 GiB.
            raise LocalProtocolError(f"cannot encode message: {error}") from error
        finally:
            self._frames = None
        return frames

    def _default(self, obj: object) -> object:
        frames = self._frames
        assert frames is not None
        if type(obj) is PickledBytes:  # every compute-task's run_spec: first
            offset = len(frames)
            buffers = obj.buffers
            frames.append(_encode_header({"pickled-obj": obj.data}, len(buffers)))
            frames.extend(buffers)
            return {"__Pickled__": offset}
        if type(obj) is ZlibPickledBytes:
            offset = len(frames)
            frames.append(_ZLIB_SUB_HEADER)
            frames.append(obj.data)
            return {"__Pickled__": offset}
        if isinstance(obj, Serialized | Pickled):
            offset = len(frames)
            header = obj.encoded_header
            if header is None:
                try:
                    header = _encode_header(obj.header, len(obj.frames))
                except LocalProtocolError as error:
                    raise _Unencodable(obj, str(error)) from error
            frames.append(header)
            frames.extend(obj.frames)
            marker = "__Serialized__" if isinstance(obj, Serialized) else "__Pickled__"
            return {marker: offset}
        if isinstance(obj, set | frozenset):
            return {"__Set__": True, "as-list": list(obj)}
        return self._fallback(obj, frames)

    def _fallback(self, obj: object, frames: list[Frame]) -> object:
        """What distributed does with an object msgpack does not know (see the top)."""
        cls = type(obj)
        cache_key: tuple[type, object] | None = None
        if cls.__module__ == "numpy":
            numpy = sys.modules["numpy"]  # imported: obj is one of its objects
            if isinstance(obj, numpy.generic) and obj.dtype.kind in _CACHED_KINDS:
                cache_key = (cls, obj)
                header = _scalar_headers.get(cache_key)
                if header is not None:
                    frames.append(header)
                    return {"__Pickled__": len(frames) - 1}
        elif isinstance(obj, int):  # msgpack calls us for ints only beyond 64 bits
            raise _Unencodable(obj, f"the integer {obj} does not fit in 64 bits")
        elif isinstance(obj, enum.Enum) and cls.__module__.partition(".")[0] in _ENUM_PACKAGES:
            # distributed's msgpack_encode_default, key for key
            return {
                "__Enum__": True,
                "name": obj.name,
                "__module__": obj.__module__,
                "__name__": cls.__name__,
            }
        elif cls.__module__ == _DISTRIBUTED_SERIALIZE:
            try:
                payload = _from_distributed(obj)
            except Exception as error:
                raise _Unencodable(obj, f"serializing it failed: {error!r}") from error
            if payload is not None:
                try:
                    return self._default(payload)
                except _Unencodable as error:  # blame the object that is in the message
                    raise _Unencodable(obj, error.reason) from error.__cause__
        try:
            data, buffers = _pickle_object(obj)
            header = _encode_header({"pickled-obj": data}, len(buffers))
        except Exception as error:
            raise _Unencodable(
                obj, f"msgpack cannot encode it and pickling it failed: {error!r}"
            ) from error
        if cache_key is not None:
            if len(_scalar_headers) >= _SCALAR_CACHE_SIZE:
                _scalar_headers.clear()
            _scalar_headers[cache_key] = header
        offset = len(frames)
        frames.append(header)
        frames.extend(buffers)
        return {"__Pickled__": offset}


def _type_name(cls: type) -> str:
    module = getattr(cls, "__module__", None)
    if module in (None, "builtins"):
        return cls.__qualname__
    return f"{module}.{cls.__qualname__}"


def _unencodable_error(msg: object, obj: object, reason: str) -> LocalProtocolError:
    path = _locate(msg, obj)
    where = f" at {format_path(path)}" if path is not None else ""
    return LocalProtocolError(
        f"cannot encode an object of type {_type_name(type(obj))}{where}: {reason}",
        offending_type=type(obj),
        path=path,
    )


def _locate(root: object, target: object) -> tuple[object, ...] | None:
    """The path from ``root`` down to ``target`` (found by identity; None if not found).

    Walks what msgpack walks: map keys (a ``MapKey`` step) and values, list and tuple
    items, and set members (by their position in the set's iteration order, which is the
    order of the encoded ``as-list``). Only runs once an encoding has failed.
    """
    stack: list[tuple[object, tuple[object, ...]]] = [(root, ())]
    seen: set[int] = set()
    while stack:
        obj, path = stack.pop()
        if obj is target:
            return path
        children: list[tuple[object, tuple[object, ...]]] = []
        if isinstance(obj, dict | list | tuple | set | frozenset):
            if id(obj) in seen:  # a cycle, or an object shared by two parents
                continue
            seen.add(id(obj))
            if isinstance(obj, dict):
                for key, value in obj.items():
                    children.append((key, (*path, MapKey(key))))
                    children.append((value, (*path, key)))
            else:
                children = [(item, (*path, index)) for index, item in enumerate(obj)]
        stack.extend(reversed(children))
    return None


_per_thread = threading.local()


def dumps(msg: object) -> list[Frame]:
    """Encode a message: frame 0 is msgpack, then the frames of any payloads in it.

    Objects msgpack does not know are encoded as ``distributed.protocol.dumps`` encodes
    them (numpy scalars and the like are pickled). What cannot be encoded at all raises
    ``LocalProtocolError`` naming the object's type (``offending_type``) and its place in
    the message (``path``); nothing of the message is left behind in the encoder.
    """
    try:
        encoder: _Encoder = _per_thread.encoder
    except AttributeError:
        encoder = _per_thread.encoder = _Encoder()
    if encoder._frames is not None:
        # Re-entered from inside a pack on this thread (a pickler called from our hook may
        # run arbitrary code; a packer must never be re-entered): use a throwaway encoder.
        return _Encoder().encode(msg)
    return encoder.encode(msg)


# -- decoding ---------------------------------------------------------------------------

# What a malformed document can make msgpack (or a marker hook reading it) raise. KeyError
# covers a marker map missing its companion key, e.g. "__Set__" without "as-list".
_UNPACK_ERRORS = (ValueError, TypeError, OverflowError, LookupError, msgpack.UnpackException)

# A __Pickled__ sub-header at most this long may hold a numpy scalar (one takes 130-170
# bytes), and names numpy within its first _NUMPY_WINDOW bytes.
_SCALAR_HEADER_MAX: Final = 320
_NUMPY_WINDOW: Final = 96
# The numpy scalar kinds decoded on receipt: bool, integers, floats, complex, timedelta,
# datetime (immutable and hashable; a structured "void" scalar is neither: it stays Pickled).
_SCALAR_KINDS: Final = frozenset("biufcmM")
_NOT_A_SCALAR: Final = object()
_MISSING: Final = object()
# Decoded numpy scalars (or _NOT_A_SCALAR) by the sub-header bytes that carried them.
_decoded_scalars: dict[bytes, object] = {}


class _NumpyScalarUnpickler(pickle.Unpickler):
    """Builds numpy scalars and dtypes and refuses every other global, so nothing of the
    peer's runs: a numpy scalar's pickle is ``scalar(dtype(...), raw bytes)``."""

    def find_class(self, module: str, name: str) -> Any:
        if name == "scalar" and module in ("numpy._core.multiarray", "numpy.core.multiarray"):
            try:  # numpy 2 pickles name numpy._core, numpy 1 pickles numpy.core
                return super().find_class("numpy._core.multiarray", "scalar")
            except (ImportError, AttributeError):
                return super().find_class("numpy.core.multiarray", "scalar")
        if (module, name) in (("numpy", "dtype"), ("_codecs", "encode")):
            # _codecs.encode: how protocols 0-2 pickle the scalar's raw bytes
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not part of a numpy scalar")


def _decode_numpy_scalar(raw_header: bytes) -> object:
    """The numpy scalar a pickled payload's sub-header holds, else ``_NOT_A_SCALAR`` (then
    the payload takes the ordinary path, which also reports any malformation)."""
    try:
        header = msgpack.unpackb(raw_header, raw=False, strict_map_key=False)
        if not isinstance(header, dict):
            return _NOT_A_SCALAR
        count = header.get("num-sub-frames")
        compression = header.get("compression")
        data = header.get("pickled-obj")
        if (
            type(count) is not int
            or count != 0
            or (compression and any(codec is not None for codec in compression))
            or not isinstance(data, bytes)
        ):
            return _NOT_A_SCALAR
        value = _NumpyScalarUnpickler(io.BytesIO(data)).load()
    except Exception:
        return _NOT_A_SCALAR
    numpy = sys.modules.get("numpy")
    if numpy is None or not isinstance(value, numpy.generic):
        return _NOT_A_SCALAR
    if value.dtype.kind not in _SCALAR_KINDS:
        return _NOT_A_SCALAR
    return value


def _numpy_scalar(data: bytes) -> object:
    """The numpy scalar a small pickled payload's sub-header holds (cached), else
    ``_NOT_A_SCALAR``."""
    value = _decoded_scalars.get(data, _MISSING)
    if value is _MISSING:
        value = _decode_numpy_scalar(data)
        if len(_decoded_scalars) >= _SCALAR_CACHE_SIZE:
            _decoded_scalars.clear()
        _decoded_scalars[data] = value
    return value


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
            # A numpy scalar's pickle starts with the global numpy._core.multiarray.scalar,
            # within the first ~60 bytes of the sub-header whatever the order of its
            # entries: a short search rules out every other payload cheaply.
            if len(raw_header) <= _SCALAR_HEADER_MAX:
                data = raw_header if type(raw_header) is bytes else bytes(raw_header)
                if data.find(b"numpy", 0, _NUMPY_WINDOW) >= 0:
                    scalar = _numpy_scalar(data)
                    if scalar is not _NOT_A_SCALAR:
                        return scalar
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
    """Decode one message's frames. Raises ``RemoteProtocolError`` on any malformed input.

    ``__Pickled__`` payloads stay ``Pickled``, except those holding only a numpy scalar
    (decoded without running any of the peer's code; see the top of the module).
    """
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
