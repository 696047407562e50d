from __future__ import annotations

import datetime as dt

import pytest

from speed_gevent.acks import AckTracker
from speed_gevent.cache import CacheFull, MessageCache
from speed_gevent.delivery import Delivery, attempt_of
from speed_gevent.policy import (
    Action,
    Failure,
    FailureKind,
    dead_letter_headers,
    decide,
    describe_exit,
    failure_from_result,
    retry_headers,
)
from speed_gevent.protocol import Outcome


def delivery(i: int = 1, headers: dict | None = None) -> Delivery:
    return Delivery(i, 1, i, "q", "", "q", False, b"body", {"application_headers": headers}, 0.0)


# -- ack tracker --------------------------------------------------------------------


def test_in_order_batch_is_one_multiple_ack():
    t = AckTracker()
    for tag in range(1, 6):
        t.received(tag)
    plan = t.plan([1, 2, 3, 4, 5])
    assert plan.upto == 5 and plan.singles == []
    assert t.outstanding == 0


def test_gap_below_means_single_acks():
    t = AckTracker()
    for tag in range(1, 5):
        t.received(tag)
    plan = t.plan([2, 4])
    assert plan.upto is None and plan.singles == [2, 4]
    plan = t.plan([1])  # 1 now settles the prefix up to 2; 3 is still open
    assert plan.upto == 1 and plan.singles == []
    plan = t.plan([3])
    assert plan.upto == 3 and plan.singles == []
    assert t.outstanding == 0


def test_multiple_ack_never_names_a_tag_acked_before():
    t = AckTracker()
    for tag in (1, 2, 3):
        t.received(tag)
    assert t.plan([2]).singles == [2]
    plan = t.plan([1])
    assert plan.upto == 1  # not 2: RabbitMQ refuses a multiple-ack on an already-acked tag


def test_rejected_tags_settle_without_ack():
    t = AckTracker()
    for tag in (1, 2, 3):
        t.received(tag)
    t.rejected(1)
    plan = t.plan([2, 3])
    assert plan.upto == 3 and plan.singles == []


# -- retry policy ----------------------------------------------------------------------


@pytest.mark.parametrize("kind, attempt, max_retries, action", [
    (None, 1, 3, Action.ACK),
    (FailureKind.ERROR, 1, 3, Action.RETRY),
    (FailureKind.ERROR, 3, 3, Action.RETRY),
    (FailureKind.ERROR, 4, 3, Action.DEAD_LETTER),
    (FailureKind.ERROR, 1, 0, Action.DEAD_LETTER),
    (FailureKind.CRASH, 1, 1, Action.RETRY),
    (FailureKind.CRASH, 2, 1, Action.DEAD_LETTER),
    (FailureKind.REJECT, 1, 3, Action.DEAD_LETTER),
    (FailureKind.RETRY, 1, 3, Action.RETRY),
])  # fmt: skip
def test_decide(kind, attempt, max_retries, action):
    failure = Failure(kind) if kind else None
    assert decide(failure, attempt, max_retries).action is action


def test_failure_from_result():
    assert failure_from_result(Outcome.OK, "", "", "") is None
    failure = failure_from_result(Outcome.ERROR, "ValueError", "boom", "tb")
    assert failure == Failure(FailureKind.ERROR, "ValueError", "boom", "tb")
    assert failure_from_result(Outcome.REJECT, "Reject", "no", "").kind is FailureKind.REJECT


def test_attempt_counts_our_header_alone():
    """A quorum queue's x-delivery-count rises on our own give-backs too: not an attempt."""
    assert attempt_of(None) == 1
    assert attempt_of({"x-speed-attempt": 3}) == 3
    assert attempt_of({"x-speed-attempt": 2, "x-delivery-count": 5}) == 2
    assert attempt_of({"x-delivery-count": 5}) == 1
    assert attempt_of({"x-speed-attempt": "junk"}) == 1


def test_retry_and_dead_letter_headers_keep_the_originals():
    assert retry_headers({"a": 1, "x-delivery-count": 2}, 2) == {"a": 1, "x-speed-attempt": 3}
    failure = Failure(FailureKind.CRASH, "WorkerDied", "killed", exit_status="killed by SIGKILL")
    now = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
    headers = dead_letter_headers({"a": 1}, failure, 4, "q", "ex", "rk", now)
    assert headers["a"] == 1 and headers["x-speed-attempt"] == 4
    assert headers["x-speed-reason"] == "crash" and headers["x-speed-exit-status"] == "killed by SIGKILL"
    assert headers["x-speed-origin-queue"] == "q" and headers["x-speed-origin-exchange"] == "ex"
    assert headers["x-speed-origin-routing-key"] == "rk"
    assert headers["x-speed-failed-at"].startswith("2026-01-01T00:00:00")


def test_describe_exit():
    assert describe_exit(9) == "killed by SIGKILL"
    assert describe_exit(3 << 8) == "exit code 3"


# -- cache -------------------------------------------------


def test_cache_is_fifo_bounded_and_never_waits():
    cache = MessageCache(2)
    cache.put(delivery(1))
    cache.put(delivery(2))
    with pytest.raises(CacheFull):
        cache.put(delivery(3))
    first = cache.take()
    assert first is not None and first.id == 1
    cache.put_front(first)
    assert [d.id for d in cache.drain()] == [1, 2] and len(cache) == 0


@pytest.mark.parametrize("value", ["²", "٣", " 7x", b"\xff", "", "1e3", None, 2.5, ["1"]])
def test_an_odd_attempt_header_never_raises(value):
    """ "²".isdigit() is True but int("²") raises: one such header used to kill the master
    on every restart. Whatever the header holds, the attempt is a number ≥ 1."""
    assert attempt_of({"x-speed-attempt": value}) >= 1
    assert attempt_of({"x-delivery-count": value}) >= 1
