"""Property test: random interleavings of every router event, with the delivery
guarantees checked at each action (`World`) and after each step (below):

- nothing lost: every delivery the broker still holds unacked on the current channel is
  somewhere in the router (cache, a worker's window, a pending republish);
- nothing settled twice, no ack before the handler returned (or the republish was
  confirmed), no settlement of an old channel generation, nothing sent to a worker that
  is not ready or is on its way out, the cache within --max-cache (all in `World`);
- at the end, a stop drains everything: every delivery of the current channel was acked
  or given back, and the router says it is done.
"""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from speed_gevent.policy import Failure, FailureKind
from speed_gevent.router import Phase, RouterSettings
from tests.unit.router_world import CLEAN, KILLED, World

EXAMPLES = int(os.environ.get("SPEED_GEVENT_PROPERTY_EXAMPLES", "1000"))

FAILURES = [
    None,
    None,
    Failure(FailureKind.ERROR, "ValueError", "boom"),
    Failure(FailureKind.REJECT, "Reject", "no"),
    Failure(FailureKind.RETRY, "Retry", "later"),
]
STATUSES = [CLEAN, KILLED, 3 << 8, None]


def pick(items, index):
    items = sorted(items)
    return items[index % len(items)]


class RouterMachine(RuleBasedStateMachine):
    world: World

    @initialize(
        max_cache=st.integers(1, 8),
        min_workers=st.integers(0, 2),
        extra=st.integers(0, 3),
        timeout=st.sampled_from([None, 2.0]),
        max_messages=st.sampled_from([None, 3]),
        max_retries=st.integers(0, 2),
        exit_when_idle=st.sampled_from([None, 5.0]),
        max_cache_bytes=st.sampled_from([None, 10, 25]),
    )
    def start(
        self,
        max_cache,
        min_workers,
        extra,
        timeout,
        max_messages,
        max_retries,
        exit_when_idle,
        max_cache_bytes,
    ):
        options = RouterSettings(
            max_cache=max_cache,
            min_workers=min_workers,
            max_workers=max(1, min_workers) + extra,
            max_retries=max_retries,
            max_idle=3.0,
            max_messages=max_messages,
            timeout=timeout,
            graceful_timeout=10.0,
            consumer_timeout=60.0,
            exit_when_idle=exit_when_idle,
            max_cache_bytes=max_cache_bytes,
        )
        self.world = World(options)
        self.world.start()

    # -- the broker ---------------------------------------------------------------------

    @precondition(lambda self: self.world.can_arrive())
    @rule(attempt=st.sampled_from([None, 1, 2, 3]), bad=st.booleans(), size=st.integers(0, 12))
    def arrive(self, attempt, bad, size):
        headers = {"x-speed-attempt": attempt} if attempt else None
        self.world.arrive(headers, problem="unframeable" if bad and attempt == 3 else None, body=b"x" * size)

    @precondition(lambda self: self.world.publishes)
    @rule(index=st.integers(0, 50), ok=st.booleans())
    def confirm(self, index, ok):
        self.world.confirm(pick(self.world.publishes, index), ok)

    @rule()
    def take_acks(self):
        self.world.take_acks()

    @rule()
    def lose_channel(self):
        self.world.lose_channel()

    # -- the workers -----------------------------------------------------------------------

    @precondition(lambda self: any(w.pid is None for w in self.world.workers.values()))
    @rule(index=st.integers(0, 50), fail=st.booleans())
    def spawned_or_failed(self, index, fail):
        wid = pick([w.worker_id for w in self.world.workers.values() if w.pid is None], index)
        if fail:
            self.world.workers.pop(wid)
            self.world.feed(self.world.router.spawn_failed(wid, self.world.now))
        else:
            self.world.spawned(wid)

    @precondition(lambda self: any(not w.ready for w in self.world.workers.values()))
    @rule(index=st.integers(0, 50))
    def ready(self, index):
        self.world.ready(pick([w.worker_id for w in self.world.workers.values() if not w.ready], index))

    @precondition(lambda self: self.world.holding())
    @rule(index=st.integers(0, 50), failure=st.sampled_from(FAILURES))
    def finish(self, index, failure):
        self.world.finish(pick(self.world.holding(), index), failure)

    @precondition(lambda self: self.world.holding())
    @rule(index=st.integers(0, 50))
    def bad_result(self, index):
        self.world.broken(pick(self.world.holding(), index))

    @precondition(lambda self: self.world.holding())
    @rule(index=st.integers(0, 50), undelivered=st.integers(0, 3))
    def write_fails(self, index, undelivered):
        self.world.write_fails(pick(self.world.holding(), index), undelivered)

    @precondition(lambda self: self.world.workers)
    @rule(index=st.integers(0, 50), failure=st.sampled_from(FAILURES))
    def ask_exit(self, index, failure):
        self.world.ask_exit(pick(self.world.workers, index), failure)

    @precondition(lambda self: any(w.termed and not w.exit_asked for w in self.world.workers.values()))
    @rule(index=st.integers(0, 50), failure=st.sampled_from(FAILURES))
    def termed_worker_leaves(self, index, failure):
        termed = [w.worker_id for w in self.world.workers.values() if w.termed and not w.exit_asked]
        self.world.ask_exit(pick(termed, index), failure)

    @precondition(lambda self: self.world.workers)
    @rule(index=st.integers(0, 50), status=st.sampled_from(STATUSES))
    def die(self, index, status):
        self.world.die(pick(self.world.workers, index), status)

    @rule()
    def fork_server_ready(self):
        self.world.feed(self.world.router.fork_server_ready(self.world.now))

    # -- operators and time ------------------------------------------------------------------

    @rule()
    def stop(self):
        self.world.feed(self.world.router.stop(self.world.now))

    @rule(delta=st.sampled_from([-1, 1]))
    def resize(self, delta):
        self.world.feed(self.world.router.resize(delta, self.world.now))

    @rule()
    def replace_all(self):
        self.world.feed(self.world.router.replace_all(self.world.now))

    @rule(seconds=st.sampled_from([0.1, 1.0, 2.5, 20.0]))
    def advance(self, seconds):
        self.world.advance(seconds)

    @rule(seconds=st.sampled_from([0.5, 4.0]), big=st.booleans())
    def patrol(self, seconds, big):
        self.world.advance(seconds)
        memory = {wid: (10**9 if big else 10**6) for wid in self.world.workers}
        self.world.feed(self.world.router.patrol(self.world.now, memory))

    # -- invariants ------------------------------------------------------------------------------

    @invariant()
    def nothing_lost(self):
        world = self.world
        if world.fatal:
            return
        tracked = world.tracked_ids()
        for (generation, _tag), d in world.outstanding.items():
            if generation == world.generation:
                assert d.id in tracked, f"{d!r} is unacked on the broker but the router lost it"

    @invariant()
    def handlers_past_timeout_are_killed(self):
        """By the model's own clock: a handler that started (by what the worker was sent
        and returned) more than --timeout ago has been killed."""
        world = self.world
        timeout = world.settings.timeout
        if world.fatal or not timeout:
            return
        for worker in world.workers.values():
            if worker.holding and worker.head_since is not None and not worker.killed:
                assert world.now < worker.head_since + timeout, f"{worker} runs past --timeout unkilled"

    @invariant()
    def bytes_held_are_the_open_bodies(self):
        """The byte count the pause decides on is exactly the bodies not settled yet; a
        running master over the bound has paused consuming."""
        world, router = self.world, self.world.router
        assert router._open.bytes == sum(len(d.body) for d in router._open.values())
        current = router._open.bytes_of(router.generation)
        assert current == sum(len(d.body) for d in router._open.values() if d.generation == router.generation)
        bound = world.settings.max_cache_bytes
        if bound and router.phase is Phase.RUNNING and router._consuming and current > bound:
            assert world.paused

    @invariant()
    def workers_agree(self):
        world = self.world
        if world.fatal:
            return
        assert set(w.worker_id for w in world.router.workers()) <= set(world.workers)

    def teardown(self):
        world = getattr(self, "world", None)
        if world is None or world.fatal:
            return
        world.settle_everything()
        assert world.drained is not None, "a graceful stop never finished"
        assert world.router.phase is Phase.STOPPED
        assert world.router.unsettled == 0
        left = [d for (g, _), d in world.outstanding.items() if g == world.generation]
        assert left == [], f"unsettled at the end: {left}"


RouterMachine.TestCase.settings = settings(
    max_examples=EXAMPLES,
    stateful_step_count=60,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestRouterProperties = RouterMachine.TestCase
