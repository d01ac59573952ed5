"""Tests of dsched.wire.framing: exact bytes, incremental decoding, hostile input."""

from __future__ import annotations

import struct
import tracemalloc

import pytest
from distributed.comm.tcp import _add_frames_header
from distributed.protocol.utils import unpack_frames
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dsched.wire import FrameDecoder, RemoteProtocolError, encode_frames

BOUNDED = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def wire_bytes(frames: list[bytes]) -> bytes:
    return b"".join(bytes(buffer) for buffer in encode_frames(frames))


def decode_all(decoder: FrameDecoder) -> list[list[bytes]]:
    messages = []
    while (frames := decoder.next_message()) is not None:
        messages.append([bytes(frame) for frame in frames])
    return messages


def prefix_message(frames: list[bytes], frames_in_prefix: int) -> bytes:
    """A message whose nosplit prefix holds only the first ``frames_in_prefix`` frames."""
    lengths = [len(frame) for frame in frames]
    n = len(frames)
    inside = frames[:frames_in_prefix]
    prefix_nbytes = 8 + 8 * n + sum(len(frame) for frame in inside)
    header = struct.pack(f"<QQ{n}Q", prefix_nbytes, n, *lengths)
    return header + b"".join(frames)


# -- exact bytes ----------------------------------------------------------------------------


def test_handshake_example_bytes_match_the_spec() -> None:
    # protocol.md §1.2: the scheduler's 42-byte handshake is sent as L=58, n=1, len=42.
    frame = bytes(range(42))
    data = wire_bytes([frame])
    assert len(data) == 66
    assert struct.unpack_from("<QQQ", data) == (58, 1, 42)
    assert data[24:] == frame


@pytest.mark.parametrize(
    "frames",
    [[b"a"], [b"abc", b"", b"defg"], [b""], [b"x" * 70_000, b"y" * 3]],
)
def test_encoding_is_byte_identical_to_distributed(frames: list[bytes]) -> None:
    (reference,), _, _ = _add_frames_header(list(frames))
    assert wire_bytes(frames) == bytes(reference)


def test_memoryview_frames_are_measured_in_bytes_not_items() -> None:
    array_view = memoryview(struct.pack("<4d", 1.0, 2.0, 3.0, 4.0)).cast("d")
    decoder = FrameDecoder()
    decoder.feed(b"".join(bytes(buffer) for buffer in encode_frames([array_view])))
    assert decode_all(decoder) == [[array_view.tobytes()]]


def test_encode_frames_does_not_copy_payloads() -> None:
    payload = b"z" * 1000
    buffers = encode_frames([b"head", payload])
    assert buffers[2] is payload


# -- decoding -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "frames",
    [[b"hello"], [b"a", b"bb", b"ccc"], [], [b""], [b"", b"", b"x"], [b"q" * 100_000]],
)
def test_round_trip(frames: list[bytes]) -> None:
    decoder = FrameDecoder()
    decoder.feed(wire_bytes(frames))
    assert decode_all(decoder) == [frames]
    assert decoder.buffered_bytes == 0


def test_one_message_split_at_every_byte_boundary() -> None:
    frames = [b"header-frame", b"", b"payload" * 5, b"tail"]
    data = wire_bytes(frames)
    for cut in range(len(data) + 1):
        decoder = FrameDecoder()
        decoder.feed(data[:cut])
        first = decode_all(decoder)
        decoder.feed(data[cut:])
        assert first + decode_all(decoder) == [frames], cut
        assert first == ([] if cut < len(data) else [frames])


def test_message_fed_one_byte_at_a_time() -> None:
    frames = [b"a" * 30, b"b" * 7]
    decoder = FrameDecoder()
    data = wire_bytes(frames) * 3
    received = []
    for index in range(len(data)):
        decoder.feed(data[index : index + 1])
        received.extend(decode_all(decoder))
    assert received == [frames] * 3


def test_many_messages_in_one_feed() -> None:
    messages = [[f"message {i}".encode(), bytes([i % 256]) * (i % 7)] for i in range(2000)]
    messages += [[b"single %d" % i] for i in range(2000)]
    decoder = FrameDecoder()
    decoder.feed(b"".join(wire_bytes(frames) for frames in messages))
    assert decode_all(decoder) == messages
    assert decoder.buffered_bytes == 0


@pytest.mark.parametrize("frames_in_prefix", [0, 1, 2, 3])
def test_frames_after_a_short_prefix_are_read_raw(frames_in_prefix: int) -> None:
    frames = [b"msgpack", b"sub-header", b"B" * 5000]
    data = prefix_message(frames, frames_in_prefix) + wire_bytes([b"next"])
    for cut in (1, 9, 20, len(data) - 5):
        decoder = FrameDecoder()
        decoder.feed(data[:cut])
        received = decode_all(decoder)
        decoder.feed(data[cut:])
        assert received + decode_all(decoder) == [frames, [b"next"]]


def test_distributed_writer_that_ends_the_prefix_before_buffers_is_understood() -> None:
    # The real writer keeps large non-bytes buffers (numpy data) out of the prefix.
    frames = [
        b"m" * 10,
        b"h" * 300,
        memoryview(bytearray(b"\x01" * 200_000)),
        memoryview(bytearray(b"\x02" * 100_000)),
    ]
    buffers, _, _ = _add_frames_header(list(frames))
    data = b"".join(bytes(buffer) for buffer in buffers)
    (prefix_nbytes,) = struct.unpack_from("<Q", data)
    assert prefix_nbytes < len(data) - 8, "expected a split message"
    decoder = FrameDecoder()
    for start in range(0, len(data), 65536):
        decoder.feed(data[start : start + 65536])
    assert decode_all(decoder) == [[bytes(frame) for frame in frames]]


def test_our_encoding_is_understood_by_distributed_reader() -> None:
    frames = [b"one", b"", b"three" * 100]
    data = wire_bytes(frames)
    (prefix_nbytes,) = struct.unpack_from("<Q", data)
    decoded, missing = unpack_frames(data[8 : 8 + prefix_nbytes], partial=True)
    assert [bytes(frame) for frame in decoded] == frames
    assert missing == []


def test_large_frames_that_fill_a_chunk_are_zero_copy_views() -> None:
    decoder = FrameDecoder()
    chunk = wire_bytes([b"x" * 10_000])
    decoder.feed(chunk)
    message = decoder.next_message()
    assert message is not None
    (frame,) = message
    assert isinstance(frame, memoryview)
    assert frame.obj is chunk


# -- rejection ------------------------------------------------------------------------------


def expect_rejection(data: bytes, match: str, **limits: int) -> FrameDecoder:
    decoder = FrameDecoder(**limits)
    decoder.feed(data)
    with pytest.raises(RemoteProtocolError, match=match):
        decode_all(decoder)
    return decoder


def test_prefix_too_short_for_the_frame_count() -> None:
    expect_rejection(struct.pack("<Q", 4) + b"\0" * 8, "cannot hold the frame count")


def test_prefix_too_short_for_the_lengths() -> None:
    expect_rejection(struct.pack("<QQ", 16, 3) + b"\0" * 32, "too short for 3 frame lengths")


def test_too_many_frames_rejected_before_the_prefix_arrives() -> None:
    expect_rejection(struct.pack("<QQ", 8 + 8 * 50, 50), "more than the limit", max_frames=10)


def test_absurd_frame_count_rejected() -> None:
    expect_rejection(struct.pack("<QQ", 2**30, 2**62), "more than the limit")


def test_absurd_prefix_length_rejected_immediately() -> None:
    expect_rejection(struct.pack("<Q", 2**63), "exceeds the limit")


def test_frame_lengths_beyond_the_limit_rejected() -> None:
    header = struct.pack("<QQQ", 16, 1, 2**40)
    expect_rejection(header, "exceeds the limit")
    header = struct.pack("<QQQQ", 24, 2, 600, 600)
    expect_rejection(header, "exceeds the limit", max_message_bytes=1000)


def test_prefix_ending_inside_a_frame_rejected() -> None:
    data = struct.pack("<QQQQ", 8 + 16 + 5, 2, 10, 10) + b"a" * 20
    expect_rejection(data, "ends inside frame 0")


def test_prefix_longer_than_header_and_frames_rejected() -> None:
    data = struct.pack("<QQQ", 16 + 3 + 4, 1, 3) + b"abc" + b"junk"
    expect_rejection(data, "beyond its frames")


def test_decoder_stays_failed_and_drops_its_buffer() -> None:
    decoder = expect_rejection(struct.pack("<Q", 2) + b"x" * 100, "frame count")
    assert decoder.failed
    assert decoder.buffered_bytes == 0
    decoder.feed(wire_bytes([b"valid"]))
    with pytest.raises(RemoteProtocolError):
        decoder.next_message()


def test_claimed_sizes_are_not_allocated_before_the_bytes_arrive() -> None:
    claimed = 2**31 - 64
    header = struct.pack("<QQQ", claimed, 1, claimed - 16)
    decoder = FrameDecoder()
    tracemalloc.start()
    try:
        decoder.feed(header)
        for _ in range(100):
            decoder.feed(b"\0" * 100)
            assert decoder.next_message() is None
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1_000_000
    assert decoder.buffered_bytes == 16 + 10_000  # n and len_0 are not consumed yet


# -- properties -----------------------------------------------------------------------------

frame_lists = st.lists(st.binary(max_size=300), max_size=8)


@BOUNDED
@given(
    messages=st.lists(frame_lists, min_size=1, max_size=5),
    cuts=st.lists(st.integers(min_value=0, max_value=5000), max_size=10),
)
def test_random_messages_survive_random_chunking(
    messages: list[list[bytes]], cuts: list[int]
) -> None:
    data = b"".join(wire_bytes(frames) for frames in messages)
    decoder = FrameDecoder()
    received: list[list[bytes]] = []
    previous = 0
    for cut in [*sorted(cut % (len(data) + 1) for cut in cuts), len(data)]:
        decoder.feed(data[previous:cut])
        received.extend(decode_all(decoder))
        previous = cut
    assert received == messages


@BOUNDED
@given(messages=st.lists(frame_lists, min_size=1, max_size=3), data=st.data())
def test_truncated_input_returns_none(messages: list[list[bytes]], data: st.DataObject) -> None:
    encoded = b"".join(wire_bytes(frames) for frames in messages)
    length = data.draw(st.integers(min_value=0, max_value=len(encoded) - 1))
    decoder = FrameDecoder()
    decoder.feed(encoded[:length])
    complete = decode_all(decoder)
    assert complete == messages[: len(complete)]
    assert len(complete) < len(messages)
    assert decoder.next_message() is None


@BOUNDED
@given(
    garbage=st.one_of(
        st.binary(max_size=2000),
        # Plausible-looking headers with hostile numbers, followed by junk.
        st.builds(
            lambda numbers, tail: struct.pack(f"<{len(numbers)}Q", *numbers) + tail,
            st.lists(
                st.one_of(st.integers(0, 64), st.integers(0, 2**64 - 1)),
                min_size=1,
                max_size=6,
            ),
            st.binary(max_size=200),
        ),
    ),
    chunk_size=st.integers(min_value=1, max_value=300),
)
def test_garbage_only_raises_remote_protocol_error(garbage: bytes, chunk_size: int) -> None:
    decoder = FrameDecoder(max_message_bytes=1 << 20, max_frames=1000)
    calls = 0
    try:
        for start in range(0, len(garbage), chunk_size):
            decoder.feed(garbage[start : start + chunk_size])
            while decoder.next_message() is not None:
                calls += 1
                # Every message consumes at least its 8-byte length: no endless loop.
                assert calls <= len(garbage) // 8
    except RemoteProtocolError:
        assert decoder.failed
    assert decoder.buffered_bytes <= len(garbage)
