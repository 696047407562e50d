"""The master's worker links over real socketpairs (gevent sockets, no broker): frames of
one batch go out together and in order, a write the socket cannot take at once is
finished by the writer greenlet, and a failed write names exactly the message frames
that did not go out whole."""

from __future__ import annotations

import gevent
import gevent.socket
import pytest
from hypothesis import given
from hypothesis import strategies as st

from speed_gevent.delivery import Delivery
from speed_gevent.links import WorkerLinks, _consume
from speed_gevent.protocol import FrameDecoder, MessageFrame, StopFrame, encode_meta

pytestmark = pytest.mark.timeout(30)


class FakeFork:
    ready = True

    def __init__(self) -> None:
        self.peers: dict[int, gevent.socket.socket] = {}

    def spawn(self, worker_id: int) -> gevent.socket.socket:
        ours, theirs = gevent.socket.socketpair()
        self.peers[worker_id] = theirs
        return ours


class Recorder:
    def __init__(self) -> None:
        self.calls: list[tuple] = []

    def __getattr__(self, name: str):
        return lambda *args: self.calls.append((name, *args))


def delivery(i: int, body: bytes = b"x") -> Delivery:
    d = Delivery(i, 1, i, "q", "", "q", False, body, {}, 0.0)
    d.frame_meta = encode_meta([i, d.meta()])
    return d


def started_links() -> tuple[WorkerLinks, FakeFork, Recorder]:
    fork, events = FakeFork(), Recorder()
    links = WorkerLinks(fork, lambda name, fn, *args: gevent.spawn(fn, *args), events)  # type: ignore[arg-type]
    gevent.spawn(links.spawner_loop)
    links.spawn(1)
    with gevent.Timeout(5, AssertionError("the spawner never made the link")):
        while not len(links):
            gevent.sleep(0.001)  # poll with a deadline: the spawner greenlet runs meanwhile
    return links, fork, events


def read_frames(sock, count: int) -> list:
    decoder, frames = FrameDecoder(), []
    while len(frames) < count:
        data = sock.recv(1 << 20)
        assert data, "EOF before every frame arrived"
        frames += decoder.feed(data)
    return frames


def test_a_batch_goes_out_in_order_and_whole():
    links, fork, events = started_links()
    for i in (1, 2, 3):
        links.send_message(1, delivery(i))
    links.send_stop(1)
    links.flush()
    frames = read_frames(fork.peers[1], 4)
    assert [f.id for f in frames[:3] if isinstance(f, MessageFrame)] == [1, 2, 3]
    assert isinstance(frames[3], StopFrame) and events.calls == []


def test_what_the_socket_cannot_take_at_once_the_writer_finishes():
    links, fork, events = started_links()
    big = bytes(range(256)) * (16 * 1024)  # 4 MiB: far more than a socket buffer
    links.send_message(1, delivery(1, big))
    links.send_message(1, delivery(2))
    links.flush()
    frames = gevent.spawn(read_frames, fork.peers[1], 2).get(timeout=10)
    assert [f.id for f in frames] == [1, 2] and frames[0].body == big
    assert events.calls == []


def test_a_failed_write_names_the_frames_that_did_not_go_out():
    links, fork, events = started_links()
    links.send_message(1, delivery(1))
    links.flush()
    read_frames(fork.peers[1], 1)  # the first reached the worker
    fork.peers[1].close()  # the next write fails at once: nothing to wait for
    links.send_message(1, delivery(2))
    links.send_message(1, delivery(3))
    links.flush()
    assert events.calls == [("write_failed", 1, [2, 3])]
    links.send_message(1, delivery(4))  # after the failure: reported at once, never written
    assert events.calls[-1] == ("write_failed", 1, [4])


@given(st.lists(st.binary(min_size=1, max_size=50), min_size=1, max_size=8), st.integers(0, 500))
def test_consume_drops_exactly_the_bytes_sent_and_keeps_boundaries(parts, sent):
    out = [(p, i) for i, p in enumerate(parts)]
    total = b"".join(parts)
    sent = min(sent, len(total))
    _consume(out, sent)
    assert b"".join(bytes(p) for p, _ in out) == total[sent:]
    whole_before = 0
    for i, p in enumerate(parts):
        whole_before += len(p)
        if whole_before <= sent:
            assert i not in [d for _, d in out], "a part sent whole is still queued"
