"""The consumer greenlet's doorbell: every ring wakes a waiter, whoever rings; a timeout
is a timeout; a wake-up left from an earlier wait never cuts a later one short."""

from __future__ import annotations

import time

import gevent
import pytest

from speed_gevent.doorbell import Doorbell

pytestmark = pytest.mark.timeout(10)


def test_a_ring_from_another_greenlet_wakes_the_waiter():
    bell = Doorbell()
    gevent.spawn_later(0.01, bell.ring)
    started = time.monotonic()
    assert bell.wait(5.0) is True
    assert time.monotonic() - started < 1.0


def test_a_ring_from_the_hub_switches_straight_into_the_waiter():
    bell = Doorbell()
    timer = gevent.get_hub().loop.timer(0.01)
    timer.start(bell.ring)  # a libev callback: runs in the hub, like the socket's I/O watcher
    try:
        assert bell.wait(5.0) is True
    finally:
        timer.close()


def test_a_ring_before_the_wait_ends_it_at_once_until_cleared():
    bell = Doorbell()
    bell.ring()
    assert bell.wait(5.0) is True
    bell.clear()
    assert bell.is_rung() is False
    assert bell.wait(0.05) is False


def test_without_a_ring_the_wait_times_out():
    bell = Doorbell()
    started = time.monotonic()
    assert bell.wait(0.1) is False
    assert 0.09 <= time.monotonic() - started < 2.0


def test_a_leftover_wake_up_does_not_end_the_next_wait_early():
    bell = Doorbell()
    gevent.spawn_later(0.01, bell.ring)
    gevent.spawn_later(0.01, bell.ring)  # the second ring finds nobody waiting
    assert bell.wait(5.0) is True
    gevent.sleep(0.05)  # every callback scheduled by those rings has run
    bell.clear()
    started = time.monotonic()
    assert bell.wait(0.2) is False
    assert time.monotonic() - started >= 0.19


def test_rings_from_the_hub_and_a_greenlet_in_one_turn_wake_once_and_are_not_lost():
    bell = Doorbell()
    woken = []

    def waiter() -> None:
        for _ in range(2):
            woken.append(bell.wait(5.0))
            bell.clear()

    task = gevent.spawn(waiter)
    gevent.sleep(0)
    timer = gevent.get_hub().loop.timer(0.01)
    timer.start(bell.ring)
    gevent.spawn_later(0.01, bell.ring)
    gevent.spawn_later(0.3, bell.ring)  # the second wait needs its own ring
    try:
        task.join(5.0)
    finally:
        timer.close()
    assert woken == [True, True]
