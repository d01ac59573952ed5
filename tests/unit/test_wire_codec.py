"""Tests of dsched.wire.codec, including interop in both directions with distributed."""

from __future__ import annotations

import pickle
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import msgpack
import numpy as np
import pytest
from distributed.core import error_message
from distributed.protocol import Serialize, ToPickle, serialize
from distributed.protocol import dumps as distributed_dumps
from distributed.protocol import loads as distributed_loads
from distributed.protocol.serialize import Serialized as DistributedSerialized
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dsched.wire import (
    HANDSHAKE,
    LocalProtocolError,
    Pickled,
    RemoteProtocolError,
    Serialized,
    dumps,
    loads,
)

BOUNDED = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def as_bytes(frames: list[Any]) -> list[bytes]:
    return [bytes(frame) for frame in frames]


def numpy_serialized(array: np.ndarray) -> Serialized:
    """A Serialized built the way a worker would serialize a result (dask serializer)."""
    header, frames = serialize(array)
    return Serialized(header, list(frames))


class Point:
    """Module-level so that pickle can find it by reference."""

    def __init__(self, x: int, y: int) -> None:
        self.x = x
        self.y = y

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Point) and (self.x, self.y) == (other.x, other.y)

    __hash__ = None  # type: ignore[assignment]


PLAIN_MESSAGE = {
    "op": "task-finished",
    "key": ("x-abc", 3),
    "nbytes": {("x-abc", 3): 80, "y": 8},
    "keys": {"a", ("b", 1)},
    "nested": {"list": [1, [2.5, None], b"\x00bytes"], "empty": {}},
    "float": 1.5e300,
    "negative": -(2**63),
    "big": 2**64 - 1,
    "none": None,
    "flag": True,
}


# -- plain values ----------------------------------------------------------------------------


def test_plain_message_round_trip_normalises_lists_to_tuples() -> None:
    decoded = loads(dumps(PLAIN_MESSAGE))
    assert isinstance(decoded, dict)
    assert decoded["key"] == ("x-abc", 3)
    assert decoded["nbytes"] == {("x-abc", 3): 80, "y": 8}
    assert decoded["keys"] == {"a", ("b", 1)}
    assert decoded["nested"] == {"list": (1, (2.5, None), b"\x00bytes"), "empty": {}}
    assert decoded["big"] == 2**64 - 1
    assert decoded["negative"] == -(2**63)


def test_frozenset_encodes_as_set() -> None:
    assert loads(dumps({"s": frozenset([1, 2])})) == {"s": {1, 2}}


def test_plain_message_frame0_is_byte_identical_to_distributed() -> None:
    message = {"op": "compute", "key": ("x", 1), "who_has": {("y", 2): ["tcp://a:1"]}}
    assert as_bytes(dumps(message)) == as_bytes(distributed_dumps(message))


def test_handshake_matches_distributed_handshake_bytes() -> None:
    # protocol.md §1.2: 83 ab "compression" c0 a6 "python" 93 03 0b XX af "pickle-protocol" 05
    (frame,) = dumps(HANDSHAKE)
    assert len(frame) == 42
    assert frame[:2] == b"\x83\xab"
    assert distributed_loads([frame]) == {
        "compression": None,
        "python": HANDSHAKE["python"],
        "pickle-protocol": 5,
    }


def test_enum_markers_stay_plain_dicts() -> None:
    marker = {"__Enum__": True, "__module__": "os", "__name__": "x", "name": "system"}
    assert loads(dumps({"status": marker})) == {"status": marker}


# -- our dumps -> distributed loads ----------------------------------------------------------


def test_our_payloads_are_read_by_distributed_without_deserializing() -> None:
    array = np.arange(12, dtype="i8")
    message = {"op": "x", "data": {("k", 0): numpy_serialized(array)}, "keys": {1, 2}}
    decoded = distributed_loads(dumps(message), deserialize=False)
    payload = decoded["data"][("k", 0)]
    assert isinstance(payload, DistributedSerialized)
    assert payload.header["serializer"] == "dask"
    assert decoded["keys"] == {1, 2}


def test_our_payloads_are_deserialized_by_distributed() -> None:
    array = np.arange(1000, dtype="f8").reshape(10, 100)
    point = Point(1, 2)
    big_buffer_array = np.ones(50_000, dtype="u1")
    message = {
        "op": "compute-task",
        "key": ("x", 1),
        "data": numpy_serialized(array),
        "run_spec": Pickled.from_object(point),
        "with_buffers": Pickled.from_object(big_buffer_array),
        "nested": [{"a": None, "b": 0.25, "c": b"raw"}],
        "set": {3, 4},
    }
    frames = dumps(message)
    decoded = distributed_loads(frames, deserialize=True)
    np.testing.assert_array_equal(decoded["data"], array)
    assert decoded["run_spec"] == point
    np.testing.assert_array_equal(decoded["with_buffers"], big_buffer_array)
    assert decoded["nested"] == ({"a": None, "b": 0.25, "c": b"raw"},)
    assert decoded["set"] == {3, 4}
    assert decoded["key"] == ("x", 1)


def test_pickled_from_object_keeps_large_buffers_out_of_band() -> None:
    array = np.arange(10_000, dtype="i8")
    payload = Pickled.from_object(array)
    assert payload.header["num-sub-frames"] == 1
    assert len(payload.pickle_bytes) < 1000
    np.testing.assert_array_equal(payload.unpickle(), array)


def test_locally_built_headers_get_num_sub_frames_without_mutating_the_caller() -> None:
    header: dict[str, Any] = {"serializer": "pickle", "writeable": ()}
    payload = Serialized(header, [pickle.dumps({"a": 1})])
    frames = dumps({"x": payload})
    assert header == {"serializer": "pickle", "writeable": ()}
    assert msgpack.unpackb(frames[1])["num-sub-frames"] == 1
    assert distributed_loads(frames)["x"] == {"a": 1}


# -- distributed dumps -> our loads -> our dumps -> distributed loads -------------------------


def interop_message() -> dict[str, Any]:
    return {
        "op": "update-data",
        "data": {
            ("arr", 0): Serialize(np.arange(100_000, dtype="i4")),  # out-of-band buffer
            ("arr", 1): Serialize(np.array([[1.5, 2.5]])),
            "text": Serialize("hello"),
        },
        "annotations": ToPickle({"priority": 3, "point": Point(5, 6)}),
        "embedded": ToPickle(np.arange(20_000, dtype="u2")),
        "keys": {("arr", 0), ("arr", 1)},
        "who_has": {("arr", 0): ["tcp://127.0.0.1:1"], "z": []},
        "nested": {"deep": [{"x": [1, 2, [3]]}], "b": b"bytes", "n": None, "f": 0.1},
    }


def test_distributed_message_decodes_to_opaque_payloads() -> None:
    frames = distributed_dumps(interop_message(), context={"compression": None})
    decoded = loads(frames)
    assert isinstance(decoded, dict)
    data = decoded["data"]
    assert set(data) == {("arr", 0), ("arr", 1), "text"}
    assert all(isinstance(value, Serialized) for value in data.values())
    assert isinstance(decoded["annotations"], Pickled)
    assert decoded["annotations"].unpickle() == {"priority": 3, "point": Point(5, 6)}
    embedded = decoded["embedded"]
    assert isinstance(embedded, Pickled)
    assert embedded.header["num-sub-frames"] == 1  # the numpy data travelled out of band
    np.testing.assert_array_equal(embedded.unpickle(), np.arange(20_000, dtype="u2"))
    assert decoded["keys"] == {("arr", 0), ("arr", 1)}
    assert decoded["who_has"] == {("arr", 0): ("tcp://127.0.0.1:1",), "z": ()}
    assert decoded["nested"] == {"deep": ({"x": (1, 2, (3,))},), "b": b"bytes", "n": None, "f": 0.1}


def test_pass_through_gives_the_original_values_back() -> None:
    original = interop_message()
    decoded = loads(distributed_dumps(original, context={"compression": None}))
    forwarded = distributed_loads(dumps(decoded), deserialize=True)
    for key in (("arr", 0), ("arr", 1)):
        np.testing.assert_array_equal(forwarded["data"][key], original["data"][key].data)
    assert forwarded["data"]["text"] == "hello"
    assert forwarded["annotations"] == original["annotations"].data
    np.testing.assert_array_equal(forwarded["embedded"], original["embedded"].data)
    assert forwarded["keys"] == original["keys"]
    assert forwarded["who_has"] == {("arr", 0): ("tcp://127.0.0.1:1",), "z": ()}
    assert forwarded["nested"] == {
        "deep": ({"x": (1, 2, (3,))},),
        "b": b"bytes",
        "n": None,
        "f": 0.1,
    }


def test_pass_through_is_byte_exact_and_zero_copy() -> None:
    message = {"op": "x", "data": {("k", 1): Serialize(np.arange(50_000))}, "n": 1}
    frames = distributed_dumps(message, context={"compression": None})
    decoded = loads(frames)
    assert isinstance(decoded, dict)
    payload = decoded["data"][("k", 1)]
    reencoded = dumps(decoded)
    assert as_bytes(reencoded) == as_bytes(frames)
    assert payload.frames[0] is frames[2]  # the data frame itself was forwarded, not copied


def test_error_reply_from_distributed_passes_through() -> None:
    try:
        raise ValueError("boom")
    except ValueError as error:
        reply = error_message(error, status="uncaught-error")
    decoded = loads(distributed_dumps(reply, context={"compression": None}))
    assert isinstance(decoded, dict)
    assert decoded["status"] == "uncaught-error"
    assert isinstance(decoded["exception"], Serialized)
    forwarded = distributed_loads(dumps(decoded))
    assert "boom" in str(pickle.loads(forwarded["exception"]))


# -- rejection of bad input -------------------------------------------------------------------


def pack(obj: object) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


@pytest.mark.parametrize(
    ("frames", "match"),
    [
        ([b"\xc1"], "malformed"),
        ([b"\x92\x01"], "malformed"),  # truncated array
        ([pack(1) + b"\x00"], "malformed"),  # trailing data
        ([pack({"a": {"__Serialized__": 1}})], "points at frame 1"),
        ([pack({"a": {"__Serialized__": 0}}), b""], "points at frame 0"),
        ([pack({"a": {"__Pickled__": True}}), pack({})], "points at frame True"),
        ([pack({"a": {"__Serialized__": "1"}}), b""], "points at frame '1'"),
        ([pack({"a": {"__Serialized__": 1}}), pack({"num-sub-frames": 2}), b""], "claims 2"),
        ([pack({"a": {"__Serialized__": 1}}), pack([1, 2])], "not a map"),
        ([pack({"a": {"__Serialized__": 1}}), pack({"serializer": "x"})], "num-sub-frames"),
        ([pack({"a": {"__Serialized__": 1}}), b"\xc1"], "bad __Serialized__ sub-header"),
        ([pack({"a": {"__Pickled__": 1}}), pack({"num-sub-frames": 0})], "pickled-obj"),
        (
            [pack({"a": {"__Pickled__": 1}}), pack({"pickled-obj": b"x", "num-sub-frames": -1})],
            "num-sub-frames",
        ),
        ([pack({"__Set__": True})], "malformed"),
        ([pack({"__Set__": True, "as-list": [{"unhashable": 1}]})], "malformed"),
        ([b"\x81\x81\x01\x02\x03"], "malformed"),  # a map used as a map key
        ([], "at least one frame"),
    ],
)
def test_malformed_input_raises_remote_protocol_error(frames: list[bytes], match: str) -> None:
    with pytest.raises(RemoteProtocolError, match=match):
        loads(frames)


def test_deep_nesting_is_rejected() -> None:
    with pytest.raises(RemoteProtocolError):
        loads([b"\x91" * 100_000 + b"\x00"])


def test_compressed_pickled_payload_refuses_to_unpickle() -> None:
    payload = Pickled(
        {"pickled-obj": pickle.dumps(1), "num-sub-frames": 0, "compression": ("lz4",)}, []
    )
    with pytest.raises(RemoteProtocolError, match="compressed"):
        payload.unpickle()


@pytest.mark.parametrize(
    ("message", "match"),
    [
        ({"x": object()}, "type object"),
        ({"x": [1, np.int64(3)]}, "type int64"),
        ({"x": 2**64}, "does not fit in 64 bits"),
        ({"x": Serialized({"bad": object()}, [])}, "sub-header"),
    ],
)
def test_unencodable_messages_raise_local_protocol_error(message: object, match: str) -> None:
    with pytest.raises(LocalProtocolError, match=match):
        dumps(message)
    # The reused packer is left clean for the next message.
    assert loads(dumps({"ok": 1})) == {"ok": 1}


def test_payload_constructors_validate() -> None:
    with pytest.raises(TypeError):
        Serialized(["not", "a", "dict"], [])  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        Pickled({"num-sub-frames": 0}, [])


def test_dumps_is_safe_to_use_from_many_threads() -> None:
    def encode_and_check(index: int) -> None:
        payload = Pickled.from_bytes(pickle.dumps(index))
        for _ in range(200):
            frames = dumps({"i": index, "p": payload, "s": {index}})
            decoded = loads(frames)
            assert isinstance(decoded, dict)
            assert decoded["i"] == index
            assert decoded["p"].unpickle() == index
            assert threading.current_thread() is not None

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(encode_and_check, range(32)))


# -- properties -------------------------------------------------------------------------------

hashable_keys = st.recursive(
    st.one_of(st.text(max_size=10), st.integers(-(2**63), 2**64 - 1), st.binary(max_size=5)),
    lambda children: st.tuples(children, children),
    max_leaves=4,
)
values = st.recursive(
    st.one_of(
        st.none(),
        st.booleans(),
        st.integers(-(2**63), 2**64 - 1),
        st.floats(allow_nan=False),
        st.text(max_size=20),
        st.binary(max_size=20),
    ),
    lambda children: st.one_of(
        st.lists(children, max_size=4),
        st.tuples(children, children),
        st.dictionaries(hashable_keys, children, max_size=4),
        st.sets(hashable_keys, max_size=4),
    ),
    max_leaves=20,
)


def normalise(value: object) -> object:
    """What msgpack with use_list=False gives back: sequences become tuples."""
    if isinstance(value, list | tuple):
        return tuple(normalise(item) for item in value)
    if isinstance(value, dict):
        return {normalise(key): normalise(item) for key, item in value.items()}
    return value


@BOUNDED
@given(value=values)
def test_random_values_round_trip_and_match_distributed(value: object) -> None:
    frames = dumps(value)
    assert loads(frames) == normalise(value)
    assert distributed_loads(frames, deserialize=False) == normalise(value)
    assert loads(distributed_dumps(value)) == normalise(value)


def assert_rejected_or_forwardable(frames: list[bytes]) -> None:
    """Input is either refused with RemoteProtocolError or decodes to a forwardable message.

    Forwardable: re-encoding succeeds, uses no more frames than arrived, and decodes again.
    """
    try:
        decoded = loads(frames)
    except RemoteProtocolError:
        return
    forwarded = dumps(decoded)
    assert len(forwarded) <= len(frames)
    loads(forwarded)


@BOUNDED
@given(frames=st.lists(st.binary(max_size=60), min_size=1, max_size=4))
def test_garbage_frames_only_raise_remote_protocol_error(frames: list[bytes]) -> None:
    assert_rejected_or_forwardable(frames)


@BOUNDED
@given(
    marker=st.sampled_from(["__Serialized__", "__Pickled__", "__Set__"]),
    offset=st.one_of(st.integers(-3, 6), st.booleans(), st.none(), st.text(max_size=2)),
    header=st.dictionaries(
        st.sampled_from(["num-sub-frames", "pickled-obj", "as-list", "serializer"]),
        st.one_of(
            st.integers(-2, 5),
            st.binary(max_size=4),
            st.none(),
            st.lists(st.integers(-2, 5), max_size=3),
        ),
    ),
    extra_frames=st.integers(0, 3),
)
def test_hostile_markers_only_raise_remote_protocol_error(
    marker: str, offset: object, header: dict[str, Any], extra_frames: int
) -> None:
    frames = [pack({"m": {marker: offset, **header}}), pack(header)] + [b"x"] * extra_frames
    assert_rejected_or_forwardable(frames)
