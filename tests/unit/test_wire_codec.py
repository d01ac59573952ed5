"""Tests of dsched.wire.codec, including interop in both directions with distributed."""

from __future__ import annotations

import enum
import pickle
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import msgpack
import numpy as np
import pytest
from distributed.core import Status, error_message
from distributed.protocol import Serialize, ToPickle, serialize
from distributed.protocol import dumps as distributed_dumps
from distributed.protocol import loads as distributed_loads
from distributed.protocol.serialize import Pickled as DistributedPickled
from distributed.protocol.serialize import Serialized as DistributedSerialized
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dsched.wire import (
    HANDSHAKE,
    LocalProtocolError,
    Pickled,
    RemoteProtocolError,
    Serialized,
    codec,
    dumps,
    loads,
)
from dsched.wire.errors import MapKey, format_path

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


def _cycle() -> list[object]:
    value: list[object] = []
    value.append(value)
    return value


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


def test_pickled_bytes_travel_as_the_pickled_payload_distributed_decodes() -> None:
    array = np.arange(10_000, dtype="i8")
    buffers: list[Any] = []
    data = pickle.dumps(array, protocol=5, buffer_callback=lambda b: buffers.append(b.raw()))
    with_buffer = codec.PickledBytes(data, tuple(buffers))
    plain = codec.PickledBytes(pickle.dumps(Point(1, 2), protocol=5))
    frames = dumps({"op": "compute-task", "run_spec": plain, "array": with_buffer})
    decoded = distributed_loads(frames, deserialize=True)
    assert decoded["run_spec"] == Point(1, 2)
    np.testing.assert_array_equal(decoded["array"], array)
    # Our own decoder sees the Pickled payload the same object would have made.
    ours = loads(frames)
    assert ours["run_spec"].pickle_bytes == plain.pickle_bytes
    assert ours["array"].header["num-sub-frames"] == 1
    np.testing.assert_array_equal(with_buffer.unpickle(), array)
    assert plain.header == {"pickled-obj": plain.data, "num-sub-frames": 0}


def test_compact_pickled_bytes_compress_only_big_compressible_pickles() -> None:
    value = {"zeros": [0] * 2000, "text": "abc" * 500}
    data = pickle.dumps(value, protocol=5)
    compact = codec.PickledBytes.compact(data)
    assert isinstance(compact, codec.ZlibPickledBytes)
    assert len(compact.data) < len(data) / 2
    assert compact.pickle_bytes == data
    assert compact.unpickle() == value
    # distributed's loads decompresses the frame and runs the stub: the same object.
    frames = dumps({"op": "compute-task", "run_spec": compact})
    assert distributed_loads(frames, deserialize=True)["run_spec"] == value
    # So does a round trip through distributed's own Pickled (header and frames as given).
    again = distributed_dumps({"x": DistributedPickled(compact.header, compact.frames)})
    assert distributed_loads(again)["x"] == value

    small = pickle.dumps("short", protocol=5)
    assert type(codec.PickledBytes.compact(small)) is codec.PickledBytes
    incompressible = pickle.dumps(np.random.default_rng(0).bytes(4000), protocol=5)
    assert type(codec.PickledBytes.compact(incompressible)) is codec.PickledBytes


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


# -- objects msgpack does not know: numpy scalars, enums, distributed's wrappers ---------------

# What dask.array graphs from vindex (and unoptimized fancy indexing) have for keys.
NUMPY_KEY = ("rechunk-merge-d3baebc7", np.int64(0), np.int64(1))
NUMPY_SCALARS = [
    np.int64(-5),
    np.int32(7),
    np.int8(-1),
    np.uint64(2**64 - 1),
    np.uint8(255),
    np.bool_(True),
    np.float32(1.5),
    np.float16(-0.0),
    np.complex64(1 - 2j),
    np.datetime64("2026-08-01T12:00:00.123456789"),
    np.timedelta64(5, "ms"),
]


def numpy_key_batch() -> list[dict[str, Any]]:
    """What the real scheduler sent a worker for a vindex graph (probe of dask 2026.8.0)."""
    return [
        {"op": "free-keys", "keys": [NUMPY_KEY], "stimulus_id": "task-finished-1"},
        {
            "op": "compute-task",
            "key": ("vindex-slice-8bbbfa0d", 0),
            "who_has": {NUMPY_KEY: ("tcp://127.0.0.1:35645",)},
            "nbytes": {NUMPY_KEY: 200},
            "priority": (0, 1, 33),
            "resource_restrictions": None,
            "annotations": {},
        },
    ]


def assert_same_values_and_types(actual: object, expected: object) -> None:
    """Equal as decoded (lists become tuples), and every numpy scalar inside is of the same
    type: ``np.int64(0) == 0`` alone would not notice a scalar that lost its type."""
    expected = normalise(expected)
    assert actual == expected
    assert type(actual) is type(expected), (actual, expected)
    if isinstance(expected, dict):
        assert isinstance(actual, dict)
        for key, value in expected.items():
            [actual_key] = [k for k in actual if k == key]
            assert_same_values_and_types(actual_key, key)
            assert_same_values_and_types(actual[key], value)
    elif isinstance(expected, tuple):
        assert isinstance(actual, tuple)
        for actual_item, item in zip(actual, expected, strict=True):
            assert_same_values_and_types(actual_item, item)
    elif isinstance(expected, set):
        assert isinstance(actual, set)
        pairs = zip(sorted(actual, key=repr), sorted(expected, key=repr), strict=True)
        for actual_item, item in pairs:
            assert_same_values_and_types(actual_item, item)


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_numpy_keys_are_encoded_exactly_as_distributed_encodes_them() -> None:
    batch = numpy_key_batch()
    ours = as_bytes(dumps(batch))
    theirs = as_bytes(distributed_dumps(batch))  # logs "falling back to pickle"
    # Same document: every numpy scalar is its own {"__Pickled__": i}, numbered alike.
    assert ours[0] == theirs[0]
    assert len(ours) == len(theirs) == 7  # 3 keys of 2 numpy parts each
    for our_header, their_header in zip(ours[1:], theirs[1:], strict=True):
        # distributed adds an empty "compression" entry; the pickle is the same bytes.
        ours_decoded, theirs_decoded = msgpack.unpackb(our_header), msgpack.unpackb(their_header)
        assert ours_decoded["pickled-obj"] == theirs_decoded["pickled-obj"]
        assert ours_decoded["num-sub-frames"] == theirs_decoded["num-sub-frames"] == 0
    # And a Dask worker or client decodes the very same objects.
    assert_same_values_and_types(distributed_loads(dumps(batch)), batch)


def test_numpy_keys_from_dask_peers_decode_to_the_same_hashable_keys() -> None:
    task_finished = {"op": "task-finished", "key": NUMPY_KEY, "nbytes": {NUMPY_KEY: 200}}
    decoded = loads(distributed_dumps(task_finished, context={"compression": None}))
    assert isinstance(decoded, dict)
    assert_same_values_and_types(decoded["key"], NUMPY_KEY)
    # The scheduler's tasks dict may hold the key with np.int64 or int parts: both match.
    tasks = {NUMPY_KEY: "from the graph", ("vindex-merge", 0): "the client's key"}
    assert tasks[decoded["key"]] == "from the graph"
    assert decoded["key"] == ("rechunk-merge-d3baebc7", 0, 1)
    assert hash(decoded["key"]) == hash(("rechunk-merge-d3baebc7", 0, 1))
    assert decoded["nbytes"] == {NUMPY_KEY: 200}
    # Equal across messages, and forwarded as they came (e.g. key-in-memory to a client).
    again = loads(distributed_dumps({"keys": {NUMPY_KEY}}))
    assert again == {"keys": {decoded["key"]}}
    assert_same_values_and_types(distributed_loads(dumps(decoded))["key"], NUMPY_KEY)


def test_numpy_scalar_decoding_works_on_memoryview_frames() -> None:
    frames = [memoryview(bytearray(frame)) for frame in distributed_dumps({"k": NUMPY_KEY})]
    assert_same_values_and_types(loads(frames), {"k": NUMPY_KEY})


@pytest.mark.parametrize("protocol", range(pickle.HIGHEST_PROTOCOL + 1))
def test_numpy_scalars_pickled_with_any_protocol_are_decoded(protocol: int) -> None:
    payload = Pickled.from_bytes(pickle.dumps(np.int16(-7), protocol=protocol))
    assert_same_values_and_types(loads(dumps({"k": ("x", payload)})), {"k": ("x", np.int16(-7))})


@pytest.mark.parametrize("scalar", NUMPY_SCALARS, ids=lambda s: type(s).__name__)
def test_numpy_scalars_round_trip_with_their_type(scalar: np.generic) -> None:
    message = {"value": scalar, "key": ("x", scalar)}
    assert_same_values_and_types(distributed_loads(dumps(message)), message)
    assert_same_values_and_types(loads(dumps(message)), message)
    assert_same_values_and_types(loads(distributed_dumps(message)), message)


def test_the_scalar_caches_keep_types_apart_and_stay_bounded() -> None:
    # np.int64(1) == np.int32(1) == np.True_ == 1: the cache must not mix them up.
    message = [np.int64(1), np.int32(1), np.bool_(True), np.uint8(1), 1, True]
    for _ in range(2):
        assert_same_values_and_types(distributed_loads(dumps(message)), message)
        assert_same_values_and_types(loads(dumps(message)), message)
    # Floats are never cached (0.0 == -0.0), so signs survive.
    negative_zero = loads(dumps([np.float32(0.0), np.float32(-0.0)]))
    assert isinstance(negative_zero, tuple)
    assert [np.signbit(value) for value in negative_zero] == [False, True]
    many = [np.int64(i) for i in range(codec._SCALAR_CACHE_SIZE + 100)]
    assert loads(dumps(many)) == tuple(range(len(many)))
    assert len(codec._scalar_headers) <= codec._SCALAR_CACHE_SIZE
    assert len(codec._decoded_scalars) <= codec._SCALAR_CACHE_SIZE


def test_np_float64_and_np_str_are_plain_msgpack_as_in_distributed() -> None:
    # Subclasses of float and str: msgpack encodes them natively, no pickling.
    message = {"f": np.float64(2.5), "s": np.str_("text"), "key": ("x", np.float64(1.0))}
    frames = dumps(message)
    assert as_bytes(frames) == as_bytes(distributed_dumps(message))
    assert len(frames) == 1


CALLS: list[str] = []


def record_call(text: str) -> str:
    CALLS.append(text)
    return text


class NotAScalar:
    """Pickles as a call of record_call, with "numpy" early in its pickle."""

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return record_call, ("numpy._core.multiarray scalar",)


@pytest.mark.parametrize(
    "value",
    [
        NotAScalar(),
        np.arange(3),  # numpy, but an array (numpy._core.multiarray._reconstruct)
        np.zeros((), dtype=[("a", "i4")])[()],  # a structured scalar is mutable: not decoded
        {"numpy": np.int64(1)},  # a dict that holds a scalar is still a dict
    ],
    ids=["other-global", "array", "void-scalar", "dict"],
)
def test_only_numpy_scalars_are_unpickled_on_receipt(value: object) -> None:
    CALLS.clear()
    decoded = loads(distributed_dumps({"v": ToPickle(value)}))
    assert isinstance(decoded, dict)
    payload = decoded["v"]
    assert isinstance(payload, Pickled)
    assert CALLS == []  # nothing of the peer ran
    if isinstance(value, NotAScalar):
        assert payload.unpickle() == "numpy._core.multiarray scalar"
        assert CALLS == ["numpy._core.multiarray scalar"]


def test_pickled_payloads_compare_and_hash_by_content() -> None:
    frames = distributed_dumps({"key": ("x", ToPickle(Point(1, 2)))})
    first, second = loads(frames), loads(list(frames))
    assert isinstance(first, dict) and isinstance(second, dict)
    assert first["key"] == second["key"]
    assert {first["key"]: 1}[second["key"]] == 1  # hashable: can be (part of) a key
    assert Pickled.from_object(Point(1, 2)) == Pickled.from_object(Point(1, 2))
    assert Pickled.from_object(Point(1, 2)) != Pickled.from_object(Point(2, 1))
    assert Pickled.from_object(1) != 1


def test_enums_of_dask_packages_are_markers_exactly_as_in_distributed() -> None:
    message = {"status": Status.running, "statuses": [Status.paused]}
    assert as_bytes(dumps(message)) == as_bytes(distributed_dumps(message))
    assert distributed_loads(dumps(message)) == {
        "status": Status.running,
        "statuses": (Status.paused,),
    }


class Colour(enum.Enum):
    RED = "red"


def test_other_enums_are_pickled_so_that_dask_peers_can_decode_them() -> None:
    # distributed would send an __Enum__ marker, which its peers refuse to import
    # (allowed-imports): a pickle decodes to the member instead.
    assert distributed_loads(dumps({"c": Colour.RED})) == {"c": Colour.RED}


def test_arbitrary_objects_are_pickled_as_distributed_does() -> None:
    class Local:  # pickle cannot find a local class: cloudpickle takes over
        def __init__(self) -> None:
            self.value = 3

    array = np.arange(50_000, dtype="u1")
    message = {"point": Point(1, 2), "local": Local(), "array": array, "frozen": frozenset()}
    frames = dumps(message)
    decoded = distributed_loads(frames)
    assert decoded["point"] == Point(1, 2)
    assert decoded["local"].value == 3
    np.testing.assert_array_equal(decoded["array"], array)
    # The array's data travelled as its own frame (pickle protocol 5, out of band).
    assert any(len(frame) == array.nbytes for frame in frames)
    assert decoded["frozen"] == set()


def test_distributed_payload_wrappers_are_encoded_as_distributed_does() -> None:
    array = np.arange(10, dtype="f8")
    header, frames = serialize(array)
    message = {
        "serialize": Serialize(array),
        "to_pickle": ToPickle({"a": Point(3, 4)}),
        "serialized": DistributedSerialized(header, frames),
        "pickled": DistributedPickled({"pickled-obj": pickle.dumps(Point(5, 6))}, []),
    }
    decoded = distributed_loads(dumps(message))
    np.testing.assert_array_equal(decoded["serialize"], array)
    assert decoded["to_pickle"] == {"a": Point(3, 4)}
    np.testing.assert_array_equal(decoded["serialized"], array)
    assert decoded["pickled"] == Point(5, 6)
    ours = loads(dumps(message))
    assert isinstance(ours, dict)
    assert isinstance(ours["serialize"], Serialized)
    assert isinstance(ours["pickled"], Pickled)


numpy_scalars = st.one_of(
    st.integers(-(2**63), 2**63 - 1).map(np.int64),
    st.integers(0, 2**64 - 1).map(np.uint64),
    st.integers(-128, 127).map(np.int8),
    st.booleans().map(np.bool_),
    st.floats(allow_nan=False, width=32).map(np.float32),
)
numpy_keys = st.tuples(st.text(max_size=8), numpy_scalars, st.integers(0, 3))


@BOUNDED
@given(keys=st.lists(numpy_keys, max_size=6), scalar=numpy_scalars)
def test_random_numpy_keys_survive_every_direction(
    keys: list[tuple[str, np.generic, int]], scalar: np.generic
) -> None:
    message = {
        "op": "compute-task",
        "key": keys[0] if keys else scalar,
        "who_has": dict.fromkeys(keys, ("tcp://a:1",)),
        "keys": list(keys),
        "value": scalar,
    }
    assert_same_values_and_types(distributed_loads(dumps(message)), message)
    assert_same_values_and_types(loads(dumps(message)), message)
    assert_same_values_and_types(loads(distributed_dumps(message)), message)


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
    ("message", "match", "offending_type", "path"),
    [
        (
            {"x": threading.Lock()},
            r"type _thread.lock at msg\['x'\]: .*pickling it failed",
            type(threading.Lock()),
            ("x",),
        ),
        (
            {"x": [1, 2**64]},
            r"type int at msg\['x'\]\[1\]: the integer \d+ does not fit in 64 bits",
            int,
            ("x", 1),
        ),
        (
            {"x": (i for i in range(3))},
            "type generator at",
            type(i for i in range(3)),
            ("x",),
        ),
        (
            {"x": Serialized({"bad": threading.Lock()}, [])},
            r"type dsched.wire.codec.Serialized at msg\['x'\]: cannot encode payload sub-header",
            Serialized,
            ("x",),
        ),
        ({"x": _cycle()}, "cannot encode message: recursion limit", None, None),
    ],
)
def test_unencodable_messages_raise_local_protocol_error(
    message: object, match: str, offending_type: type | None, path: tuple[object, ...] | None
) -> None:
    with pytest.raises(LocalProtocolError, match=match) as caught:
        dumps(message)
    assert caught.value.offending_type is offending_type
    assert caught.value.path == path
    # The reused packer is left clean for the next message.
    assert loads(dumps({"ok": 1})) == {"ok": 1}


def test_local_protocol_error_points_into_a_batch_and_into_map_keys() -> None:
    lock = threading.Lock()
    batch = [
        {"op": "key-in-memory", "key": ("x", np.int64(1))},
        {"op": "compute-task", "who_has": {("y", 0): ("a",), ("z", lock): ("b",)}},
        {"op": "free-keys", "keys": {"k"}},
    ]
    with pytest.raises(LocalProtocolError) as caught:
        dumps(batch)
    error = caught.value
    # path[0] is the index of the message in the batch: the caller can drop just that one.
    assert error.path == (1, "who_has", MapKey(("z", lock)), 1)
    assert error.offending_type is type(lock)
    assert "at msg[1]['who_has'][<key ('z', <unlocked _thread.lock" in str(error)
    assert format_path((0, "keys", MapKey("k"))) == "msg[0]['keys'][<key 'k'>]"
    # The other messages encode once the bad one is gone.
    assert len(loads(dumps([batch[0], batch[2]]))) == 2  # type: ignore[arg-type]


def test_an_unencodable_set_member_is_located() -> None:
    with pytest.raises(LocalProtocolError) as caught:
        dumps({"keys": {2**70}})
    assert caught.value.path == ("keys", 0)


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

# A map with a marker name for a key is a marker, for distributed as for us, never a value.
MARKER_NAMES = {"__Serialized__", "__Pickled__", "__Set__", "__Enum__"}
hashable_keys = st.recursive(
    st.one_of(
        st.text(max_size=10).filter(lambda text: text not in MARKER_NAMES),
        st.integers(-(2**63), 2**64 - 1),
        st.binary(max_size=5),
    ),
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
