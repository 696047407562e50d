"""Splitting the broker's byte stream into AMQP frames, and the py-amqp internals the
consumer greenlet's buffered reads rely on (pinned in pyproject.toml)."""

from __future__ import annotations

import inspect

import pytest
from hypothesis import given
from hypothesis import strategies as st

from speed_gevent.amqpframes import FRAME_END, FRAME_HEADER, FrameError, split_frames

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
