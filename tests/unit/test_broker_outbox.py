"""The consumer greenlet's outbox, with a recording stand-in for the py-amqp channel.

Traps of a gevent master that need a test, not only care: only the consumer greenlet
writes to the connection; tags of an older channel generation are never settled;
per-consumer QoS (quorum queues refuse global QoS) is set before each basic_consume.
"""

from __future__ import annotations

import gevent

from speed_gevent.broker import BrokerSession
from speed_gevent.delivery import Delivery


class RecordingChannel:
    def __init__(self) -> None:
        self.calls: list[tuple] = []
        self._tags = 0

    def basic_ack(self, tag: int, multiple: bool = False) -> None:
        self.calls.append(("ack", tag, multiple))

    def basic_reject(self, tag: int, requeue: bool) -> None:
        self.calls.append(("reject", tag, requeue))

    def basic_qos(self, size: int, count: int, a_global: bool) -> None:
        self.calls.append(("qos", count, a_global))

    def basic_consume(self, queue: str, callback: object, no_ack: bool) -> str:
        self._tags += 1
        self.calls.append(("consume", queue, no_ack))
        return f"ctag-{self._tags}"


def session_with(channel: RecordingChannel, generation: int = 1) -> BrokerSession:
    session = BrokerSession("amqp://guest:secret@localhost//", 30, on_delivery=lambda d: None)
    session._channel = channel
    session.generation = generation
    return session


def delivery(tag: int, generation: int = 1) -> Delivery:
    return Delivery(tag, generation, tag, "q", "", "q", False, b"", {}, 0.0)


def test_other_greenlets_only_queue_their_acks():
    channel = RecordingChannel()
    session = session_with(channel)
    for tag in (1, 2, 3):
        session._tracker.received(tag)
    gevent.joinall([gevent.spawn(session.ack, delivery(tag)) for tag in (1, 2, 3)])
    assert channel.calls == [], "an ack was written outside the consumer greenlet"
    session._run_outbox()  # what the consumer greenlet does between drains
    assert channel.calls == [("ack", 3, True)]


def test_tags_of_an_old_channel_are_never_settled():
    channel = RecordingChannel()
    session = session_with(channel, generation=2)
    session._tracker.received(1)
    session.ack(delivery(1, generation=1))
    session.reject(delivery(1, generation=1), requeue=True)
    session._run_outbox()
    assert channel.calls == []


def test_per_consumer_qos_before_each_consume():
    channel = RecordingChannel()
    session = session_with(channel)
    session.start_consuming({"a": 3, "b": 2})
    assert channel.calls == [
        ("qos", 3, False),
        ("consume", "a", False),
        ("qos", 2, False),
        ("consume", "b", False),
    ]


def test_the_masked_url_has_no_password():
    assert "secret" not in session_with(RecordingChannel()).masked_url
