from __future__ import annotations

import datetime as dt
import socket
from decimal import Decimal

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from speed_gevent.errors import ProtocolError
from speed_gevent.protocol import (
    HEADER,
    HEADER_SIZE,
    MAGIC,
    MAX_BODY_SIZE,
    MAX_WORKER_META_SIZE,
    VERSION,
    BootErrorFrame,
    ExitedFrame,
    ExitRequestFrame,
    FrameDecoder,
    FrameType,
    MessageFrame,
    Outcome,
    ReadyFrame,
    ResultFrame,
    ServerReadyFrame,
    SpawnedFrame,
    SpawnFrame,
    StatsFrame,
    StopFrame,
    decode,
    encode,
    encode_meta,
)

# Every value type py-amqp decodes from an AMQP field table.
AMQP_HEADERS = {
    "S-long-string": "héllo",
    "x-bytes": b"\x00\xff raw",
    "b-int8": -5,
    "I-int32": 2**31 - 1,
    "l-int64": -(2**63),
    "d-double": 3.25,
    "D-decimal": Decimal("12.345"),
    "t-bool": True,
    "T-timestamp": dt.datetime(2026, 11, 27, 6, 0, 1),
    "V-void": None,
    "A-array": [1, "two", b"three", [4.5, None], {"k": False}],
    "F-table": {"nested": {"deeper": Decimal("-1E+3")}},
}

FRAMES = [
    MessageFrame(
        7,
        {
            "queue": "q",
            "exchange": "",
            "routing_key": "q",
            "redelivered": False,
            "attempt": 1,
            "properties": {
                "application_headers": AMQP_HEADERS,
                "content_type": "application/json",
                "timestamp": dt.datetime(2026, 1, 1),
            },
        },
        b"\x00body bytes\xff",
    ),
    MessageFrame(8, {}, b""),
    ResultFrame(7, Outcome.OK),
    ResultFrame(9, Outcome.ERROR, "ValueError", "bad", "Traceback...", None),
    ResultFrame(9, Outcome.RETRY, "Retry", "", "", 2.5),
    ReadyFrame(1234),
    StatsFrame(1, 2, 3),
    ExitRequestFrame("TERM received"),
    StopFrame(),
    SpawnFrame(3),
    SpawnedFrame(3, 999),
    ExitedFrame(999, 256),
    BootErrorFrame("TARGET 'x:y': cannot import"),
    ServerReadyFrame(1),
]


@pytest.mark.parametrize("frame", FRAMES, ids=lambda f: type(f).__name__)
def test_every_frame_round_trips(frame):
    assert decode(encode(frame)) == frame
    assert FrameDecoder().feed(encode(frame)) == [frame]


def test_amqp_field_types_keep_their_types():
    frame = FRAMES[0]
    headers = decode(encode(frame)).meta["properties"]["application_headers"]
    for key, value in AMQP_HEADERS.items():
        assert headers[key] == value and type(headers[key]) is type(value), key


def test_body_is_passed_through_untouched():
    body = bytes(range(256)) * 100
    assert decode(encode(MessageFrame(1, {}, body))).body == body


def test_decoder_accepts_a_stream_byte_by_byte():
    stream = b"".join(encode(frame) for frame in FRAMES)
    decoder = FrameDecoder()
    out = []
    for i in range(len(stream)):
        out += decoder.feed(stream[i : i + 1])
    assert out == FRAMES
    assert decoder.pending == 0


def test_decoder_returns_several_frames_from_one_chunk():
    assert FrameDecoder().feed(encode(ReadyFrame(1)) + encode(StopFrame())) == [ReadyFrame(1), StopFrame()]


def test_truncated_frame_waits_in_the_stream_and_fails_as_a_datagram():
    data = encode(FRAMES[0])
    decoder = FrameDecoder()
    assert decoder.feed(data[:-1]) == []
    assert decoder.pending == len(data) - 1
    with pytest.raises(ProtocolError):
        decode(data[:-1])
    with pytest.raises(ProtocolError):
        decode(data[:5])


@pytest.mark.parametrize(
    "header, why",
    [
        (HEADER.pack(b"XX", VERSION, FrameType.STOP, 0, 0), "magic"),
        (HEADER.pack(MAGIC, 99, FrameType.STOP, 0, 0), "version"),
        (HEADER.pack(MAGIC, VERSION, 77, 0, 0), "type"),
        (HEADER.pack(MAGIC, VERSION, FrameType.MESSAGE, 1, MAX_BODY_SIZE + 1), "oversized"),
    ],
)
def test_bad_headers_are_refused_before_the_payload(header, why):
    with pytest.raises(ProtocolError, match=why):
        FrameDecoder().feed(header)  # no payload has arrived yet


def test_wrong_field_types_are_refused():
    import msgpack

    meta = msgpack.packb(["not an int"])
    with pytest.raises(ProtocolError):
        decode(HEADER.pack(MAGIC, VERSION, FrameType.READY, len(meta), 0) + meta)


def test_unexpected_body_is_refused():
    meta = encode(ReadyFrame(1))[HEADER_SIZE:]
    with pytest.raises(ProtocolError):
        decode(HEADER.pack(MAGIC, VERSION, FrameType.READY, len(meta), 1) + meta + b"x")


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_garbage_raises_only_protocol_error(data):
    try:
        FrameDecoder().feed(data)
    except ProtocolError:
        pass
    try:
        decode(data)
    except ProtocolError:
        pass


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=64), st.integers(min_value=0, max_value=60))
def test_corrupted_valid_frames_raise_only_protocol_error(noise, position):
    data = bytearray(encode(FRAMES[0]))
    data[HEADER_SIZE + position : HEADER_SIZE + position + len(noise)] = noise
    try:
        FrameDecoder().feed(bytes(data))
    except ProtocolError:
        pass


@settings(max_examples=100, deadline=None)
@given(
    st.dictionaries(
        st.text(max_size=10),
        st.one_of(
            st.none(),
            st.booleans(),
            st.integers(-(2**63), 2**63 - 1),
            st.floats(allow_nan=False),
            st.text(max_size=20),
            st.binary(max_size=20),
            st.decimals(allow_nan=False, allow_infinity=False, places=3),
            st.datetimes(),
            st.lists(st.integers(-(2**63), 2**63 - 1), max_size=3),
        ),
        max_size=8,
    ),
    st.binary(max_size=500),
)
def test_message_frames_round_trip(headers, body):
    frame = MessageFrame(1, {"properties": {"application_headers": headers}}, body)
    assert decode(encode(frame)) == frame


def test_frames_cross_a_real_socketpair():
    left, right = socket.socketpair()
    with left, right:
        for frame in FRAMES:
            left.sendall(encode(frame))
        decoder, out = FrameDecoder(), []
        while len(out) < len(FRAMES):
            out += decoder.feed(right.recv(7))
    assert out == FRAMES


def test_a_result_with_an_unknown_outcome_is_refused():
    """It would decode, but nothing downstream knows what it means: end that worker."""
    meta = encode_meta([7, 99, "", "", "", None, 0.0, 0.0])
    with pytest.raises(ProtocolError, match="unknown outcome"):
        FrameDecoder().feed(HEADER.pack(b"SG", 1, FrameType.RESULT, len(meta), 0) + meta)


def test_frames_from_workers_are_capped_at_what_a_result_can_be():
    worker_side = FrameDecoder(max_meta=MAX_WORKER_META_SIZE, max_body=0)
    with pytest.raises(ProtocolError, match="oversized"):
        worker_side.feed(HEADER.pack(b"SG", 1, FrameType.RESULT, MAX_WORKER_META_SIZE + 1, 0))
    with pytest.raises(ProtocolError, match="oversized"):
        FrameDecoder(max_meta=MAX_WORKER_META_SIZE, max_body=0).feed(
            HEADER.pack(b"SG", 1, FrameType.RESULT, 10, 1)
        )
    biggest = ResultFrame(1, Outcome.ERROR, "E" * 200, "m" * 2000, "t" * 2000)
    assert FrameDecoder(max_meta=MAX_WORKER_META_SIZE, max_body=0).feed(encode(biggest)) == [biggest]
