"""The consumer greenlet's reads against py-amqp's own: a byte stream of deliveries (some
split over many body frames), basic.return, basic.ack and heartbeats, cut into reads at
arbitrary points, comes out of `BrokerSession._drain` as py-amqp alone would have made
it: every delivery once and in order, on the right generation and queue, and py-amqp's
heartbeat accounting (`bytes_recv`, one per frame) unchanged. No broker: a socketpair
stands in for the connection's socket."""

from __future__ import annotations

import socket
import struct
from functools import partial

from amqp import Connection
from amqp.basic_message import Message
from amqp.channel import Channel
from amqp.method_framing import frame_handler
from amqp.serialization import dumps
from amqp.transport import TCPTransport
from hypothesis import given, settings
from hypothesis import strategies as st

from speed_gevent.broker import BrokerSession


def frame(frame_type: int, channel: int, payload: bytes) -> bytes:
    return struct.pack(">BHI", frame_type, channel, len(payload)) + payload + b"\xce"


def content(channel: int, body: bytes, frame_max: int, **properties) -> bytes:
    out = frame(
        2, channel, struct.pack(">HHQ", 60, 0, len(body)) + Message(**properties)._serialize_properties()
    )
    for start in range(0, len(body), frame_max):
        out += frame(3, channel, body[start : start + frame_max])
    return out


def deliver(tag: int, body: bytes, frame_max: int, consumer_tag: str = "ctag") -> bytes:
    method = frame(1, 1, struct.pack(">HH", 60, 60) + dumps("sLbss", (consumer_tag, tag, False, "ex", "rk")))
    return method + content(1, body, frame_max, message_id=str(tag))


def returned(body: bytes) -> bytes:
    method = frame(1, 1, struct.pack(">HH", 60, 50) + dumps("Bsss", (312, "NO_ROUTE", "", "nowhere")))
    return method + content(1, body, 1000, application_headers={"origin": "test"})


events = st.lists(
    st.one_of(
        st.tuples(st.just("deliver"), st.binary(max_size=300), st.integers(1, 120)),
        st.tuples(st.just("return"), st.binary(max_size=20), st.just(0)),
        st.tuples(st.just("ack"), st.just(b""), st.just(0)),
        st.tuples(st.just("heartbeat"), st.just(b""), st.just(0)),
    ),
    min_size=1,
    max_size=25,
)


class Wired:
    """A BrokerSession on a py-amqp connection whose socket is one end of a socketpair."""

    def __init__(self) -> None:
        self.got: list = []
        self.returns: list = []
        self.session = session = BrokerSession("amqp://guest:guest@localhost//", 30, self.got.append)
        self.conn = conn = Connection()
        self.ours, self.theirs = socket.socketpair()
        self.ours.setblocking(False)
        self.transport = transport = TCPTransport.__new__(TCPTransport)
        transport.sock, transport._read_buffer = self.ours, b""
        conn._transport = transport
        conn._on_inbound_frame = frame_handler(conn, conn.on_inbound_method)
        channel = Channel(conn, 1, auto_decode=False)
        channel.is_open = True
        channel.callbacks["ctag"] = partial(session._on_message, 1)  # py-amqp's path, for split contents
        channel.events["basic_return"].add(lambda exc, exchange, key, message: self.returns.append(message))
        channel.events["basic_ack"].add(lambda tag, multiple: None)
        session._conn, session._channel, session.generation = conn, channel, 1
        session._queue_of["ctag"] = "q"

    def feed(self, data: bytes) -> None:
        self.theirs.sendall(data)
        self.session._drain(self.conn)

    def close(self) -> None:
        self.ours.close()
        self.theirs.close()


def test_a_whole_delivery_is_taken_here_and_a_split_one_by_py_amqp(monkeypatch):
    """Both paths run: a delivery in one read is parsed here, one cut byte by byte is
    assembled by py-amqp (its partial state lives there, never here)."""
    wired = Wired()
    taken, by_py_amqp = [], []
    monkeypatch.setattr(
        wired.session, "_on_taken", lambda t, f=wired.session._on_taken: (taken.append(1), f(t))
    )
    wired.channel_callback = wired.session._channel.callbacks["ctag"]
    wired.session._channel.callbacks["ctag"] = lambda m: (by_py_amqp.append(1), wired.channel_callback(m))
    try:
        wired.feed(deliver(1, b"whole", 100))
        for byte in deliver(2, b"split", 100):
            wired.feed(bytes([byte]))
    finally:
        wired.close()
    assert (len(taken), len(by_py_amqp)) == (1, 1)
    assert [(d.tag, d.body) for d in wired.got] == [(1, b"whole"), (2, b"split")]


def test_a_delivery_for_a_cancelled_consumer_goes_back_not_to_a_worker(monkeypatch):
    """Deliveries can cross our basic.cancel: one for a tag we no longer consume is left
    to py-amqp, which rejects it with requeue; the deliveries around it are ours."""
    wired = Wired()
    rejected = []
    monkeypatch.setattr(
        wired.session._channel, "basic_reject", lambda tag, requeue: rejected.append((tag, requeue))
    )
    try:
        wired.feed(
            deliver(1, b"a", 100) + deliver(2, b"b", 100, consumer_tag="cancelled") + deliver(3, b"c", 100)
        )
    finally:
        wired.close()
    assert [d.tag for d in wired.got] == [1, 3]
    assert rejected == [(2, True)]
    assert wired.conn.bytes_recv == 9


@settings(max_examples=150, deadline=None)
@given(events, st.lists(st.integers(1, 200), min_size=1, max_size=50))
def test_drained_reads_make_what_py_amqp_makes(stream_events, cuts):
    wired = Wired()
    got, returns, conn, transport = wired.got, wired.returns, wired.conn, wired.transport
    stream, expected, frames = b"", [], 0
    for n, (kind, body, frame_max) in enumerate(stream_events, start=1):
        if kind == "deliver":
            stream += deliver(n, body, frame_max)
            expected.append((n, body))
            frames += 2 + -(-len(body) // frame_max)
        elif kind == "return":
            stream += returned(body)
            frames += 2 + (1 if body else 0)
        elif kind == "ack":
            stream += frame(1, 1, struct.pack(">HH", 60, 80) + dumps("Lb", (n, False)))
            frames += 1
        else:
            stream += frame(8, 0, b"")
            frames += 1
    try:
        position, turn = 0, 0
        while position < len(stream):
            cut = cuts[turn % len(cuts)]
            wired.feed(stream[position : position + cut])
            position, turn = position + cut, turn + 1
        wired.feed(b"")
    finally:
        wired.close()
    assert [(d.tag, d.body) for d in got] == expected
    assert all(d.generation == 1 and d.queue == "q" and d.problem is None for d in got)
    assert [d.properties.get("message_id") for d in got] == [str(tag) for tag, _ in expected]
    assert conn.bytes_recv == frames, "py-amqp counts one per frame; heartbeats depend on it"
    assert transport._read_buffer == b""
    assert len(returns) == sum(kind == "return" for kind, _, _ in stream_events)
