"""The router alone: scenarios of one delivery's trip and of the pool around it.

Every action goes through `World`, which checks the delivery guarantees as it goes.
"""

from __future__ import annotations

import pytest

from speed_gevent import actions as act
from speed_gevent.policy import Failure, FailureKind
from speed_gevent.router import MAX_WINDOW, Phase, RouterSettings
from tests.unit.router_world import CLEAN, KILLED, World


def world(**options) -> World:
    options.setdefault("max_cache", 8)
    options.setdefault("max_workers", 4)
    w = World(RouterSettings(**options))
    w.start()
    w.ready_all()
    return w


def error(kind: FailureKind = FailureKind.ERROR) -> Failure:
    return Failure(kind, "ValueError", "boom")


def spawns(actions) -> list[int]:
    return [a.worker_id for a in actions if isinstance(a, act.Spawn)]


# -- dispatch ------------------------------------------------------------------------------


def test_a_delivery_goes_to_an_idle_worker_and_is_acked_after_its_handler_returned():
    w = world()
    d = w.arrive()
    assert w.holding() == {1: [d.id]}
    assert w.take_acks() == [], "acked before the handler returned"
    w.finish(1)
    assert w.take_acks() == [act.Ack(1, d.tag, True)]
    assert w.acked == [d.id] and w.router.unsettled == 0


def test_idle_workers_are_handed_out_most_recently_idle_first():
    w = world(min_workers=3)
    w.ready_all()
    assert w.live_workers() == [1, 2, 3]
    for _ in range(20):  # a trickle: one message at a time
        w.arrive()
        (wid,) = w.holding()
        w.finish(wid)
        w.advance(0.2)
    assert {wid for wid, _ in w.sent} == {3}, "a trickle should keep hitting the same worker"


def test_a_trickle_lets_spare_workers_retire_after_max_idle():
    w = world(min_workers=1, max_workers=4, max_idle=3.0)
    for _ in range(8):  # a burst grows the pool to the ceiling
        w.arrive()
    w.ready_all()
    assert len(w.live_workers()) == 4
    for wid in list(w.holding()):
        while w.workers[wid].holding:
            w.finish(wid)
    while w.holding():
        for wid in list(w.holding()):
            w.finish(wid)
    for _ in range(10):  # 5 msg/s, each handled at once, patrol every second
        for _ in range(5):
            w.arrive()
            for wid in list(w.holding()):
                w.finish(wid)
            w.advance(0.2)
        w.feed(w.router.patrol(w.now))
        for wid, worker in list(w.workers.items()):
            if worker.stop_sent:
                w.die(wid, CLEAN)
    assert len(w.live_workers()) == 1
    assert w.router.retired["idle"] == 3


def test_one_message_per_worker_and_the_pool_grows_on_backlog():
    w = world(min_workers=1, max_workers=3)
    first = w.arrive()
    assert w.holding() == {1: [first.id]}
    w.arrive()
    assert spawns(w.last) == [2], "a backlog with no idle worker grows the pool at once"
    assert w.holding() == {1: [first.id]} and w.router.cached == 1, "it waits for the new worker"
    w.ready(2)
    assert w.holding() == {1: [first.id], 2: [first.id + 1]}


def test_at_the_ceiling_busy_workers_get_a_window_the_emptiest_first():
    w = world(min_workers=2, max_workers=2, max_cache=8)
    w.ready_all()
    ids = [w.arrive().id for _ in range(6)]
    assert sorted(len(held) for held in w.holding().values()) == [2, 2], "a window of 2 before any timing"
    assert sorted(sum(w.holding().values(), [])) == ids[:4] and w.router.cached == 2
    assert w.workers[1].holding[0].id in ids[:2] and w.workers[2].holding[0].id in ids[:2]


def test_the_window_follows_handler_time():
    w = world(min_workers=2, max_workers=2, max_cache=40)
    w.ready_all()
    for _ in range(2):
        w.arrive()
    for wid in (1, 2):  # 100 ms handlers: a window of 2 is enough
        w.finish(wid, took=0.1)
    for _ in range(10):
        w.arrive()
    assert max(len(h) for h in w.holding().values()) == 2 and w.router.cached == 6
    for _ in range(60):  # fast handlers: the window grows to MAX_WINDOW
        for wid in list(w.holding()):
            w.finish(wid, took=0.00001)
        w.take_acks()
        while w.can_arrive() and w.router.cached < 4:
            w.arrive()
    assert max(len(h) for h in w.holding().values()) == MAX_WINDOW


def test_the_next_message_in_a_window_starts_when_the_worker_says_the_last_ended():
    w = world(min_workers=1, max_workers=1, timeout=5.0)
    first, second = w.arrive(), w.arrive()
    assert [d.id for d in w.workers[1].holding] == [first.id, second.id]
    w.advance(3.0)
    w.workers[1].holding.popleft()
    w.may_ack.add(first.id)
    w.feed(w.router.worker_result(1, first.id, None, w.now, w.now - 3.0, w.now - 0.5))
    assert w.router.worker(1).running.started_at == w.now - 0.5
    w.advance(4.4)
    assert not w.workers[1].killed, "--timeout runs from the message's own start"
    w.advance(0.2)
    assert w.workers[1].killed


def test_term_and_retirement_hand_back_the_unstarted_window_at_once_uncounted():
    w = world(min_workers=1, max_workers=1, max_cache=8)
    a, b = w.arrive(), w.arrive()
    w.feed(w.router.replace_all(w.now))  # HUP: a replacement boots, then the old one retires
    w.ready(2)
    assert w.workers[1].termed, "its window is taken back at once, not handled first"
    w.ask_exit(1)  # the worker finished a, started nothing more
    assert a.id in w.may_ack and w.rejected == [] and w.publishes == {}
    assert [d.id for d in w.workers[2].holding] == [b.id], "b goes to the new worker, uncounted"
    assert w.workers[1].stop_sent


def test_a_dead_worker_counts_one_attempt_for_the_running_message_only():
    w = world(min_workers=1, max_workers=1)
    running, waiting = w.arrive(), w.arrive()
    w.die(1, KILLED)
    assert [p.delivery_id for p in w.publishes.values()] == [running.id]
    w.ready_all()
    assert [d.id for d in w.workers[2].holding] == [waiting.id]
    assert w.router.counters.crashes == 1


def test_the_pool_never_grows_past_max_workers():
    w = world(min_workers=1, max_workers=2)
    for _ in range(8):
        w.arrive()
    w.ready_all()
    assert len(w.live_workers()) == 2 and w.router.cached == 4, "two windows of two"


# -- results and failures ----------------------------------------------------------------


def test_a_failed_attempt_is_republished_and_acked_only_after_the_confirm():
    w = world(max_retries=1)
    d = w.arrive()
    w.finish(1, error())
    (publish,) = w.publishes.values()
    assert publish.routing_key == "q" and publish.properties["application_headers"]["x-speed-attempt"] == 2
    assert w.take_acks() == [], "acked before the republish was confirmed"
    w.confirm(publish.publish_id)
    assert w.take_acks() and w.acked == [d.id] and w.router.counters.retried == 1


def test_retries_wait_in_delay_queues_one_step_longer_per_attempt():
    w = world(max_retries=5, retry_delay=1.0, retry_delay_max=4.0)
    targets = []
    for attempt in (1, 2, 3, 4):
        w.arrive(headers={"x-speed-attempt": attempt})
        w.finish(1, error())
        (publish,) = w.publishes.values()
        targets.append(publish.routing_key)
        assert publish.properties["application_headers"]["x-speed-attempt"] == attempt + 1
        w.confirm(publish.publish_id)
        w.take_acks()
    assert targets == ["q.retry.1s", "q.retry.2s", "q.retry.4s", "q.retry.4s"]
    assert w.router.counters.retried == 4


def test_a_delay_the_handler_asks_for_takes_the_nearest_step_at_or_above():
    w = world(retry_delay=1.0, retry_delay_max=60.0)
    targets = []
    for asked in (3.0, 0.2, 0.0, 500.0):
        w.arrive()
        w.finish(1, Failure(FailureKind.RETRY, "Retry", "", retry_delay=asked))
        (publish,) = w.publishes.values()
        targets.append(publish.routing_key)
        w.confirm(publish.publish_id)
        w.take_acks()
    assert targets == ["q.retry.4s", "q.retry.1s", "q", "q.retry.1m"]


def test_a_retry_its_delay_queue_refuses_goes_back_to_the_source_queue_at_once():
    """The delay queue was deleted under us: the broker returns the republish. Giving the
    original back would fail it again at full speed; it is retried at once instead."""
    w = world(retry_delay=1.0)
    d = w.arrive()
    w.finish(1, error())
    (first,) = w.publishes.values()
    assert first.routing_key == "q.retry.1s"
    w.confirm(first.publish_id, ok=False)
    assert w.rejected == [] and w.take_acks() == []
    (second,) = [p for p in w.publishes.values() if p.publish_id != first.publish_id]
    assert second.routing_key == "q" and second.properties["application_headers"]["x-speed-attempt"] == 2
    w.confirm(second.publish_id)
    w.take_acks()
    assert w.acked == [d.id] and w.router.counters.retried == 1


def test_exit_when_idle_waits_for_the_retries_it_delayed():
    w = world(exit_when_idle=1.0, retry_delay=5.0, retry_delay_max=5.0)
    w.arrive()
    w.finish(1, error())
    (publish_id,) = w.publishes
    w.confirm(publish_id)
    w.advance(4.0)
    assert w.router.phase is Phase.RUNNING, "the retry comes back in 5 s"
    w.advance(2.5)
    assert w.router.phase is Phase.DRAINING


def test_the_last_attempt_is_dead_lettered_with_the_reason():
    w = world(max_retries=1)
    d = w.arrive(headers={"x-speed-attempt": 2})
    w.finish(1, error())
    (publish,) = w.publishes.values()
    headers = publish.properties["application_headers"]
    assert publish.routing_key == "q.dead" and headers["x-speed-reason"] == "error"
    w.confirm(publish.publish_id)
    w.take_acks()
    assert w.acked == [d.id] and w.router.counters.dead_lettered == 1


def test_a_refused_republish_gives_the_original_back_after_a_wait_that_grows():
    """A deleted .dead queue: giving the original back at once would redeliver, fail
    and refuse it again at full speed. It waits 1 s, then 2 s, ...; a dead letter the
    broker takes starts the wait again from 1 s. The attempt number never moves."""
    w = world(max_retries=0)
    waits = []
    for ok in (False, False, False, True, False):
        d = w.arrive(headers={"x-speed-attempt": 1})
        w.finish(1, error())
        (publish,) = [p for p in w.publishes.values() if p.delivery_id == d.id]
        assert publish.properties["application_headers"]["x-speed-attempt"] == 1
        w.confirm(publish.publish_id, ok=ok)
        if ok:
            continue
        start = w.now
        assert w.rejected[-1:] != [d.id], "given back at once"
        w.advance_until(lambda d=d: w.rejected[-1:] == [d.id], limit=120.0)
        waits.append(round(w.now - start, 1))
    assert waits == [1.0, 2.0, 4.0, 1.0]
    assert w.router.counters.refused == 4 and w.router.counters.dead_lettered == 1


def test_refusals_in_a_burst_share_one_wait_and_a_stop_gives_them_back_at_once():
    w = world(max_workers=3, max_retries=0)
    w.ready_all()
    ids = [w.arrive().id for _ in range(3)]
    while any(w.holding().values()):
        w.finish(next(worker for worker, held in w.holding().items() if held), error())
    for publish_id in list(w.publishes):
        w.confirm(publish_id, ok=False)
    assert w.rejected == [] and w.router.snapshot(w.now)["cache"]["held_back"] == 3
    w.advance(0.5)
    w.feed(w.router.stop(w.now))
    assert sorted(w.rejected) == sorted(ids)


def test_a_message_the_master_cannot_frame_is_dead_lettered_not_sent():
    w = world()
    d = w.arrive(problem="its properties cannot be passed to a worker")
    assert w.sent == []
    (publish,) = w.publishes.values()
    assert publish.routing_key == "q.dead"
    assert publish.properties["application_headers"]["x-speed-reason"] == "invalid"
    w.confirm(publish.publish_id)
    w.take_acks()
    assert w.acked == [d.id]


def test_a_worker_dying_mid_message_counts_one_failed_attempt():
    w = world()
    d = w.arrive()
    w.die(1, KILLED)
    (publish,) = w.publishes.values()
    headers = publish.properties["application_headers"]
    assert publish.routing_key == "q" and headers["x-speed-attempt"] == 2
    assert w.router.counters.crashes == 1
    w.confirm(publish.publish_id)
    w.take_acks()
    assert w.acked == [d.id]
    assert spawns(w.feed([])) == [] and len(w.live_workers()) == 1, "the floor is refilled"


def test_a_result_for_a_message_the_worker_does_not_run_ends_that_worker_only():
    w = world()
    d = w.arrive()
    actions = w.feed(w.router.worker_result(1, 999, None, w.now))
    assert act.KillWorker(1, "protocol error") in actions
    w.arrive()  # not sent to the broken worker
    assert [wid for wid, _ in w.sent] == [1]
    w.die(1, KILLED)
    (publish,) = w.publishes.values()  # its message follows the crash rule
    assert publish.delivery_id == d.id


def test_a_failed_write_gives_the_message_back_uncounted_to_another_worker():
    w = world(min_workers=2)
    w.ready_all()
    d = w.arrive()
    (wid,) = w.holding()
    w.write_fails(wid)
    other = 1 if wid == 2 else 2
    assert w.holding() == {other: [d.id]}
    w.die(wid, KILLED)
    assert w.publishes == {} and w.router.counters.crashes == 0


def test_write_failure_after_the_worker_is_gone_changes_nothing():
    w = world()
    w.arrive()
    w.die(1, KILLED)  # the exit report came first
    assert w.feed(w.router.write_failed(1, [], w.now)) == []
    assert len(w.publishes) == 1


def test_a_handler_past_timeout_is_killed_and_counts_an_attempt():
    w = world(timeout=5.0, max_retries=0)
    w.arrive()
    assert w.timer == pytest.approx(w.now + 5.0)
    w.advance(4.9)
    assert not w.workers[1].killed
    w.advance(0.2)
    assert w.workers[1].killed
    w.die(1, KILLED)
    (publish,) = w.publishes.values()
    assert publish.properties["application_headers"]["x-speed-reason"] == "timeout"


def test_max_messages_recycles_a_worker_after_its_message():
    w = world(max_messages=2)
    w.arrive()
    w.finish(1)
    w.arrive()
    w.finish(1)
    assert w.workers[1].stop_sent and w.router.retired["max-messages"] == 1


# -- the channel --------------------------------------------------------------------------


def test_after_a_lost_channel_old_deliveries_are_never_settled():
    w = world(min_workers=1, max_workers=1)
    running = w.arrive()
    windowed = w.arrive()
    cached = w.arrive()
    w.lose_channel()
    assert w.router.cached == 0, "cached deliveries of the old channel are the broker's again"
    w.finish(1)  # the old deliveries' handlers return: not acked on the new channel
    w.finish(1)
    assert w.take_acks() == []
    fresh = w.arrive()
    w.finish(1)
    w.take_acks()
    assert w.acked == [fresh.id] and set(w.redelivered) == {running.id, windowed.id, cached.id}


def test_a_republish_pending_when_the_channel_is_lost_is_dropped():
    w = world()
    w.arrive()
    w.finish(1, error())
    w.lose_channel()
    assert w.router.unsettled == 0


# -- retiring, stopping ------------------------------------------------------------------------


def test_a_worker_asking_to_exit_gets_nothing_more_and_is_stopped_when_free():
    w = world(min_workers=1, max_workers=1)
    d, waiting = w.arrive(), w.arrive()
    w.ask_exit(1)  # it finishes d, then asks; `waiting` was never started
    assert w.workers[1].stop_sent and w.take_acks()
    assert d.id in w.acked
    w.ready_all()
    assert [x.id for x in w.workers[2].holding] == [waiting.id] and w.publishes == {}


def test_graceful_stop_returns_the_cache_and_lets_handlers_finish():
    w = world(min_workers=2, max_workers=2)
    w.ready_all()
    busy = [w.arrive(), w.arrive()]
    windowed = [w.arrive(), w.arrive()]  # two windows of two
    cached = [w.arrive(), w.arrive()]
    assert w.router.cached == 2
    actions = w.feed(w.router.stop(w.now))
    assert act.CancelConsumers() in actions
    assert sorted(w.rejected) == sorted(d.id for d in cached)
    late = w.arrive()  # in flight before the cancel took effect
    assert late.id in w.rejected
    for wid, worker in list(w.workers.items()):
        assert worker.termed, "its window comes back at once"
        w.ask_exit(wid)  # finishes its running message, hands back its window
    w.take_acks()
    assert sorted(w.acked) == sorted(d.id for d in busy)
    assert sorted(w.rejected) == sorted(d.id for d in [*cached, late, *windowed])
    for wid in list(w.workers):
        assert w.workers[wid].stop_sent
        w.die(wid, CLEAN)
    assert w.drained == "graceful" and w.router.counters.requeued == 5


def test_the_second_stop_kills_running_handlers_and_gives_their_messages_back_uncounted():
    w = world()
    d = w.arrive()
    w.feed(w.router.stop(w.now))
    w.feed(w.router.stop(w.now))
    assert w.workers[1].killed
    w.die(1, KILLED)
    assert w.rejected == [d.id] and w.publishes == {} and w.router.counters.crashes == 0
    assert w.drained == "immediate"


def test_the_graceful_timeout_turns_into_an_immediate_stop():
    w = world(graceful_timeout=10.0)
    w.arrive()
    w.feed(w.router.stop(w.now))
    w.advance(9.0)
    assert not w.workers[1].killed
    w.advance(1.5)
    assert w.workers[1].killed


def test_deliveries_near_the_consumer_timeout_are_given_back_from_the_cache():
    w = world(min_workers=1, max_workers=1, consumer_timeout=100.0)
    w.arrive()
    waiting = w.arrive()
    cached = w.arrive()
    w.advance(89.0)
    assert w.rejected == []
    w.advance(1.5)
    assert w.rejected == [cached.id] and w.workers[1].termed, "the window comes back through TERM"
    w.ask_exit(1)
    assert w.rejected == [cached.id, waiting.id]


def test_exit_when_idle_stops_gracefully_after_a_quiet_spell():
    w = world(exit_when_idle=2.0)
    w.arrive()
    w.advance(1.0)
    w.finish(1)
    w.advance(1.5)
    assert w.router.phase is Phase.DRAINING
    w.die(1, CLEAN)
    assert w.drained == "graceful"


def test_workers_that_cannot_boot_stop_the_master():
    w = World(RouterSettings(max_cache=4, min_workers=1))
    w.start()
    for _ in range(5):
        (wid,) = w.live_workers()
        w.spawned(wid)
        w.die(wid, 3 << 8)
    assert w.fatal and "cannot boot" in w.fatal


def test_a_spawn_the_fork_server_could_not_take_is_not_a_boot_failure():
    w = World(RouterSettings(max_cache=4, min_workers=1))
    w.start()
    for _ in range(10):
        (wid,) = w.live_workers()
        w.workers.pop(wid)
        w.feed(w.router.spawn_failed(wid, w.now))
        w.feed(w.router.fork_server_ready(w.now))
    assert w.fatal is None


def test_hup_replaces_workers_one_by_one():
    w = world(min_workers=2, max_workers=2)
    w.ready_all()
    w.feed(w.router.replace_all(w.now))
    assert w.live_workers() == [1, 2, 3]
    w.ready(3)
    assert w.workers[1].stop_sent
    w.die(1, CLEAN)
    assert w.live_workers() == [2, 3, 4]
    w.ready(4)
    w.die(2, CLEAN)
    assert w.live_workers() == [3, 4] and w.router.retired["replaced"] == 2


def test_ttou_retires_idle_workers_first():
    w = world(min_workers=2, max_workers=3)
    w.ready_all()
    w.arrive()
    w.feed(w.router.resize(-1, w.now))
    assert w.router.max_workers == 2
    idle_stopped = [wid for wid, worker in w.workers.items() if worker.stop_sent]
    assert len(idle_stopped) == 0  # two workers and a ceiling of two: nothing to retire
    w.feed(w.router.resize(-1, w.now))
    assert w.router.max_workers == 2, "never below the floor"


def test_a_failed_write_keeps_what_went_out_whole_for_the_crash_rule():
    """Seen for real: a worker ran a poison message and died; the next frame written to
    it failed. The running message must count its attempt; only the unsent one is free."""
    w = world(min_workers=1, max_workers=1, max_retries=0)
    running, unsent = w.arrive(), w.arrive()
    w.write_fails(1, undelivered=1)
    assert w.router.cached == 1 and w.publishes == {}
    w.die(1, KILLED)
    assert [p.delivery_id for p in w.publishes.values()] == [running.id]
    w.ready_all()
    assert [d.id for d in w.workers[2].holding] == [unsent.id]


def test_workers_dying_with_the_fork_server_are_not_boot_failures():
    w = World(RouterSettings(max_cache=8, min_workers=7, max_workers=7))
    w.start()
    for wid in list(w.workers):
        w.die(wid, None)
    assert w.fatal is None and len(w.live_workers()) == 7


def test_a_worker_asking_to_exit_during_a_graceful_stop_is_not_replaced():
    w = world(min_workers=2, max_workers=2)
    w.ready_all()
    w.arrive()
    w.feed(w.router.stop(w.now))
    (busy,) = w.holding()
    w.ask_exit(busy)
    assert not any(isinstance(a, act.Spawn) for a in w.last)


def test_an_immediate_stop_with_a_worker_that_never_exits_ends_without_spinning():
    w = world(min_workers=1, max_workers=1)
    d = w.arrive()
    w.feed(w.router.stop(w.now))
    w.feed(w.router.stop(w.now))
    for _ in range(12):
        w.advance(1.0)  # World.advance fails if the timer keeps firing in the past
    assert w.drained == "immediate" and w.rejected == [d.id]


def test_a_timeout_kill_does_not_blame_the_message_that_started_after_the_late_one_returned():
    """Seen in review: A times out, the kill is sent, A's result was already on its way;
    B starts and dies with the worker. A is acked, B goes back uncounted."""
    w = world(min_workers=1, max_workers=1, timeout=2.0)
    a, b = w.arrive(), w.arrive()
    w.advance(2.1)
    assert w.workers[1].killed
    w.finish(1)  # A's result, read after the kill went out
    w.die(1, KILLED)
    assert w.publishes == {} and w.router.counters.crashes == 0
    w.take_acks()
    assert w.acked == [a.id]
    w.ready_all()
    assert [d.id for d in w.workers[2].holding] == [b.id]


def test_no_window_behind_a_handler_that_runs_long():
    w = world(min_workers=2, max_workers=2, max_cache=20)
    w.ready_all()
    for _ in range(2):
        w.arrive()
    for _ in range(10):  # learn 10 ms handlers
        for wid in (1, 2):
            w.finish(wid, took=0.01)
            w.arrive()
    w.advance(1.0)  # both handlers now run 100x longer than usual
    w.arrive()
    assert all(len(h) == 1 for h in w.holding().values()) and w.router.cached >= 1


def test_a_window_that_term_cannot_free_is_killed_before_the_consumer_timeout():
    w = world(min_workers=1, max_workers=1, consumer_timeout=100.0)
    running = w.arrive()
    waiting = w.arrive()
    w.advance(90.0)
    assert w.workers[1].termed  # 90%: TERM asks for the window back
    w.advance(4.9)
    assert not w.workers[1].killed, "the handler still runs; TERM is waited for until 95%"
    w.advance(0.2)
    assert w.workers[1].killed
    w.die(1, KILLED)
    (publish,) = w.publishes.values()
    assert publish.delivery_id == running.id, "the hung handler counts a failed attempt (rule 4)"
    assert w.rejected == [waiting.id], "the unstarted one goes straight back to the broker"
    assert w.router.cached == 0 and w.router.counters.crashes == 1
    w.ready_all()
    assert w.holding() == {}, "nothing near the consumer timeout is handed to the new worker"


def test_a_late_tick_past_95_percent_kills_the_window_in_the_same_pass():
    w = world(min_workers=1, max_workers=1, consumer_timeout=100.0)
    running = w.arrive()
    waiting = w.arrive()
    w.advance(97.0)  # the timer fired late: past the TERM and the kill deadlines at once
    assert w.workers[1].killed, "the kill may not wait for another tick"
    w.die(1, KILLED)
    assert [p.delivery_id for p in w.publishes.values()] == [running.id]
    assert w.rejected == [waiting.id]


def test_a_handler_killed_for_its_window_counts_an_attempt_only_if_it_ran_long_itself():
    w = world(min_workers=1, max_workers=1, consumer_timeout=100.0)
    w.arrive()
    second = w.arrive()
    third = w.arrive()
    w.advance(48.0)
    w.finish(1)  # the second starts; the third (48 s old) joins its window
    assert [d.id for d in w.workers[1].holding] == [second.id, third.id]
    w.advance(47.0)  # 95 s: the third nears the timeout behind a handler 47 s young
    assert w.workers[1].killed
    w.die(1, KILLED)
    assert w.publishes == {}, "the second was not hung: it goes back uncounted"
    assert sorted(w.rejected) == sorted([second.id, third.id]) and w.router.counters.crashes == 0


def test_an_old_delivery_waits_for_an_idle_worker_not_in_a_window():
    w = world(min_workers=1, max_workers=1, consumer_timeout=100.0)
    w.arrive()
    w.arrive()
    old = w.arrive()
    w.advance(55.0)
    w.finish(1)  # the window's message starts; `old` is past half the consumer timeout
    assert len(w.workers[1].holding) == 1 and w.router.cached == 1
    w.finish(1)
    assert [d.id for d in w.workers[1].holding] == [old.id]


def test_a_window_message_given_back_by_a_dying_worker_near_the_timeout_goes_to_the_broker():
    w = world(min_workers=1, max_workers=1, consumer_timeout=100.0)
    w.arrive()
    waiting = w.arrive()
    w.advance(90.0)
    assert w.workers[1].termed and not w.workers[1].killed
    w.advance(2.0)
    w.die(1, KILLED)  # it crashes before the 95% kill
    assert w.rejected == [waiting.id], "put back in the cache it would reach a worker past the timeout"
    assert w.router.cached == 0


def test_an_outage_is_not_idleness():
    w = world(exit_when_idle=2.0)
    w.lose_channel(recover=False)
    w.advance(10.0)  # the broker is away: no message could have come
    assert w.router.phase is Phase.RUNNING
    w.recover()
    w.advance(2.5)
    assert w.router.phase is Phase.DRAINING


def test_the_idle_clock_starts_when_consuming_starts():
    w = World(RouterSettings(max_cache=4, min_workers=1, exit_when_idle=1.0))
    w.start(consuming=False)
    w.advance(5.0)  # the floor boots slowly: no message could have come
    assert w.router.phase is Phase.RUNNING
    w.ready_all()
    w.feed(w.router.consuming(w.now))
    w.advance(0.5)
    assert w.router.phase is Phase.RUNNING
    w.advance(0.6)
    assert w.router.phase is Phase.DRAINING


def test_a_handler_still_running_near_the_consumer_timeout_is_named_once(caplog):
    w = world(min_workers=1, max_workers=1, consumer_timeout=100.0)
    running = w.arrive()
    w.advance(89.0)
    assert "still runs" not in caplog.text
    w.advance(1.5)
    warnings = [r.getMessage() for r in caplog.records if "still runs" in r.getMessage()]
    assert len(warnings) == 1 and f"delivery {running.id} " in warnings[0], warnings
    w.advance(5.0)
    assert sum("still runs" in r.getMessage() for r in caplog.records) == 1, "once per message"
    w.finish(1)
    w.take_acks()
    assert w.acked == [running.id]


def test_consuming_pauses_above_the_byte_bound_and_resumes_at_half_of_it():
    w = world(min_workers=1, max_workers=1, max_cache=8, max_cache_bytes=1000)
    first = w.arrive(body=b"a" * 400)
    w.arrive(body=b"b" * 400)
    assert not w.paused
    w.arrive(body=b"c" * 400)  # 1200 held
    assert w.paused and w.pauses == 1
    w.arrive(body=b"d" * 400)  # still on the way when the cancel went out: taken, no second pause
    assert w.pauses == 1
    w.finish(1)
    w.take_acks()
    assert w.acked == [first.id]
    w.finish(1)  # 800 held: still above half
    assert w.paused
    w.finish(1)  # 400 held
    assert not w.paused, "consuming again at half the bound"
    w.finish(1)
    w.take_acks()
    assert len(w.acked) == 4


def test_a_lost_channel_ends_a_pause_the_recovery_consumes_anew():
    w = world(min_workers=1, max_workers=1, max_cache=8, max_cache_bytes=130)
    for _ in range(3):
        w.arrive(body=b"x" * 60)
    assert w.paused
    w.lose_channel()  # the cached one goes back; the worker's two stay held (120 bytes)
    assert not w.router._paused and not w.paused
    w.arrive(body=b"y" * 10)
    assert not w.paused


def test_a_pause_neither_starts_the_idle_stop_nor_counts_an_old_channels_bytes():
    w = world(min_workers=1, max_workers=1, max_cache=8, max_cache_bytes=100, exit_when_idle=2.0)
    for _ in range(3):
        w.arrive(body=b"x" * 60)
    assert w.paused
    w.advance(5.0)  # nothing arrives while paused: that is not an idle queue
    assert w.router.phase is Phase.RUNNING
    for _ in range(3):
        w.finish(1)
    assert not w.paused
    w.advance(1.5)  # the idle clock restarted at the resume, not at the last arrival
    assert w.router.phase is Phase.RUNNING
    w.arrive(body=b"y" * 90)
    w.lose_channel()  # its 90 bytes are the broker's again; the new channel starts at zero
    w.arrive(body=b"z" * 60)
    assert not w.paused
