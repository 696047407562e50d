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
"""

from __future__ import annotations

import struct

FRAME_HEADER = struct.Struct(">BHI")
FRAME_END = 0xCE

Frame = tuple[int, int, bytes]


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
