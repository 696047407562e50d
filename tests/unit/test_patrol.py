from __future__ import annotations

import pytest

from speed_gevent.patrol import (
    Limits,
    Retire,
    RetireReason,
    Spawn,
    SpawnGuard,
    WorkerView,
    plan,
    workers_to_spawn,
)

MB = 10**6
LIMITS = Limits(min_workers=1, max_workers=4, max_idle=60.0, max_worker_memory=100 * MB, max_messages=1000)


def view(worker_id, busy=False, last_busy_at=0.0, handled=0, memory=None, retiring=False):
    return WorkerView(worker_id, busy, retiring, last_busy_at, handled, memory)


@pytest.mark.parametrize(
    "views, now, expected",
    [
        # nothing to do
        ([view(1, last_busy_at=100)], 120, []),
        # an idle worker past max_idle is retired, but never below min_workers
        ([view(1, last_busy_at=0), view(2, last_busy_at=0)], 100, [Retire(1, RetireReason.IDLE)]),
        ([view(1, last_busy_at=0)], 100, []),
        # the longest idle goes first
        ([view(1, last_busy_at=30), view(2, last_busy_at=10), view(3, busy=True)], 100,
         [Retire(2, RetireReason.IDLE), Retire(1, RetireReason.IDLE)]),
        # exactly max_idle is not yet too long
        ([view(1), view(2, last_busy_at=40)], 100, [Retire(1, RetireReason.IDLE)]),
        # a busy worker is never retired for idleness
        ([view(1, busy=True), view(2, busy=True)], 1000, []),
        # memory and message-count recycling, even when busy (it finishes first)
        ([view(1, busy=True, memory=150 * MB, last_busy_at=100)], 100,
         [Retire(1, RetireReason.MEMORY), Spawn(1)]),
        ([view(1, handled=1000, last_busy_at=100), view(2, last_busy_at=100)], 100,
         [Retire(1, RetireReason.MAX_MESSAGES)]),
        # an unknown memory sample never recycles
        ([view(1, memory=None, last_busy_at=100)], 100, []),
        # below the floor: spawn
        ([], 0, [Spawn(1)]),
        # retiring workers do not count toward the pool
        ([view(1, retiring=True)], 0, [Spawn(1)]),
    ],
)  # fmt: skip
def test_plan(views, now, expected):
    assert plan(views, now, LIMITS) == expected


def test_plan_never_retires_idle_when_max_idle_is_off():
    limits = Limits(1, 4, None, None, None)
    assert plan([view(1), view(2)], 10_000, limits) == []


@pytest.mark.parametrize(
    "backlog, idle, booting, live, expected",
    [(0, 0, 0, 1, 0), (5, 0, 0, 1, 3), (2, 0, 0, 1, 2), (2, 0, 1, 2, 1), (3, 1, 0, 2, 2), (9, 0, 0, 4, 0)],
)
def test_scale_up_at_once_up_to_the_ceiling(backlog, idle, booting, live, expected):
    assert workers_to_spawn(backlog, idle, booting, live, max_workers=4) == expected


def test_spawn_guard_trips_on_a_burst_and_forgets_old_failures():
    guard = SpawnGuard(limit=3, window=10.0)
    guard.failed(0.0, "exit code 3")
    guard.failed(1.0, "exit code 3")
    assert not guard.tripped(1.0)
    guard.failed(20.0, "exit code 3")  # the first two are out of the window by now
    assert not guard.tripped(20.0)
    guard.failed(21.0, "exit code 3")
    guard.failed(22.0, "killed by SIGSEGV")
    assert guard.tripped(22.0) and guard.last_reason == "killed by SIGSEGV"


def test_sample_memory_skips_vanished_pids():
    import os

    from speed_gevent.osproc import sample_memory

    sizes = sample_memory([os.getpid(), 2**22 + 12345])
    assert list(sizes) == [os.getpid()] and sizes[os.getpid()] > 0
