"""Split a byte stream from the broker into AMQP frames. Pure.

Every AMQP 0-9-1 frame is::

     0      1         3         7                  size+7     size+8
     +------+---------+---------+   +------------+   +-----------+
     | type | channel |  size   |   |  payload   |   | frame-end |
     +------+---------+---------+   +------------+   +-----------+
      octet   short     long         size octets       0xCE

py-amqp reads each frame with exact-size `recv` calls (header, payload, end: about nine
system calls per delivered message) and, with a zero timeout, retries EAGAIN in a loop
while a frame is split across TCP segments. The consumer greenlet instead reads what the
socket has in one call and hands every complete frame to py-amqp's own frame handler;
a partial frame stays buffered until the socket is readable again.

A basic.deliver whose content frames all arrived in the same read is taken here
(`take_delivery`) instead: py-amqp spends about as long turning those three frames into
its `Message` as the master spends on the rest of the message's way to a worker. Anything
else (a content split across reads, another channel, a return) goes to py-amqp, which
keeps the state of a partial content; nothing here keeps state between reads.
"""

from __future__ import annotations

import struct
from typing import NamedTuple

FRAME_HEADER = struct.Struct(">BHI")
FRAME_END = 0xCE

Frame = tuple[int, int, bytes]

METHOD, HEADER, BODY = 1, 2, 3
#: Class and method id of basic.deliver, as they open its method frame.
DELIVER = struct.pack(">HH", 60, 60)
_TAG_AND_BITS = struct.Struct(">QB")
_CONTENT_HEADER = struct.Struct(">HxxQ")
#: Where the property flags start in a content header frame.
PROPERTIES_OFFSET = 12


class DeliverArgs(NamedTuple):
    consumer_tag: str
    delivery_tag: int
    redelivered: bool
    exchange: str
    routing_key: str


class TakenDelivery(NamedTuple):
    args: DeliverArgs
    header: bytes  #: the content header frame's payload (properties from PROPERTIES_OFFSET)
    body: bytes
    frames: int  #: how many frames it took (the method frame included)


class FrameError(ValueError):
    """The stream is not AMQP: a frame does not end with 0xCE."""


def split_frames(data: bytes) -> tuple[list[Frame], int]:
    """The complete frames at the start of `data` as (type, channel, payload), and the
    offset where the first incomplete frame starts (len(data) if none)."""
    frames: list[Frame] = []
    offset = 0
    end = len(data)
    unpack = FRAME_HEADER.unpack_from
    while end - offset >= 8:
        frame_type, channel, size = unpack(data, offset)
        stop = offset + 7 + size
        if stop >= end:
            break
        if data[stop] != FRAME_END:
            raise FrameError(f"frame at byte {offset} ends with {data[stop]:#04x}, not 0xce")
        frames.append((frame_type, channel, data[offset + 7 : stop]))
        offset = stop + 1
    return frames, offset


def take_delivery(frames: list[Frame], index: int, channel: int) -> TakenDelivery | None:
    """The basic.deliver at `frames[index]` on `channel` with its whole content, if its
    header and every body frame follow it in `frames`; None otherwise (py-amqp takes it)."""
    frame_type, frame_channel, payload = frames[index]
    if frame_type != METHOD or frame_channel != channel or payload[:4] != DELIVER:
        return None
    following = index + 1
    if following >= len(frames) or frames[following][:2] != (HEADER, channel):
        return None
    header = frames[following][2]
    class_id, size = _CONTENT_HEADER.unpack_from(header)
    if class_id != 60:
        return None
    chunks: list[bytes] = []
    got = 0
    following += 1
    while got < size:
        if following >= len(frames) or frames[following][:2] != (BODY, channel):
            return None
        chunk = frames[following][2]
        chunks.append(chunk)
        got += len(chunk)
        following += 1
    if got != size:
        return None  # more body than announced: py-amqp's way of failing is the right one
    body = chunks[0] if len(chunks) == 1 else b"".join(chunks)
    return TakenDelivery(parse_deliver(payload), header, body, following - index)


def parse_deliver(payload: bytes) -> DeliverArgs:
    """basic.deliver's arguments: consumer-tag, delivery-tag, redelivered, exchange,
    routing-key (shortstrs as py-amqp decodes them: UTF-8 with surrogatepass)."""
    offset = 4
    length = payload[offset]
    consumer_tag = payload[offset + 1 : offset + 1 + length].decode("utf-8", "surrogatepass")
    offset += 1 + length
    delivery_tag, bits = _TAG_AND_BITS.unpack_from(payload, offset)
    offset += _TAG_AND_BITS.size
    length = payload[offset]
    exchange = payload[offset + 1 : offset + 1 + length].decode("utf-8", "surrogatepass")
    offset += 1 + length
    length = payload[offset]
    routing_key = payload[offset + 1 : offset + 1 + length].decode("utf-8", "surrogatepass")
    return DeliverArgs(consumer_tag, delivery_tag, bool(bits & 1), exchange, routing_key)
