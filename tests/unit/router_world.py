"""A model of everything around the router (the broker, the workers, the clock) that
feeds it events and checks every action it returns against the delivery guarantees.

Used by the router's scenario tests and by its property test. The checks raise
`Violation` at the action that breaks a rule, so a failing example points at it:
- a delivery is settled (ack or reject) at most once, only while the broker still holds
  it unacked, and only on the channel generation it came from;
- an ack (single or multiple) covers only deliveries whose handler returned, or whose
  republish the broker confirmed;
- nothing is sent to a worker that is not ready, was told to stop or to leave (TERM),
  was killed or asked to exit; a worker gets a second message only while no worker is
  idle, and never more than MAX_WINDOW;
- a StopFrame goes only to a worker that holds nothing;
- the cache never holds more than --max-cache.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from speed_gevent import actions as act
from speed_gevent.delivery import Delivery
from speed_gevent.policy import Failure
from speed_gevent.router import MAX_WINDOW, MIN_TICK, Phase, Router, RouterSettings

KILLED = 9  # waitpid status of a process killed by SIGKILL
CLEAN = 0


class Violation(AssertionError):
    """The router broke a delivery guarantee."""


@dataclass
class ModelWorker:
    worker_id: int
    pid: int | None = None
    ready: bool = False
    stop_sent: bool = False
    killed: bool = False
    exit_asked: bool = False
    termed: bool = False
    withdrawn: bool = False  # its writes failed or it sent nonsense: the router ends it
    holding: deque[Delivery] = field(default_factory=deque)
    head_since: float | None = None  # when the handler of holding[0] started, by the model's clock

    @property
    def can_take(self) -> bool:
        return self.ready and not (
            self.stop_sent or self.killed or self.exit_asked or self.termed or self.withdrawn
        )


class World:
    def __init__(self, settings: RouterSettings, now: float = 100.0) -> None:
        self.settings = settings
        self.now = now
        self.router = Router(settings, now)
        self.generation = 1
        self._next_tag = 0
        self._next_id = 0
        self.outstanding: dict[tuple[int, int], Delivery] = {}  # the broker's unacked, by (gen, tag)
        self.may_ack: set[int] = set()  # delivery ids whose handler returned or republish confirmed
        self.workers: dict[int, ModelWorker] = {}
        self.publishes: dict[int, act.Publish] = {}
        self.acked: list[int] = []  # delivery ids
        self.rejected: list[int] = []
        self.confirmed: list[act.Publish] = []
        self.redelivered: list[int] = []  # ids the broker took back with a lost channel
        self.sent: list[tuple[int, int]] = []  # (worker id, delivery id)
        self.handled: list[int] = []  # delivery ids whose handler returned (any outcome)
        self.exits: list[act.WorkerExited] = []
        self.timer: float | None = None
        self.drained: str | None = None
        self.fatal: str | None = None
        self.acks_waiting = False
        self.last: list[act.Action] = []
        self.started: set[int] = set()  # ids whose handler started (model's view)
        self.failed_results: set[int] = set()  # ids whose handler raised
        self.invalid: set[int] = set()
        self.paused = False  # PauseConsuming seen, ResumeConsuming not yet
        self.pauses = 0
        self.feed(self.router.channel_opened(self.generation))

    # -- feeding -----------------------------------------------------------------------

    def feed(self, actions: list[act.Action]) -> list[act.Action]:
        self.last = actions
        for action in actions:
            self._check(action)
        if len(self.router._cache) > self.settings.max_cache:
            raise Violation(f"cache holds {len(self.router._cache)} > {self.settings.max_cache}")
        return actions

    def _check(self, action: act.Action) -> None:  # noqa: C901 - one branch per action
        if isinstance(action, act.Spawn):
            if action.worker_id in self.workers:
                raise Violation(f"worker id {action.worker_id} spawned twice")
            if self.router.phase is not Phase.RUNNING:
                raise Violation(f"worker {action.worker_id} spawned while {self.router.phase.value}")
            self.workers[action.worker_id] = ModelWorker(action.worker_id)
        elif isinstance(action, act.SendMessage):
            self._check_send(action)
        elif isinstance(action, act.StopWorker):
            worker = self.workers.get(action.worker_id)
            if worker is not None:
                if worker.holding:
                    raise Violation(f"StopFrame to worker {action.worker_id} holding {list(worker.holding)}")
                worker.stop_sent = True
        elif isinstance(action, act.KillWorker):
            worker = self.workers.get(action.worker_id)
            if worker is not None:
                worker.killed = True
        elif isinstance(action, act.TermWorker):
            worker = self.workers.get(action.worker_id)
            if worker is not None:
                worker.termed = True
        elif isinstance(action, act.Reject):
            self._settle(action.delivery, "reject")
            self.rejected.append(action.delivery.id)
        elif isinstance(action, act.Publish):
            if action.delivery_id not in self.failed_results | self.invalid | self.started:
                raise Violation(f"{action} counts an attempt for a message whose handler never started")
            self.publishes[action.publish_id] = action
        elif isinstance(action, act.AcksReady):
            self.acks_waiting = True
        elif isinstance(action, act.SetTimer):
            if action.at < self.now:
                raise Violation(f"timer set in the past ({action.at} < {self.now}): the master would spin")
            self.timer = action.at
        elif isinstance(action, act.WorkerExited):
            self.exits.append(action)
        elif isinstance(action, act.Drained):
            if self.drained is not None:
                raise Violation("drained twice")
            self.drained = action.how
        elif isinstance(action, act.Fatal):
            self.fatal = action.reason
        elif isinstance(action, act.PauseConsuming):
            if self.paused:
                raise Violation("consuming paused twice")
            self.paused = True
            self.pauses += 1
        elif isinstance(action, act.ResumeConsuming):
            if not self.paused:
                raise Violation("consuming resumed while not paused")
            bound = self.settings.max_cache_bytes or 0
            held = self.router._open.bytes_of(self.router.generation)
            if held > bound // 2:
                raise Violation(f"resumed holding {held} bytes, above half of {bound}")
            self.paused = False

    def _check_send(self, action: act.SendMessage) -> None:
        worker = self.workers.get(action.worker_id)
        d = action.delivery
        if worker is None:
            raise Violation(f"{d!r} sent to unknown worker {action.worker_id}")
        if not worker.can_take:
            raise Violation(f"{d!r} sent to worker {worker} that cannot take it")
        if worker.holding:
            idle = [w.worker_id for w in self.workers.values() if w.can_take and not w.holding]
            if idle:
                raise Violation(f"{d!r} sent to busy worker {action.worker_id} while {idle} are idle")
            if len(worker.holding) >= MAX_WINDOW:
                raise Violation(f"{d!r} sent to worker {action.worker_id} past its window")
        if (d.generation, d.tag) not in self.outstanding:
            raise Violation(f"{d!r} sent to a worker but it is not outstanding on the broker")
        for other in self.workers.values():
            if any(h.id == d.id for h in other.holding):
                raise Violation(
                    f"{d!r} sent to worker {action.worker_id} while worker {other.worker_id} holds it"
                )
        if not worker.holding:
            worker.head_since = self.now
            self.started.add(d.id)
        worker.holding.append(d)
        self.sent.append((action.worker_id, d.id))

    def _settle(self, d: Delivery, how: str) -> None:
        if d.generation != self.generation:
            raise Violation(f"{how} of {d!r} from old generation (current {self.generation})")
        if self.outstanding.pop((d.generation, d.tag), None) is None:
            raise Violation(f"{how} of {d!r}, which is not outstanding (settled twice?)")

    def take_acks(self) -> list[act.Ack]:
        """What the consumer greenlet does: take the acks and write them."""
        self.acks_waiting = False
        acks = self.router.take_acks()
        for ack in acks:
            if ack.generation != self.generation:
                raise Violation(f"ack {ack} on generation {self.generation}")
            if (ack.generation, ack.tag) not in self.outstanding:
                raise Violation(f"ack {ack} names a tag that is not outstanding")
            if ack.multiple:
                covered = sorted(
                    key for key in self.outstanding if key[0] == ack.generation and key[1] <= ack.tag
                )
            else:
                covered = [(ack.generation, ack.tag)]
            for key in covered:
                d = self.outstanding[key]
                if d.id not in self.may_ack:
                    raise Violation(f"ack {ack} covers {d!r}, whose handler did not return")
                del self.outstanding[key]
                self.acked.append(d.id)
        return acks

    # -- events ----------------------------------------------------------------------------

    def start(self, consuming: bool = True) -> list[act.Action]:
        """Start the router and, unless told otherwise, say that basic_consume went out."""
        actions = self.feed(self.router.start(self.now))
        if consuming:
            actions += self.feed(self.router.consuming(self.now))
        return actions

    def can_arrive(self) -> bool:
        """The broker's prefetch: never more unacked than --max-cache on this channel."""
        mine = sum(1 for key in self.outstanding if key[0] == self.generation)
        return mine < self.settings.max_cache and self.router.phase is not Phase.STOPPED

    def arrive(
        self, headers: dict[str, Any] | None = None, problem: str | None = None, body: bytes = b"x"
    ) -> Delivery:
        self._next_tag += 1
        self._next_id += 1
        properties = {"application_headers": headers} if headers else {}
        d = Delivery(self._next_id, self.generation, self._next_tag, "q", "", "q", False, body, properties,
                     self.now, problem)  # fmt: skip
        self.outstanding[(d.generation, d.tag)] = d
        if problem is not None:
            self.invalid.add(d.id)
        self.feed(self.router.delivery_arrived(d, self.now))
        return d

    def spawned(self, worker_id: int, pid: int | None = None) -> None:
        worker = self.workers[worker_id]
        worker.pid = pid or 1000 + worker_id
        self.feed(self.router.worker_spawned(worker_id, worker.pid))

    def ready(self, worker_id: int) -> None:
        worker = self.workers[worker_id]
        if worker.pid is None:
            self.spawned(worker_id)
        worker.ready = True
        self.feed(self.router.worker_ready(worker_id, self.now))

    def ready_all(self) -> None:
        for worker in list(self.workers.values()):
            if not worker.ready:
                self.ready(worker.worker_id)

    def finish(self, worker_id: int, failure: Failure | None = None, took: float = 0.0) -> Delivery:
        """The worker's handler for its oldest message returns after `took` seconds."""
        worker = self.workers[worker_id]
        d = worker.holding.popleft()
        self.handled.append(d.id)
        if failure is None:
            self.may_ack.add(d.id)
        else:
            self.failed_results.add(d.id)
        worker.head_since = self.now if worker.holding else None
        if worker.holding:
            self.started.add(worker.holding[0].id)
        self.feed(self.router.worker_result(worker_id, d.id, failure, self.now, self.now - took, self.now))
        return d

    def die(self, worker_id: int, status: int | None = KILLED) -> None:
        self.workers.pop(worker_id)
        self.feed(self.router.worker_gone(worker_id, status, self.now))

    def confirm(self, publish_id: int, ok: bool = True) -> None:
        publish = self.publishes.pop(publish_id)
        if ok:
            self.may_ack.add(publish.delivery_id)
            self.confirmed.append(publish)
        self.feed(self.router.publish_done(publish_id, ok, "" if ok else "refused", self.now))

    def lose_channel(self, recover: bool = True) -> None:
        """The channel breaks; with `recover` the master gets a new one and consumes again."""
        for key in [key for key in self.outstanding if key[0] == self.generation]:
            self.redelivered.append(self.outstanding.pop(key).id)
        self.publishes.clear()  # never confirmed on a lost channel
        self.feed(self.router.channel_lost(self.now))
        self.paused = False  # the consumers went with the channel
        if recover:
            self.recover()

    def recover(self) -> None:
        self.generation += 1
        self.feed(self.router.channel_opened(self.generation))
        self.feed(self.router.consuming(self.now))

    def write_fails(self, worker_id: int, undelivered: int = 1) -> None:
        """A write fails: the newest `undelivered` message frames never reached the worker;
        the ones before them did (its handler may be running the first)."""
        worker = self.workers[worker_id]
        lost = [worker.holding.pop().id for _ in range(min(undelivered, len(worker.holding)))]
        worker.withdrawn = True
        self.feed(self.router.write_failed(worker_id, lost, self.now))

    def broken(self, worker_id: int) -> None:
        self.workers[worker_id].withdrawn = True
        self.feed(self.router.worker_result(worker_id, -1, None, self.now))

    def ask_exit(self, worker_id: int, failure: Failure | None = None) -> None:
        """TERM (from the router or from outside): a real worker finishes the message it
        runs, then asks to exit and starts nothing more; what it holds then, including
        anything the router sent before it heard of the exit, comes back."""
        worker = self.workers[worker_id]  # a TERM from outside: the router learns of it below
        if worker.holding and worker.ready and not worker.killed:
            self.finish(worker_id, failure)
        worker.exit_asked = True
        worker.holding.clear()
        self.feed(self.router.exit_requested(worker_id, "TERM received", self.now))

    def advance(self, seconds: float) -> None:
        """Move the clock; fire the router's timer if it came due."""
        self.now += seconds
        for _ in range(50):
            if self.timer is None or self.timer > self.now:
                return
            self.timer = None
            self.feed(self.router.tick(self.now))
            if any(isinstance(a, act.SetTimer) and a.at == self.now + MIN_TICK for a in self.last):
                raise Violation(
                    f"a deadline due at {self.now} was not acted on (only MIN_TICK kept it from spinning)"
                )
        raise Violation("the timer keeps firing at the same time: the master would spin")

    def tick(self) -> None:
        self.feed(self.router.tick(self.now))

    def advance_until(self, done: Callable[[], bool], limit: float, step: float = 0.1) -> None:
        """Move the clock to each timer in turn (or by `step` with none set) until `done()`;
        a Violation after `limit` seconds."""
        start = self.now
        while not done():
            if self.now - start > limit:
                raise Violation(f"not done after {limit}s")
            self.advance(self.timer - self.now if self.timer is not None and self.timer > self.now else step)

    # -- views --------------------------------------------------------------------------------

    def tracked_ids(self) -> set[int]:
        """Deliveries the router still answers for: unsettled, or acked and not taken yet."""
        waiting = set(self.router._finished)
        acked_not_taken = {
            d.id for (g, tag), d in self.outstanding.items() if g == self.generation and tag in waiting
        }
        return set(self.router._open) | acked_not_taken

    def holding(self) -> dict[int, list[int]]:
        return {wid: [d.id for d in w.holding] for wid, w in self.workers.items() if w.holding}

    def live_workers(self) -> list[int]:
        return sorted(self.workers)

    def settle_everything(self, rounds: int = 200) -> None:
        """Drive the world to a graceful stop: every handler returns, every publish is
        confirmed, every stopped or killed worker exits. Used to check nothing was lost."""
        if self.router.phase in (Phase.STARTING, Phase.RUNNING):
            self.feed(self.router.stop(self.now))
        for _ in range(rounds):
            if self.drained is not None or self.fatal is not None:
                break
            self.ready_all()
            for worker in list(self.workers.values()):
                if worker.termed and not worker.exit_asked and not worker.killed:
                    self.ask_exit(worker.worker_id)
                elif worker.holding and not worker.killed:
                    self.finish(worker.worker_id)
            for publish_id in list(self.publishes):
                self.confirm(publish_id)
            self.take_acks()
            for worker in list(self.workers.values()):
                if worker.stop_sent and not worker.holding:
                    self.die(worker.worker_id, CLEAN)
                elif worker.killed:
                    self.die(worker.worker_id, KILLED)
            self.advance(1.0)
        self.take_acks()
