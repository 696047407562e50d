"""py-amqp's synchronous waits on a connection gone silent: the watchdog ends them (and
the close that follows on the way out) once py-amqp's frame count has stood still for
the heartbeat grace, and never while frames still arrive. No broker: the waits read one
end of a socketpair, as py-amqp's would."""

from __future__ import annotations

import time

import gevent
import gevent.socket
import pytest
from amqp.exceptions import ChannelError, error_for_code

from speed_gevent import silence
from speed_gevent.broker import ATTEMPT_TIMEOUT, MIN_ATTEMPT_TIMEOUT, BrokerSession, ConnectionLost
from speed_gevent.errors import ConfigError
from speed_gevent.silence import SilenceWatchdog

pytestmark = pytest.mark.timeout(30)


class SilentLink:
    """A connection stand-in whose every synchronous method waits for a byte that never
    comes (a closed or shut-down socket ends the wait, as in py-amqp's transport)."""

    def __init__(self, heartbeat: float) -> None:
        self.heartbeat = heartbeat
        self.bytes_recv = 0
        ours, self.theirs = gevent.socket.socketpair()
        self._transport = type("Transport", (), {"sock": ours})()
        self.closes = 0

    def wait_for_answer(self, *args: object, **kwargs: object) -> None:
        if not self._transport.sock.recv(1):
            raise OSError("Server unexpectedly closed connection")

    def channel(self) -> SilentLink:
        return self  # its queue_declare and close wait like the connection's methods

    queue_declare = wait_for_answer

    def close(self) -> None:  # channel.close: waits for close-ok, like py-amqp's
        self.closes += 1
        self.wait_for_answer()


def session_on(link: SilentLink) -> BrokerSession:
    session = BrokerSession("amqp://guest:secret@localhost//", 1, on_delivery=lambda d: None)
    session._conn = link  # type: ignore[assignment]
    return session


def test_a_silent_declare_ends_as_a_lost_connection_and_so_does_its_channel_close():
    """The declare and then the channel close in topology's `finally` both wait on the
    silent link; a one-shot timeout would leave the second waiting for good."""
    link = SilentLink(heartbeat=0.05)  # grace 0.1 s
    started = time.monotonic()
    with pytest.raises(ConnectionLost, match=r"no answer to the declare of 'q': the connection was silent"):
        session_on(link).declare(("q",), "classic", passive=False)
    assert time.monotonic() - started < 3
    assert link.closes >= 1, "the close on the way out ran and did not hang"


def test_a_slow_broker_that_still_sends_frames_is_waited_for():
    link = SilentLink(heartbeat=0.5)  # grace 1 s: a stall of the test machine stays far below it

    def slow_answer(*args: object, **kwargs: object) -> None:
        for _ in range(75):  # 1.5 s or more: past the grace, with frames all along
            gevent.sleep(0.02)
            link.bytes_recv += 1

    link.queue_declare = slow_answer  # type: ignore[method-assign]
    link.close = lambda: None  # type: ignore[method-assign]
    session_on(link).declare(("q",), "classic", passive=False)


def test_the_watchdog_stands_down_after_the_wait():
    link = SilentLink(heartbeat=1)
    with SilenceWatchdog(link, 0.05) as watchdog:
        pass
    gevent.sleep(0.2)
    assert not watchdog.fired
    link.theirs.sendall(b"x")
    assert link._transport.sock.recv(1) == b"x", "the socket was left alone"


def test_past_the_start_up_deadline_a_silent_wait_ends_soon(monkeypatch):
    monkeypatch.setattr(silence, "DEADLINE_GRACE", 0.2)
    link = SilentLink(heartbeat=10)
    started = time.monotonic()
    with SilenceWatchdog(link, 20, deadline=started + 0.2) as watchdog, pytest.raises(OSError):
        link.wait_for_answer()
    assert watchdog.fired and "--connect-timeout" in watchdog.why
    assert time.monotonic() - started < 3


def test_past_the_start_up_deadline_an_answer_on_its_way_is_waited_for(monkeypatch):
    """A broker that came up just before --connect-timeout and is answering (frames
    arrive) is not cut off by the deadline."""
    monkeypatch.setattr(silence, "DEADLINE_GRACE", 0.2)
    link = SilentLink(heartbeat=10)

    def answering() -> None:
        for n in range(100):  # 1 s or more of frames, past the deadline and its grace
            gevent.sleep(0.01)
            link.bytes_recv = n + 1
        link.theirs.sendall(b"x")  # the answer

    chatty = gevent.spawn(answering)
    with SilenceWatchdog(link, 20, deadline=time.monotonic() + 0.1) as watchdog:
        link.wait_for_answer()
    chatty.join(1)
    assert not watchdog.fired


def test_an_answer_waiting_unread_is_not_taken_for_silence():
    """The byte is in the kernel's buffer and the greenlet has not read it yet (busy
    elsewhere): no frame was counted, yet the link is not silent."""
    link = SilentLink(heartbeat=0.05)  # grace 0.1 s
    link.theirs.sendall(b"x")
    with SilenceWatchdog(link, 0.1, deadline=time.monotonic()) as watchdog:
        gevent.sleep(0.6)  # several checks past the grace and the deadline
    assert not watchdog.fired
    assert link._transport.sock.recv(1) == b"x"


def test_a_collected_connection_is_neither_reconnected_nor_a_traceback_in_the_hub(capfd):
    """py-amqp's `transport` property connects again when `_transport` is None: a
    blocking call the hub must never make."""
    link = SilentLink(heartbeat=0.05)
    link._transport = None
    type(link).transport = property(lambda self: pytest.fail("the transport property was read"))
    try:
        with SilenceWatchdog(link, 0.1) as watchdog:
            gevent.sleep(0.4)
    finally:
        del type(link).transport
    assert watchdog.fired
    assert "Traceback" not in capfd.readouterr().err


def test_a_declare_refused_on_its_channel_at_start_is_not_retried_as_an_outage():
    """RESOURCE_LOCKED and the like close the channel, not the connection, and no retry
    changes them: at start that is one clear configuration error (exit 2), not 'cannot
    reach the broker' forever."""
    session = BrokerSession("amqp://guest:secret@localhost//", 1, on_delivery=lambda d: None)
    session.connect = lambda: setattr(session, "_conn", None)  # type: ignore[method-assign]
    attempts = []

    def refused() -> None:
        attempts.append(1)
        raise error_for_code(405, "RESOURCE_LOCKED - cannot obtain exclusive access", (50, 10), ChannelError)

    with pytest.raises(ConfigError, match="refused to set up the queues"):
        session.connect_with_retry(lambda: False, gevent.sleep, None, then=refused)
    assert attempts == [1]


def test_a_queue_whose_cluster_node_is_down_at_start_is_waited_for():
    """NOT_FOUND 'home node ... is down or inaccessible' also closes only the channel, but
    passes once the node is back: retried like an outage."""
    session = BrokerSession("amqp://guest:secret@localhost//", 1, on_delivery=lambda d: None)
    session.connect = lambda: setattr(session, "_conn", None)  # type: ignore[method-assign]
    attempts = []

    def node_down_once() -> None:
        attempts.append(1)
        if len(attempts) == 1:
            raise error_for_code(404, "NOT_FOUND - home node 'rabbit@b' of durable queue 'q' in vhost '/' "
                                 "is down or inaccessible", (50, 10), ChannelError)  # fmt: skip

    assert session.connect_with_retry(lambda: False, lambda pause: None, 30.0, then=node_down_once)
    assert attempts == [1, 1]


def test_the_start_up_deadline_ends_with_start_up():
    """Recovery during a run retries for good: nothing of --connect-timeout's deadline is
    left behind for its waits, and one handshake never takes longer than ATTEMPT_TIMEOUT."""
    session = BrokerSession("amqp://guest:secret@localhost//", 1, on_delivery=lambda d: None,
                            connect_timeout=600)  # fmt: skip
    seen = []
    session.connect = lambda: seen.append((session._give_up, session._attempt_timeout()))  # type: ignore[method-assign]
    assert session.connect_with_retry(lambda: False, lambda pause: None, 600)
    assert seen[0][0] is not None and seen[0][1] == ATTEMPT_TIMEOUT
    assert session._give_up is None
    assert session._attempt_timeout() == ATTEMPT_TIMEOUT
    short = BrokerSession("amqp://guest:secret@localhost//", 1, on_delivery=lambda d: None, connect_timeout=2)
    assert short._attempt_timeout() == 2
    short._give_up = time.monotonic() + 0.2
    assert short._attempt_timeout() == MIN_ATTEMPT_TIMEOUT
