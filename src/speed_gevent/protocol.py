"""Frames between the master, the fork server and workers: a sans-IO codec.

Every frame is a fixed header, a msgpack-encoded metadata part and a raw body part::

     0      2   3   4           8           12
     +------+---+---+-----------+-----------+---------- ... -+------ ... -+
     | "SG" | v | t | meta_len  | body_len  | meta (msgpack)  | body      |
     +------+---+---+-----------+-----------+---------- ... -+------ ... -+
       magic ver type  uint32 BE   uint32 BE

The header is checked (magic, version, type, both lengths against their caps) before
any payload is read, so a corrupt peer is caught at once. Message bodies travel as they
came from the broker: never decoded, pickled or re-encoded. Metadata keeps every AMQP
field type: msgpack distinguishes str from bytes, and extension types carry datetime and
Decimal. Nothing here is pickled. Used by the gevent master and the blocking worker alike.
"""

from __future__ import annotations

import datetime as dt
import struct
from dataclasses import dataclass, field, fields
from decimal import Decimal
from enum import IntEnum
from typing import Any, ClassVar

import msgpack

from .errors import ProtocolError

MAGIC = b"SG"
VERSION = 1
HEADER = struct.Struct("!2sBBII")
HEADER_SIZE = HEADER.size

#: Largest metadata part, in bytes (headers and properties of one message).
MAX_META_SIZE = 64 * 2**20
#: Largest body, in bytes: RabbitMQ's own hard ceiling for a message.
MAX_BODY_SIZE = 512 * 2**20
#: Largest metadata part of a frame from a worker (a result carries at most an error type,
#: a message and a traceback of a few thousand characters); worker frames carry no body.
MAX_WORKER_META_SIZE = 64 * 2**10

_EXT_DATETIME = 1
_EXT_DECIMAL = 2


class FrameType(IntEnum):
    MESSAGE = 1
    RESULT = 2
    READY = 3
    STATS = 4
    EXIT_REQUEST = 5
    STOP = 6
    RESULT_OK = 7
    # fork server control channel
    SPAWN = 10
    SPAWNED = 11
    EXITED = 12
    BOOT_ERROR = 13
    SERVER_READY = 14


class Outcome(IntEnum):
    """What the handler did with a message."""

    OK = 0
    ERROR = 1  #: raised an exception
    REJECT = 2  #: raised Reject: dead-letter now
    RETRY = 3  #: raised Retry


@dataclass(frozen=True)
class Frame:
    TYPE: ClassVar[FrameType]

    def to_meta(self) -> Any:
        return [getattr(self, f.name) for f in fields(self) if f.name != "body"]

    @property
    def payload_body(self) -> bytes:
        return b""


@dataclass(frozen=True)
class MessageFrame(Frame):
    """A delivery for the worker: our id, the body untouched, and what the handler sees."""

    TYPE: ClassVar[FrameType] = FrameType.MESSAGE
    id: int
    meta: dict[str, Any]
    body: bytes = b""

    @property
    def payload_body(self) -> bytes:
        return self.body


@dataclass(frozen=True)
class ResultFrame(Frame):
    TYPE: ClassVar[FrameType] = FrameType.RESULT
    id: int
    outcome: int
    error_type: str = ""
    error_message: str = ""
    traceback: str = ""
    retry_delay: float | None = None
    started_at: float = 0.0  #: monotonic clock, as in OkFrame
    finished_at: float = 0.0


@dataclass(frozen=True, slots=True)
class OkFrame(Frame):
    """The handler returned: the hot path's result, a fixed struct (no msgpack), with the
    handler's start and end on the system-wide monotonic clock (`time.monotonic()`)."""

    TYPE: ClassVar[FrameType] = FrameType.RESULT_OK
    id: int
    started_at: float
    finished_at: float

    def to_meta(self) -> Any:
        return OK_STRUCT.pack(self.id, self.started_at, self.finished_at)


#: id, started_at, finished_at of an OkFrame.
OK_STRUCT = struct.Struct("!Qdd")


def encode_ok(delivery_id: int, started_at: float, finished_at: float) -> bytes:
    """An OkFrame's bytes, without building the frame object."""
    return _OK_HEAD + OK_STRUCT.pack(delivery_id, started_at, finished_at)


@dataclass(frozen=True)
class ReadyFrame(Frame):
    TYPE: ClassVar[FrameType] = FrameType.READY
    pid: int


@dataclass(frozen=True)
class StatsFrame(Frame):
    TYPE: ClassVar[FrameType] = FrameType.STATS
    pid: int
    rss_bytes: int
    handled: int


@dataclass(frozen=True)
class ExitRequestFrame(Frame):
    """The worker asks to leave (TERM received, recycle); the master answers with StopFrame."""

    TYPE: ClassVar[FrameType] = FrameType.EXIT_REQUEST
    reason: str


@dataclass(frozen=True)
class StopFrame(Frame):
    TYPE: ClassVar[FrameType] = FrameType.STOP


@dataclass(frozen=True)
class SpawnFrame(Frame):
    """Master → fork server: fork worker `worker_id`; its socket end travels as SCM_RIGHTS."""

    TYPE: ClassVar[FrameType] = FrameType.SPAWN
    worker_id: int


@dataclass(frozen=True)
class SpawnedFrame(Frame):
    TYPE: ClassVar[FrameType] = FrameType.SPAWNED
    worker_id: int
    pid: int


@dataclass(frozen=True)
class ExitedFrame(Frame):
    """A worker was reaped; `status` is the raw `waitpid` status."""

    TYPE: ClassVar[FrameType] = FrameType.EXITED
    pid: int
    status: int


@dataclass(frozen=True)
class BootErrorFrame(Frame):
    TYPE: ClassVar[FrameType] = FrameType.BOOT_ERROR
    message: str


@dataclass(frozen=True)
class ServerReadyFrame(Frame):
    TYPE: ClassVar[FrameType] = FrameType.SERVER_READY
    pid: int


@dataclass(frozen=True)
class _Shape:
    cls: type[Frame]
    types: tuple[tuple[type, ...], ...] = field(default=())


_OUTCOMES = frozenset(int(outcome) for outcome in Outcome)
_INT = (int,)
_STR = (str,)
_SHAPES: dict[int, _Shape] = {
    FrameType.MESSAGE: _Shape(MessageFrame, (_INT, (dict,))),
    FrameType.RESULT: _Shape(
        ResultFrame, (_INT, _INT, _STR, _STR, _STR, (float, int, type(None)), (float, int), (float, int))
    ),
    FrameType.RESULT_OK: _Shape(OkFrame, ()),
    FrameType.READY: _Shape(ReadyFrame, (_INT,)),
    FrameType.STATS: _Shape(StatsFrame, (_INT, _INT, _INT)),
    FrameType.EXIT_REQUEST: _Shape(ExitRequestFrame, (_STR,)),
    FrameType.STOP: _Shape(StopFrame, ()),
    FrameType.SPAWN: _Shape(SpawnFrame, (_INT,)),
    FrameType.SPAWNED: _Shape(SpawnedFrame, (_INT, _INT)),
    FrameType.EXITED: _Shape(ExitedFrame, (_INT, _INT)),
    FrameType.BOOT_ERROR: _Shape(BootErrorFrame, (_STR,)),
    FrameType.SERVER_READY: _Shape(ServerReadyFrame, (_INT,)),
}


_OK_HEAD = HEADER.pack(MAGIC, VERSION, FrameType.RESULT_OK, OK_STRUCT.size, 0)


def _ext_default(value: Any) -> Any:
    if isinstance(value, dt.datetime):
        return msgpack.ExtType(_EXT_DATETIME, value.isoformat().encode())
    if isinstance(value, Decimal):
        return msgpack.ExtType(_EXT_DECIMAL, str(value).encode())
    if isinstance(value, bytearray | memoryview):
        return bytes(value)
    if isinstance(value, tuple):
        return list(value)
    raise TypeError(f"cannot encode {type(value).__name__} in a frame")


def _ext_hook(code: int, data: bytes) -> Any:
    try:
        if code == _EXT_DATETIME:
            return dt.datetime.fromisoformat(data.decode())
        if code == _EXT_DECIMAL:
            return Decimal(data.decode())
    except (ValueError, ArithmeticError) as exc:
        raise ProtocolError(f"bad extension value of type {code}: {exc}") from None
    raise ProtocolError(f"unknown extension type {code}")


def encode_meta(value: Any) -> bytes:
    packed: bytes = msgpack.packb(value, default=_ext_default, use_bin_type=True)
    return packed


def encode_parts(frame: Frame, meta: bytes | None = None) -> tuple[bytes, bytes]:
    """Header plus metadata, and the body, so a large body can be written without a copy.

    `meta` may carry the frame's metadata already encoded (the master encodes it once).
    """
    if meta is None:
        raw = frame.to_meta()
        meta = raw if isinstance(raw, bytes) else encode_meta(raw)
    body = frame.payload_body
    if len(meta) > MAX_META_SIZE or len(body) > MAX_BODY_SIZE:
        raise ProtocolError(f"frame too large: meta {len(meta)} bytes, body {len(body)} bytes")
    return HEADER.pack(MAGIC, VERSION, frame.TYPE, len(meta), len(body)) + meta, body


def encode(frame: Frame) -> bytes:
    head, body = encode_parts(frame)
    return head + body if body else head


def _check_header(
    data: bytes | bytearray | memoryview,
    offset: int = 0,
    max_meta: int = MAX_META_SIZE,
    max_body: int = MAX_BODY_SIZE,
) -> tuple[int, int, int]:
    magic, version, frame_type, meta_len, body_len = HEADER.unpack_from(data, offset)
    if magic != MAGIC:
        raise ProtocolError(f"bad magic {bytes(magic)!r}")
    if version != VERSION:
        raise ProtocolError(f"unsupported protocol version {version}")
    if frame_type not in _SHAPES:
        raise ProtocolError(f"unknown frame type {frame_type}")
    if meta_len > max_meta or body_len > max_body:
        raise ProtocolError(f"oversized frame: meta {meta_len} bytes, body {body_len} bytes")
    return frame_type, meta_len, body_len


def _build(frame_type: int, meta: bytes | memoryview, body: bytes) -> Frame:
    if frame_type == FrameType.RESULT_OK:
        if len(meta) != OK_STRUCT.size or body:
            raise ProtocolError(f"corrupt OkFrame: {len(meta)} metadata bytes, {len(body)} body bytes")
        return OkFrame(*OK_STRUCT.unpack(meta))
    shape = _SHAPES[frame_type]
    try:
        values = msgpack.unpackb(meta, ext_hook=_ext_hook, raw=False, strict_map_key=False)
    except ProtocolError:
        raise
    except Exception as exc:  # msgpack raises a variety of ValueError/TypeError subclasses
        raise ProtocolError(f"corrupt {shape.cls.__name__} metadata: {exc}") from None
    if not isinstance(values, list) or len(values) != len(shape.types):
        raise ProtocolError(f"corrupt {shape.cls.__name__}: wrong field count")
    for value, allowed in zip(values, shape.types, strict=True):
        if not isinstance(value, allowed) or (allowed is _INT and isinstance(value, bool)):
            raise ProtocolError(f"corrupt {shape.cls.__name__}: bad field {value!r}")
    if shape.cls is MessageFrame:
        return MessageFrame(values[0], values[1], body)
    if shape.cls is ResultFrame and values[1] not in _OUTCOMES:
        raise ProtocolError(f"corrupt ResultFrame: unknown outcome {values[1]!r}")
    if body:
        raise ProtocolError(f"{shape.cls.__name__} carries an unexpected body")
    return shape.cls(*values)


def decode(data: bytes) -> Frame:
    """Exactly one frame from `data` (used for datagram-style control messages)."""
    if len(data) < HEADER_SIZE:
        raise ProtocolError(f"truncated frame: {len(data)} bytes")
    frame_type, meta_len, body_len = _check_header(data)
    end = HEADER_SIZE + meta_len + body_len
    if len(data) != end:
        raise ProtocolError(f"frame length mismatch: {len(data)} bytes, header says {end}")
    meta_end = HEADER_SIZE + meta_len
    return _build(frame_type, data[HEADER_SIZE:meta_end], bytes(data[meta_end:end]))


class FrameDecoder:
    """Incremental decoder for a byte stream: `feed(chunk)` returns the complete frames.

    After a ProtocolError the stream is unusable; the caller ends the peer. The master
    reads workers with `max_meta=MAX_WORKER_META_SIZE, max_body=0`: what a worker may send
    is small, so a corrupt length is caught at the header, before anything is buffered.
    """

    def __init__(self, max_meta: int = MAX_META_SIZE, max_body: int = MAX_BODY_SIZE) -> None:
        self._buffer = bytearray()
        self._need: tuple[int, int, int] | None = None
        self._max_meta = max_meta
        self._max_body = max_body

    @property
    def pending(self) -> int:
        """Bytes received that do not form a complete frame yet."""
        return len(self._buffer)

    def feed(self, data: bytes) -> list[Frame]:
        buffer = self._buffer
        buffer += data
        frames: list[Frame] = []
        offset = 0
        view = memoryview(buffer)
        try:
            while True:
                if self._need is None:
                    if len(buffer) - offset < HEADER_SIZE:
                        break
                    self._need = _check_header(buffer, offset, self._max_meta, self._max_body)
                frame_type, meta_len, body_len = self._need
                end = offset + HEADER_SIZE + meta_len + body_len
                if len(buffer) < end:
                    break
                meta_end = offset + HEADER_SIZE + meta_len
                frames.append(
                    _build(frame_type, view[offset + HEADER_SIZE : meta_end], bytes(view[meta_end:end]))
                )
                self._need = None
                offset = end
        finally:
            view.release()
        if offset:
            del buffer[:offset]
        return frames
