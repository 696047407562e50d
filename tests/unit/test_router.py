"""The router alone: scenarios of one delivery's trip and of the pool around it.

Every action goes through `World`, which checks the delivery guarantees as it goes.
"""

from __future__ import annotations

import pytest

from speed_gevent import actions as act
from speed_gevent.policy import Failure, FailureKind
from speed_gevent.router import Phase, RouterSettings
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
    assert w.holding() == {1: [first.id]} and w.router.cached == 1


def test_the_pool_never_grows_past_max_workers():
    w = world(min_workers=1, max_workers=2)
    for _ in range(8):
        w.arrive()
    w.ready_all()
    assert len(w.live_workers()) == 2 and w.router.cached == 6


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


def test_a_refused_republish_gives_the_original_back():
    w = world()
    d = w.arrive()
    w.finish(1, error())
    (publish_id,) = w.publishes
    w.confirm(publish_id, ok=False)
    assert w.rejected == [d.id] and w.take_acks() == []


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
    assert w.feed(w.router.write_failed(1, w.now)) == []
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
    cached = w.arrive()
    w.lose_channel()
    assert w.router.cached == 0, "cached deliveries of the old channel are the broker's again"
    w.finish(1)  # the old delivery's handler returns: not acked on the new channel
    assert w.take_acks() == []
    fresh = w.arrive()
    w.finish(1)
    w.take_acks()
    assert w.acked == [fresh.id] and set(w.redelivered) == {running.id, cached.id}


def test_a_republish_pending_when_the_channel_is_lost_is_dropped():
    w = world()
    w.arrive()
    w.finish(1, error())
    w.lose_channel()
    assert w.router.unsettled == 0


# -- retiring, stopping ------------------------------------------------------------------------


def test_a_worker_asking_to_exit_gets_nothing_more_and_is_stopped_when_free():
    w = world(min_workers=1, max_workers=1)
    d = w.arrive()
    w.ask_exit(1)
    assert not w.workers[1].stop_sent
    w.finish(1)
    assert w.workers[1].stop_sent and w.take_acks()
    assert d.id in w.acked


def test_graceful_stop_returns_the_cache_and_lets_handlers_finish():
    w = world(min_workers=2, max_workers=2)
    w.ready_all()
    busy = [w.arrive(), w.arrive()]
    cached = w.arrive()
    actions = w.feed(w.router.stop(w.now))
    assert act.CancelConsumers() in actions and w.rejected == [cached.id]
    late = w.arrive()  # in flight before the cancel took effect
    assert w.rejected == [cached.id, late.id]
    for wid in list(w.holding()):
        w.finish(wid)
    w.take_acks()
    assert sorted(w.acked) == sorted(d.id for d in busy)
    for wid in list(w.workers):
        assert w.workers[wid].stop_sent
        w.die(wid, CLEAN)
    assert w.drained == "graceful" and w.router.counters.requeued == 2


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
    w.advance(89.0)
    assert w.rejected == []
    w.advance(1.5)
    assert w.rejected == [waiting.id]


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
