"""Splitting the broker's byte stream into AMQP frames, and the py-amqp internals the
consumer greenlet's buffered reads rely on (pinned in pyproject.toml)."""

from __future__ import annotations

import inspect
import struct

import pytest
from amqp.serialization import decode_properties_basic
from hypothesis import given
from hypothesis import strategies as st

from speed_gevent.amqpframes import (
    DELIVER,
    FRAME_END,
    FRAME_HEADER,
    PROPERTIES_OFFSET,
    FrameError,
    split_frames,
    take_delivery,
)

frames_st = st.lists(
    st.tuples(st.sampled_from([1, 2, 3, 8]), st.integers(0, 2**16 - 1), st.binary(max_size=300)), max_size=20
)


def encode(frames) -> bytes:
    return b"".join(FRAME_HEADER.pack(t, c, len(p)) + p + bytes([FRAME_END]) for t, c, p in frames)


@given(frames_st, st.integers(0, 10_000))
def test_complete_frames_come_out_in_order_and_a_partial_one_stays(frames, cut):
    data = encode(frames)
    cut = min(cut, len(data))
    got, used = split_frames(data[:cut])
    assert got == frames[: len(got)]
    assert used == len(encode(got))
    rest, used_rest = split_frames(data[:cut][used:] + data[cut:])
    assert got + rest == frames and used + used_rest == len(data)


def test_a_frame_that_does_not_end_with_0xce_is_refused():
    data = bytearray(encode([(1, 1, b"abc")]))
    data[-1] = 0
    with pytest.raises(FrameError):
        split_frames(bytes(data) + b"\x01")


def test_the_py_amqp_internals_we_read_into_exist():
    from amqp.connection import Connection
    from amqp.transport import TCPTransport

    assert "_read_buffer" in inspect.getsource(TCPTransport._setup_transport)
    assert "self._read_buffer" in inspect.getsource(TCPTransport._read)
    assert isinstance(Connection.on_inbound_frame, property)
    assert "on_inbound_frame(frame)" in inspect.getsource(Connection.blocking_read)


# -- taking a basic.deliver ourselves: the same result as py-amqp's, or py-amqp takes it --

shortstr = st.text(max_size=40).filter(lambda s: len(s.encode("utf-8", "surrogatepass")) < 256)
header_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1) | st.text(max_size=30),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(shortstr, inner, max_size=3),
    max_leaves=8,
)
properties_st = st.fixed_dictionaries(
    {},
    optional={
        "content_type": shortstr,
        "content_encoding": shortstr,
        "application_headers": st.dictionaries(shortstr, header_values, max_size=4),
        "delivery_mode": st.sampled_from([1, 2]),
        "priority": st.integers(0, 9),
        "correlation_id": shortstr,
        "message_id": shortstr,
        "expiration": st.integers(0, 10**6).map(str),
    },
)


def deliver_frames(channel, args, properties, body, frame_max):
    """The frames RabbitMQ sends for one delivery, encoded with py-amqp's own serializers."""
    from amqp.basic_message import Message
    from amqp.serialization import dumps

    method = DELIVER + dumps("sLbss", args)
    header = struct.pack(">HHQ", 60, 0, len(body)) + Message(**properties)._serialize_properties()
    chunks = [body[i : i + frame_max] for i in range(0, len(body), frame_max)]
    return [(1, channel, method), (2, channel, header), *[(3, channel, c) for c in chunks]]


def py_amqp_reads(frames):
    """What py-amqp's own frame handler makes of the frames: [(args, properties, body)]."""
    from types import SimpleNamespace

    from amqp.method_framing import frame_handler
    from amqp.serialization import loads

    got = []

    def on_method(channel, method_sig, payload, message):
        if message is not None and method_sig == (60, 60):
            got.append((tuple(loads("sLbss", payload, 4)[0]), message.properties, message.body))

    handler = frame_handler(SimpleNamespace(bytes_recv=0), on_method)
    for frame in frames:
        handler(frame)
    return got


@given(
    st.tuples(shortstr, st.integers(1, 2**64 - 1), st.booleans(), shortstr, shortstr),
    properties_st,
    st.binary(max_size=600),
    st.integers(1, 200),
    st.integers(0, 10),
)
def test_a_delivery_taken_here_reads_as_py_amqp_reads_it(args, properties, body, frame_max, cut):
    channel = 1
    frames = deliver_frames(channel, args, properties, body, frame_max)
    expected = py_amqp_reads(frames)
    taken = take_delivery(frames, 0, channel)
    assert taken is not None and taken.frames == len(frames)
    assert [(tuple(taken.args), decode_properties_basic(taken.header, PROPERTIES_OFFSET)[0], taken.body)] == [
        (exp_args, exp_props, exp_body or b"") for exp_args, exp_props, exp_body in expected
    ]
    # Cut short (the rest of the content arrives with the next read): not taken here.
    if cut < len(frames) - 1:
        assert take_delivery(frames[: cut + 1], 0, channel) is None


def test_other_frames_and_other_channels_are_left_to_py_amqp():
    frames = deliver_frames(1, ("ctag", 7, False, "", "q"), {}, b"body", 100)
    assert take_delivery(frames, 0, channel=2) is None
    assert take_delivery(frames, 1, channel=1) is None  # a header on its own
    other_channel = [frames[0], (2, 2, frames[1][2]), *frames[2:]]
    assert take_delivery(other_channel, 0, channel=1) is None
    basic_return = [(1, 1, struct.pack(">HH", 60, 50) + frames[0][2][4:]), *frames[1:]]
    assert take_delivery(basic_return, 0, channel=1) is None
    heartbeat_between = [frames[0], (8, 0, b""), *frames[1:]]
    assert take_delivery(heartbeat_between, 0, channel=1) is None
