"""Dask TCP framing: a byte stream <-> a sequence of messages, each a list of frames.

Theory of operation
-------------------
On the wire (protocol.md §1.2) every message is::

    u64 L                          # byte count of the "nosplit" prefix that follows
      u64 n                        # number of frames
      u64 len_0 ... len_{n-1}      # length of every frame
      frame_0 ... frame_{k-1}      # the first k frames, exactly filling the L bytes
    frame_k ... frame_{n-1}        # the remaining frames, raw and back to back

All integers are little-endian unsigned 64-bit (the reference implementation uses native
``struct`` order, which is little-endian on every platform Dask runs on).

``FrameDecoder`` is a sans-I/O state machine in the h11 style: ``feed()`` bytes in as they
arrive, then call ``next_message()`` until it returns ``None`` (more bytes needed). It has
three states, kept in two fields:

* waiting for the 8-byte ``L``            (``_prefix_nbytes < 0``),
* waiting for the ``L`` prefix bytes      (``_prefix_nbytes >= 0`` and ``_frames is None``),
* waiting for the frames after the prefix (``_frames is not None``).

Received bytes stay in a deque of the immutable chunks ``feed()`` was given; a read takes
bytes off the front only once all of them are present, so a length prefix never makes us
allocate memory the peer has not actually sent (a hostile ``L`` costs nothing until its
bytes arrive, and anything above ``max_message_bytes`` is rejected at once). Taking bytes
from one chunk copies just that slice, so many small messages in one ``feed()`` cost
O(total bytes), never a re-copy of the remaining buffer per message. Large slices are
returned as zero-copy ``memoryview``s of their chunk when they make up at least half of it
(so a view never pins much more memory than it exposes).

Any violation raises ``RemoteProtocolError`` and leaves the decoder permanently failed:
after a framing error the stream position is unknown, so the only safe move is to drop
the connection.

``encode_frames`` is the writer: it puts every frame inside the prefix (``k = n``), which
every reader accepts, and returns buffers for ``transport.writelines`` without copying the
frames.
"""

from __future__ import annotations

import struct
from collections import deque
from collections.abc import Sequence

from dsched.wire.errors import RemoteProtocolError

__all__ = ["DEFAULT_MAX_FRAMES", "DEFAULT_MAX_MESSAGE_BYTES", "FrameDecoder", "encode_frames"]

Frame = bytes | memoryview

DEFAULT_MAX_MESSAGE_BYTES = 2**31
DEFAULT_MAX_FRAMES = 1_000_000

_U64 = struct.Struct("<Q")
_ONE_FRAME_HEADER = struct.Struct("<QQQ")  # L, n=1, len_0: the shape of nearly every message
_EMPTY = b""


def _nbytes(frame: Frame) -> int:
    # len() of a memoryview counts items, not bytes, when its format is not "B".
    return frame.nbytes if isinstance(frame, memoryview) else len(frame)


def encode_frames(frames: Sequence[Frame]) -> list[Frame]:
    """Return the buffers that put one message (these frames) on the wire.

    The first buffer is the freshly packed header (``L``, ``n``, lengths); the frames
    follow unchanged, so large payloads are not copied here.
    """
    if len(frames) == 1:
        (frame,) = frames
        length = _nbytes(frame)
        return [_ONE_FRAME_HEADER.pack(16 + length, 1, length), frame]
    lengths = [_nbytes(frame) for frame in frames]
    n = len(lengths)
    header = struct.pack(f"<QQ{n}Q", 8 + 8 * n + sum(lengths), n, *lengths)
    return [header, *frames]


class FrameDecoder:
    """Incremental decoder of framed messages (see the module docstring)."""

    __slots__ = (
        "_buffered",
        "_chunks",
        "_error",
        "_frames",
        "_head_offset",
        "_max_frames",
        "_max_message_bytes",
        "_missing_lengths",
        "_prefix_nbytes",
    )

    def __init__(
        self,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        max_frames: int = DEFAULT_MAX_FRAMES,
    ) -> None:
        if max_message_bytes < 16 or max_frames < 1:
            raise ValueError("max_message_bytes must be >= 16 and max_frames >= 1")
        self._max_message_bytes = max_message_bytes
        self._max_frames = max_frames
        self._chunks: deque[bytes] = deque()
        self._head_offset = 0  # bytes of _chunks[0] already consumed
        self._buffered = 0  # unconsumed bytes across all chunks
        self._prefix_nbytes = -1
        self._frames: list[Frame] | None = None
        self._missing_lengths: deque[int] = deque()
        self._error: RemoteProtocolError | None = None

    @property
    def buffered_bytes(self) -> int:
        """Bytes received but not yet returned as part of a complete message."""
        return self._buffered

    @property
    def failed(self) -> bool:
        """True once the input was rejected; the decoder then only re-raises that error."""
        return self._error is not None

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        """Append received bytes. Never raises for bad content: ``next_message`` does."""
        if self._error is not None or not data:
            return
        if type(data) is not bytes:
            # Chunks must be immutable: returned frames may be views into them.
            data = bytes(data)
        self._chunks.append(data)
        self._buffered += len(data)

    def next_message(self) -> list[Frame] | None:
        """Return the frames of the next complete message, or None if more bytes are needed.

        Raises ``RemoteProtocolError`` if the input is not valid framing, and keeps raising
        it on every later call.
        """
        if self._error is not None:
            raise self._error
        try:
            return self._advance()
        except RemoteProtocolError as error:
            self._fail(error)
            raise

    # -- state machine --------------------------------------------------------------

    def _advance(self) -> list[Frame] | None:
        if self._prefix_nbytes < 0:
            if self._buffered >= 24:
                fast = self._single_frame_message()
                if fast is not None:
                    return fast
            if self._buffered < 8:
                return None
            prefix_nbytes = self._peek_u64(0)
            if prefix_nbytes < 8:
                raise RemoteProtocolError(
                    f"frame prefix length {prefix_nbytes} cannot hold the frame count"
                )
            if prefix_nbytes > self._max_message_bytes:
                raise RemoteProtocolError(
                    f"frame prefix of {prefix_nbytes} bytes exceeds the limit of "
                    f"{self._max_message_bytes} bytes"
                )
            self._skip(8)
            self._prefix_nbytes = prefix_nbytes

        if self._frames is None:
            prefix_nbytes = self._prefix_nbytes
            if self._buffered >= 8:
                # Reject an absurd frame count as soon as it is visible rather than after
                # buffering the whole (possibly huge) prefix it claims.
                self._check_frame_count(self._peek_u64(0), prefix_nbytes)
            if self._buffered < prefix_nbytes:
                return None
            self._parse_prefix(self._take(prefix_nbytes), prefix_nbytes)

        frames = self._frames
        assert frames is not None
        missing = self._missing_lengths
        while missing:
            length = missing[0]
            if self._buffered < length:
                return None
            frames.append(self._take(length))
            missing.popleft()

        self._frames = None
        self._prefix_nbytes = -1
        return frames

    def _single_frame_message(self) -> list[Frame] | None:
        """Fast path for the common shape: one frame, wholly inside the first chunk.

        Returns None (touching nothing) when the message has another shape; the general
        path then handles it, including all error reporting.
        """
        head = self._chunks[0]
        start = self._head_offset
        if start + 24 > len(head):
            return None
        prefix_nbytes, n, length = _ONE_FRAME_HEADER.unpack_from(head, start)
        end = start + 24 + length
        if (
            n != 1
            or prefix_nbytes != 16 + length
            or end > len(head)
            or prefix_nbytes > self._max_message_bytes
        ):
            return None
        self._buffered -= 24 + length
        if end == len(head):
            self._chunks.popleft()
            self._head_offset = 0
        else:
            self._head_offset = end
        if 2 * length >= len(head):
            return [memoryview(head)[start + 24 : end]]
        return [head[start + 24 : end]]

    def _check_frame_count(self, n: int, prefix_nbytes: int) -> None:
        if n > self._max_frames:
            raise RemoteProtocolError(
                f"message claims {n} frames, more than the limit of {self._max_frames}"
            )
        if 8 + 8 * n > prefix_nbytes:
            raise RemoteProtocolError(
                f"frame prefix of {prefix_nbytes} bytes is too short for {n} frame lengths"
            )

    def _parse_prefix(self, prefix: Frame, prefix_nbytes: int) -> None:
        (n,) = _U64.unpack_from(prefix, 0)
        self._check_frame_count(n, prefix_nbytes)
        lengths = struct.unpack_from(f"<{n}Q", prefix, 8)
        header_nbytes = 8 + 8 * n
        if header_nbytes + sum(lengths) > self._max_message_bytes:
            raise RemoteProtocolError(
                f"message of {n} frames totalling {sum(lengths)} bytes exceeds the limit "
                f"of {self._max_message_bytes} bytes"
            )
        view = memoryview(prefix)
        frames: list[Frame] = []
        position = header_nbytes
        for index, length in enumerate(lengths):
            if position == prefix_nbytes:
                # The prefix ends on this frame boundary: the rest follow it, raw.
                self._missing_lengths.extend(lengths[index:])
                break
            end = position + length
            if end > prefix_nbytes:
                raise RemoteProtocolError(
                    f"frame prefix of {prefix_nbytes} bytes ends inside frame {index}"
                )
            frames.append(view[position:end])
            position = end
        else:
            if position != prefix_nbytes:
                raise RemoteProtocolError(
                    f"frame prefix of {prefix_nbytes} bytes has {prefix_nbytes - position} "
                    "bytes beyond its frames"
                )
        self._frames = frames

    def _fail(self, error: RemoteProtocolError) -> None:
        self._error = error
        # Drop everything buffered: nothing after a framing error can be trusted.
        self._chunks.clear()
        self._buffered = 0
        self._head_offset = 0
        self._frames = None
        self._missing_lengths.clear()

    # -- byte buffer ----------------------------------------------------------------

    def _peek_u64(self, offset: int) -> int:
        """Read a u64 at ``offset`` past the read position without consuming it."""
        head = self._chunks[0]
        start = self._head_offset + offset
        if start + 8 <= len(head):
            return int(_U64.unpack_from(head, start)[0])
        # Straddles chunks (rare): assemble just the bytes needed, not the whole buffer.
        needed = start + 8
        parts: list[bytes] = []
        for chunk in self._chunks:
            parts.append(chunk)
            needed -= len(chunk)
            if needed <= 0:
                break
        return int(_U64.unpack_from(b"".join(parts), start)[0])

    def _skip(self, nbytes: int) -> None:
        """Consume ``nbytes`` (all buffered) without materialising them."""
        self._buffered -= nbytes
        chunks = self._chunks
        while nbytes:
            available = len(chunks[0]) - self._head_offset
            if nbytes < available:
                self._head_offset += nbytes
                return
            nbytes -= available
            chunks.popleft()
            self._head_offset = 0

    def _take(self, nbytes: int) -> Frame:
        """Consume and return the next ``nbytes`` (the caller checked they are buffered)."""
        if nbytes == 0:
            return _EMPTY
        chunks = self._chunks
        head = chunks[0]
        start = self._head_offset
        end = start + nbytes
        self._buffered -= nbytes
        if end <= len(head):
            if end == len(head):
                chunks.popleft()
                self._head_offset = 0
                if start == 0:
                    return head  # the whole chunk: no copy at all
            else:
                self._head_offset = end
            if 2 * nbytes >= len(head):
                return memoryview(head)[start:end]
            return head[start:end]
        # Spans several chunks: one copy into a buffer of exactly the message's size.
        parts: list[Frame] = [memoryview(head)[start:]]
        remaining = nbytes - (len(head) - start)
        chunks.popleft()
        while remaining and remaining >= len(chunks[0]):
            chunk = chunks.popleft()
            parts.append(chunk)
            remaining -= len(chunk)
        if remaining:
            parts.append(memoryview(chunks[0])[:remaining])
        self._head_offset = remaining
        return b"".join(parts)
