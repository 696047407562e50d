"""The consumer greenlet's outbox, with a recording stand-in for the py-amqp channel.

Traps of a gevent master that need a test, not only care: only the consumer greenlet
writes to the connection (acks wait in the router until it takes them, after the rejects
queued before them); tags of an older channel generation are never settled;
per-consumer QoS (quorum queues refuse global QoS) is set before each basic_consume.
"""

from __future__ import annotations

import gevent
import gevent.event

from speed_gevent.actions import Ack, Reject
from speed_gevent.broker import BrokerSession
from speed_gevent.delivery import Delivery
from speed_gevent.router import Router, RouterSettings


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

    def basic_consume(self, queue: str, callback: object, no_ack: bool, on_cancel: object = None) -> str:
        self._tags += 1
        self.calls.append(("consume", queue, no_ack))
        return f"ctag-{self._tags}"


def session_with(channel: RecordingChannel, generation: int = 1, take_acks=list) -> BrokerSession:
    session = BrokerSession(
        "amqp://guest:secret@localhost//", 30, on_delivery=lambda d: None, take_acks=take_acks
    )
    session._channel = channel
    session.generation = generation
    return session


def delivery(tag: int, generation: int = 1) -> Delivery:
    return Delivery(tag, generation, tag, "q", "", "q", False, b"", {}, 0.0)


def router_with(*tags: int) -> Router:
    router = Router(RouterSettings(max_cache=10), 0.0)
    router.channel_opened(1)
    router.start(0.0)
    for tag in tags:
        router.delivery_arrived(delivery(tag), 0.0)
    return router


def test_other_greenlets_only_queue_their_acks():
    """Acks finished by other greenlets wait in the router; only the consumer greenlet's
    outbox turn writes them, as one multiple-ack over the finished prefix."""
    channel = RecordingChannel()
    router = router_with(1, 2, 3)
    session = session_with(channel, take_acks=router.take_acks)
    workers = [a.worker_id for a in router.fork_server_ready(0.0)]  # nothing to spawn: floor is up
    assert workers == []
    for worker in router.workers():
        router.worker_ready(worker.worker_id, 0.0)
    router.worker_spawned(99, 99)  # unknown: ignored

    def finish_all() -> None:
        for worker in router.workers():
            if worker.running is not None:
                router.worker_result(worker.worker_id, worker.running.delivery.id, None, 0.0)

    while router.unsettled:
        gevent.joinall([gevent.spawn(finish_all)])
        router.patrol(0.0)
    assert channel.calls == [], "an ack was written outside the consumer greenlet"
    session._run_outbox()  # what the consumer greenlet does between drains
    assert ("ack", 3, True) in channel.calls
    assert all(call[0] == "ack" for call in channel.calls)


def test_rejects_queued_before_are_written_before_a_multiple_ack():
    """Tag 1's republish is refused, so it goes back (reject) after a wait; tag 2 finished. The router
    plans one multiple-ack up to 2, which passes over 1: that is only safe because the
    reject is written first. Written the other way round, the ack would ack message 1."""
    from speed_gevent.policy import Failure, FailureKind

    channel = RecordingChannel()
    router = Router(RouterSettings(max_cache=10, min_workers=1, max_workers=1), 0.0)
    router.channel_opened(1)
    session = session_with(channel, take_acks=router.take_acks)
    (spawn,) = router.start(0.0)
    router.worker_ready(spawn.worker_id, 0.0)
    router.delivery_arrived(delivery(1), 0.0)
    router.delivery_arrived(delivery(2), 0.0)  # waits in the worker's window
    failed = router.worker_result(spawn.worker_id, 1, Failure(FailureKind.ERROR, "E", "boom"), 0.0)
    (publish,) = [a for a in failed if a.__class__.__name__ == "Publish"]
    router.worker_result(spawn.worker_id, 2, None, 0.0)
    given_back = router.publish_done(publish.publish_id, False, "refused", 0.0) + router.tick(1.0)
    for action in given_back:  # after the refusal's wait
        if isinstance(action, Reject):
            session.reject(action.delivery)
    session._run_outbox()
    assert channel.calls == [("reject", 1, True), ("ack", 2, True)]


def test_tags_of_an_old_channel_are_never_settled():
    channel = RecordingChannel()
    session = session_with(channel, generation=2, take_acks=lambda: [Ack(1, 1, True)])
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


def test_a_queue_already_consumed_on_this_channel_gets_no_second_consumer():
    """The first basic_consume can be queued while a recovery consumes already (an outage
    while the floor boots): each queue has one consumer per channel, so the prefetch bound
    holds; after a cancel, consuming again makes a new one."""
    channel = RecordingChannel()
    session = session_with(channel)
    session.start_consuming({"a": 5, "b": 5})
    session.start_consuming({"a": 5, "b": 5})
    assert [call for call in channel.calls if call[0] == "consume"] == [("consume", "a", False),
                                                                         ("consume", "b", False)]  # fmt: skip
    session._queue_of.clear()  # what a cancel (or a new channel) leaves
    session.start_consuming({"a": 5})
    assert [call[1] for call in channel.calls if call[0] == "consume"] == ["a", "b", "a"]


class RecordingConnection:
    def __init__(self) -> None:
        self.closed_by: list[object] = []

    def close(self) -> None:
        self.closed_by.append(gevent.getcurrent())


def test_a_close_while_the_consumer_greenlet_recovers_is_left_to_that_greenlet():
    """A graceful stop during a recovery's declare: the closer never calls close() on the
    connection beside the consumer greenlet's synchronous wait; the consumer greenlet
    closes once it is out of its waits."""
    session = session_with(RecordingChannel())
    conn = session._conn = RecordingConnection()  # type: ignore[assignment]
    in_wait = gevent.event.Event()
    leave_wait = gevent.event.Event()

    def consumer_greenlet() -> None:
        with session.owned():
            in_wait.set()
            leave_wait.wait(5)  # a declare's answer, say

    owner = gevent.spawn(consumer_greenlet)
    in_wait.wait(5)
    closer = gevent.spawn(session.close, 1.0)
    closer.join(5)
    assert conn.closed_by == [] and not session.closed.is_set()
    leave_wait.set()
    owner.join(5)
    assert conn.closed_by == [owner]
    assert session.closed.is_set()
