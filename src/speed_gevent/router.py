"""`Router`: one delivery's whole trip, decided in one synchronous, sans-IO object.

Broker → cache → worker → result → ack, retry or dead letter; and the pool's shape
around it (spawn on backlog, retire idle, recycle, replace, stop). Events go in as
method calls (`delivery_arrived`, `worker_result`, `worker_gone`, `tick(now)`, ...),
each returning the actions the master must carry out (`actions.py`). No gevent, kombu
or OS call lives here, so tests drive it alone (`tests/unit/test_router*.py`), including a
property test over random interleavings of every event.

Rules kept here and nowhere else:
- a delivery is settled (acked, rejected or republished-then-acked) exactly once, and
  only on the channel generation it came from: after a channel is lost, its deliveries
  are the broker's again and are never settled on the next one;
- an ack names only deliveries whose handler returned (or whose republish the broker
  confirmed); `take_acks` turns finished tags into one `multiple=True` ack over the
  finished prefix plus single acks, and is called by the consumer greenlet right after it
  wrote every reject queued before, so a multiple-ack never covers a pending reject;
- nothing is sent to a worker that is retiring, stopping or asked to exit (rule 5);
- idle workers are handed out most-recently-idle first (a stack), so under a light load
  the spare workers really stay idle and retire after `--max-idle`;
- a worker holds an ordered window (`WorkerSlot.held`); today the window is one message.
  When a worker dies, the message it was running counts one failed attempt; messages
  it held but had not started go back to the front of the cache, uncounted.
"""

from __future__ import annotations

import datetime as dt
import logging
import math
from collections import Counter
from collections.abc import Collection, Iterable
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from .acks import AckTracker
from .actions import (
    Ack,
    AcksReady,
    Action,
    CancelConsumers,
    Drained,
    Fatal,
    KillWorker,
    PauseConsuming,
    Publish,
    Reject,
    ResumeConsuming,
    SendMessage,
    SetTimer,
    Spawn,
    StopWorker,
    TermWorker,
    WorkerExited,
)
from .backoff import RefusalBackoff, delay_queue, ladder, step_after, step_for
from .cache import MessageCache, Unsettled
from .delivery import Delivery
from .patrol import Limits, Retire, RetireReason, SpawnGuard, WorkerView, plan, workers_to_spawn
from .patrol import Spawn as PlanSpawn
from .policy import (
    Action as Verdict,
)
from .policy import (
    Decision,
    Failure,
    FailureKind,
    dead_letter_headers,
    dead_letter_queue,
    decide,
    describe_exit,
    killed_by_signal,
    retry_headers,
)
from .stats import Counters
from .workerproc import InFlight, WorkerSlot, WorkerState

logger = logging.getLogger("speed_gevent.router")

#: Share of --consumer-timeout a delivery may stay unstarted before it is given back, and
#: before a worker TERMed to free its window (its handler still running) is killed.
CACHE_AGE_LIMIT = 0.9
WINDOW_AGE_LIMIT = 0.95
#: Share of the consumer timeout past which a delivery is no longer put in a window (it
#: waits in the cache for an idle worker), and a handler killed to free a window behind it
#: counts a failed attempt (it ran that long itself: hung, not merely unlucky).
LATE_SHARE = 0.5
#: Acks wait (a few milliseconds at most) until 1/ACK_BATCH_SHARE of --max-cache is finished.
ACK_BATCH_SHARE = 4
#: Window per worker: while no worker is idle, a worker may hold this many messages, so it
#: never waits a round trip for its next one: enough to cover WINDOW_BUDGET seconds of its
#: handler time (at least 2, at most MAX_WINDOW, and never more than its share of the cache).
WINDOW_BUDGET = 0.002
MAX_WINDOW = 8
#: A handler running this many times longer than average takes no more into its window.
STALL_FACTOR = 4
#: Weight of the newest handler time in the running average the window follows.
HANDLER_TIME_WEIGHT = 0.2
#: The shortest time between two ticks, in seconds.
MIN_TICK = 0.001
#: Seconds workers get to exit after an immediate stop before they are killed, and the
#: master after that before it stops waiting for their exit reports.
STOP_GRACE = 5.0


@dataclass(frozen=True)
class RouterSettings:
    """The options the router decides with (a subset of `config.Settings`)."""

    max_cache: int
    min_workers: int = 1
    max_workers: int = 2
    max_retries: int = 3
    max_idle: float | None = 60.0
    max_worker_memory: int | None = None
    max_messages: int | None = None
    timeout: float | None = None
    graceful_timeout: float = 30.0
    consumer_timeout: float = 1800.0
    exit_when_idle: float | None = None
    max_cache_bytes: int | None = None
    retry_delay: float = 0.0  #: first step of the retry ladder (0: retries at once)
    retry_delay_max: float = 3600.0
    dead_letter_queue: str | None = None  #: one for every source queue (None: <queue>.dead)

    @classmethod
    def of(cls, settings: Any) -> RouterSettings:
        """Pick the router's options from a `config.Settings`."""
        return cls(**{name: getattr(settings, name) for name in cls.__dataclass_fields__})


class Phase(Enum):
    STARTING = "starting"
    RUNNING = "running"
    DRAINING = "draining"
    STOPPED = "stopped"


@dataclass(slots=True)
class _Republish:
    delivery: Delivery
    decision: Decision
    target: str
    wait_ms: int | None = None  #: a retry's delay step
    properties: dict[str, Any] = field(default_factory=dict)  #: as published


class Router:
    def __init__(self, settings: RouterSettings, now: float) -> None:
        self.settings = settings
        self.max_workers = settings.max_workers
        self.phase = Phase.STARTING
        self.generation = 0
        self.counters = Counters()
        self.retired: Counter[str] = Counter()
        self.guard = SpawnGuard()
        self._cache = MessageCache(settings.max_cache)
        self._retry_steps = ladder(settings.retry_delay, settings.retry_delay_max)
        self._retries_due_at = 0.0  #: when the last retry waiting in a delay queue comes back
        self._warned_no_ladder = False
        self._workers: dict[int, WorkerSlot] = {}
        self._idle: list[int] = []  # a stack: the most recently idle worker is on top
        self._next_worker = 0
        self._open = Unsettled()  # received and not settled yet, by delivery id
        self._paused = False  # consumers cancelled while the open bodies exceed the byte bound
        self._pauses = 0
        self._resumed = False
        self._republishing: dict[int, _Republish] = {}
        self._next_publish = 0
        self._refusals = RefusalBackoff()
        #: deliveries whose republish was refused, with when they go back to the broker
        self._held_back: list[tuple[float, Delivery]] = []
        self._tracker = AckTracker()
        self._finished: list[int] = []  # tags of this generation to ack, not taken yet
        #: finished acks that go out at once rather than after the short ack delay
        self._ack_batch = max(1, settings.max_cache // ACK_BATCH_SHARE)
        self._stops = 0
        self._immediate = False
        self._drain_deadline: float | None = None
        self._kill_deadline: float | None = None
        self._stragglers_killed = False
        self._timer_at: float | None = None
        self._last_delivery_at = now
        self._consuming = False  # basic_consume sent: the idle clock runs
        self._replace_queue: list[int] = []
        self._replacement: int | None = None  # the new worker a rolling restart waits for
        self._replaced: int | None = None  # the old worker it takes over from
        self._out: list[Action] = []
        self._handler_time: float | None = None  # running average, seconds

    # -- views --------------------------------------------------------------------------

    @property
    def cached(self) -> int:
        return len(self._cache)

    @property
    def unsettled(self) -> int:
        """Deliveries received and not settled yet (cache, workers, republishes)."""
        return len(self._open)

    @property
    def is_consuming(self) -> bool:
        """basic_consume is out on the current channel and not paused by the byte bound."""
        return self._consuming and not self._paused

    def workers(self) -> list[WorkerSlot]:
        return list(self._workers.values())

    def worker(self, worker_id: int) -> WorkerSlot | None:
        return self._workers.get(worker_id)

    def booted(self) -> int:
        """Workers that reported ready and are not on their way out."""
        return sum(1 for w in self._workers.values() if w.booted and w.is_active)

    def busy(self) -> int:
        return sum(1 for w in self._workers.values() if w.held)

    # -- lifecycle events ----------------------------------------------------------------

    def start(self, now: float) -> list[Action]:
        """The broker is connected and the queues declared: prefork the floor."""
        if self.phase is Phase.STARTING:
            self.phase = Phase.RUNNING
            self._last_delivery_at = now
            self._refill(now)
        return self._emit()

    def consuming(self, now: float) -> list[Action]:
        """basic_consume went out: the --exit-when-idle clock starts now (never while the
        floor boots or the broker is away, when no message can arrive)."""
        if not self._consuming and self.phase is Phase.RUNNING:
            self._consuming = True
            self._last_delivery_at = now
            if self.settings.exit_when_idle:
                self._arm(now + self.settings.exit_when_idle)
        return self._emit()

    def channel_opened(self, generation: int) -> list[Action]:
        """A new channel generation: tags start again; older ones are never settled."""
        self.generation = generation
        self._tracker = AckTracker()
        self._finished = []
        return self._emit()

    def channel_lost(self, now: float) -> list[Action]:
        """The channel broke: the broker takes back every unacked delivery of it. Cached ones
        and pending republishes are dropped (redelivered); running handlers finish, unacked."""
        for delivery in self._cache.drain():
            self._open.pop(delivery.id)
        for entry in self._republishing.values():
            self._open.pop(entry.delivery.id)
        self._republishing.clear()
        for _, delivery in self._held_back:
            self._open.pop(delivery.id)
        self._held_back.clear()
        self._finished = []
        self.generation = -abs(self.generation) - 1  # no channel until channel_opened
        self._consuming = False  # no message can come: the idle clock waits for `consuming`
        self._paused = False  # the recovery consumes anew
        self._check_drained(now)
        return self._emit()

    def stop(self, now: float) -> list[Action]:
        """TERM/INT: the first is graceful, any later one immediate."""
        self._stops += 1
        if self.phase is Phase.STARTING:
            self.phase = Phase.STOPPED
            self._out.append(Drained("stopped during start"))
        elif self._stops == 1 and self.phase is Phase.RUNNING:
            self._begin_drain(now)
        elif self.phase in (Phase.RUNNING, Phase.DRAINING):
            logger.info("second stop request: stopping now")
            self._go_immediate(now)
        return self._emit()

    # -- the broker side -----------------------------------------------------------------

    def delivery_arrived(self, delivery: Delivery, now: float) -> list[Action]:
        counters = self.counters
        counters.received += 1
        if counters.first_delivery_at is None:
            counters.first_delivery_at = now
        self._last_delivery_at = now
        if delivery.generation != self.generation:
            logger.error("%r arrived on an old channel; not taken", delivery)
            return self._emit()
        self._tracker.received(delivery.tag)
        self._open.add(delivery)
        if delivery.problem is not None:
            logger.error(
                "delivery %s from %r cannot be handled: %s", delivery.id, delivery.queue, delivery.problem
            )
            self._settle(delivery, Failure(FailureKind.INVALID, "InvalidMessage", delivery.problem))
        elif self.phase is not Phase.RUNNING:
            self._give_back(delivery)
        elif len(self._cache) >= self._cache.capacity:
            logger.error("cache full (%d); %r goes back to the broker", self._cache.capacity, delivery)
            self._give_back(delivery)
        else:
            self._cache.put(delivery)
            if len(self._cache) == 1:
                self._arm(now + self._cache_age_limit())
            self._dispatch(now)
        return self._emit()

    def publish_done(self, publish_id: int, ok: bool, why: str, now: float) -> list[Action]:
        """The broker confirmed (or refused: returned, nacked) a republish."""
        entry = self._republishing.pop(publish_id, None)
        if entry is None:
            return self._emit()
        delivery, decision = entry.delivery, entry.decision
        if delivery.generation != self.generation:
            self._open.pop(delivery.id)
        elif not ok and entry.wait_ms is not None:
            # Its delay queue is gone (deleted, or never made): retry at once rather than
            # give it back to fail again at full speed. The queue is made again at start.
            logger.error("could not republish delivery %s to %r (%s); retrying it at once instead",
                         delivery.id, entry.target, why)  # fmt: skip
            self._republish(entry.delivery, entry.decision, delivery.queue, None, entry.properties)
        elif not ok:
            self._refused(entry, why, now)
        else:
            self._refusals.accepted(entry.target)
            self._ack(delivery)
            self._log_republished(entry)
            if decision.action is Verdict.RETRY:
                self.counters.retried += 1
                due = now + (entry.wait_ms or 0) / 1000  # work to come: --exit-when-idle waits
                self._retries_due_at = max(self._retries_due_at, due)
            else:
                self.counters.dead_lettered += 1
        self._check_drained(now)
        return self._emit()

    def take_acks(self) -> list[Ack]:
        """The acks to write now. Called by the consumer greenlet after it wrote every
        reject queued before: a multiple-ack may pass over rejected tags."""
        if not self._finished:
            return []
        plan_ = self._tracker.plan(self._finished)
        self._finished = []
        acks = [Ack(self.generation, plan_.upto, True)] if plan_.upto is not None else []
        acks.extend(Ack(self.generation, tag) for tag in plan_.singles)
        return acks

    # -- the worker side -----------------------------------------------------------------

    def worker_spawned(self, worker_id: int, pid: int) -> list[Action]:
        worker = self._workers.get(worker_id)
        if worker is not None:
            worker.pid = pid
        return self._emit()

    def spawn_failed(self, worker_id: int, now: float) -> list[Action]:
        """The fork server was not there to fork it: not a boot failure."""
        worker = self._workers.pop(worker_id, None)
        if worker is not None and worker_id == self._replacement:
            self._abort_replace("the fork server is gone")
        self._check_drained(now)
        return self._emit()

    def fork_server_ready(self, now: float) -> list[Action]:
        """A (re)started fork server takes spawns again: refill the floor, serve the backlog."""
        if self.phase is Phase.RUNNING:
            self._refill(now)
            self._dispatch(now)
        return self._emit()

    def worker_ready(self, worker_id: int, now: float) -> list[Action]:
        worker = self._workers.get(worker_id)
        if worker is None or worker.booted:
            return self._emit()
        worker.booted = True
        self.counters.spawned += 1
        if worker.state is not WorkerState.BOOTING:
            return self._emit()  # retired or stopped while booting: its StopFrame is on the way
        if self.phase is not Phase.RUNNING:
            self._stop_worker(worker)
            return self._emit()
        worker.state = WorkerState.IDLE
        worker.last_busy_at = now
        self._idle.append(worker_id)
        if worker_id == self._replacement:
            self._replacement = None
            old = self._workers.get(self._replaced or -1)
            if old is None:
                self._replace_next(now)
            else:
                self._retire(old, RetireReason.REPLACED.value, counted=True)
        self._dispatch(now)
        return self._emit()

    def worker_result(
        self,
        worker_id: int,
        delivery_id: int,
        failure: Failure | None,
        now: float,
        started_at: float | None = None,
        finished_at: float | None = None,
    ) -> list[Action]:
        """The worker's handler finished a message (`failure` None: it returned). The
        worker reports when its handler started and ended (the monotonic clock is
        system-wide); it starts the next message in its window at `finished_at`."""
        worker = self._workers.get(worker_id)
        if worker is None:
            return self._emit()
        running = worker.running
        if running is None or running.delivery.id != delivery_id:
            return self.worker_broken(
                worker_id, f"result for delivery {delivery_id}, which it is not running", now
            )
        worker.held.popleft()
        delivery = running.delivery
        worker.handled += 1
        worker.last_busy_at = now
        counters = self.counters
        counters.handled += 1
        counters.last_result_at = now
        counters.per_worker[worker_id] = counters.per_worker.get(worker_id, 0) + 1
        if failure is not None:
            worker.failed += 1
            counters.failed += 1
        self._settle(delivery, failure)
        limit = self.settings.max_messages
        if limit and worker.handled >= limit and worker.is_active:
            detail = f"{worker.handled} messages"
            self._retire(worker, RetireReason.MAX_MESSAGES.value, counted=True, detail=detail)
        if started_at is not None and finished_at is not None and finished_at >= started_at:
            self._learn_handler_time(finished_at - started_at)
        if worker.held:
            next_start = finished_at if finished_at is not None and finished_at <= now else now
            worker.held[0].started_at = next_start  # the worker went straight on to it
        else:
            self._after_last(worker, now)
        self._dispatch(now)
        self._check_drained(now)
        return self._emit()

    def worker_broken(self, worker_id: int, why: str, now: float) -> list[Action]:
        """A corrupt or impossible frame: end that worker (its message follows the crash rule)."""
        worker = self._workers.get(worker_id)
        if worker is not None:
            logger.error("worker %s (pid %s) %s; killing it", worker_id, worker.pid, why)
            self._withdraw(worker)
            self._kill(worker, "protocol error")
        return self._emit()

    def write_failed(self, worker_id: int, undelivered: Collection[int], now: float) -> list[Action]:
        """A write to the worker failed: its socket is gone, so it is dying or dead. The
        message frames that did not go out whole (`undelivered`, always the newest) never
        reached it and go back uncounted; the ones before them may be running, and follow
        the crash rule when the worker is gone."""
        worker = self._workers.get(worker_id)
        if worker is None:
            return self._emit()
        logger.warning("worker %s (pid %s): write failed; ending it", worker_id, worker.pid)
        self._withdraw(worker)
        lost = set(undelivered)
        self._requeue_unstarted([e for e in worker.held if e.delivery.id in lost], now)
        kept = [e for e in worker.held if e.delivery.id not in lost]
        worker.held.clear()
        worker.held.extend(kept)
        self._kill(worker, "write failed")
        self._dispatch(now)
        self._check_drained(now)
        return self._emit()

    def exit_requested(self, worker_id: int, reason: str, now: float) -> list[Action]:
        """The worker asks to leave (TERM received): finish what it runs, then stop."""
        worker = self._workers.get(worker_id)
        if worker is not None and worker.state is not WorkerState.STOPPING:
            logger.info("worker %s (pid %s) asks to exit (%s)", worker_id, worker.pid, reason)
            # It finished what it started and starts nothing more: what it holds comes back.
            self._requeue_unstarted(list(worker.held), now)
            worker.held.clear()
            worker.retire_reason = worker.retire_reason or reason
            self._stop_worker(worker)
            self._expire_cache(now)
            if self.phase is Phase.RUNNING:
                self._refill(now)
                self._dispatch(now)
            self._check_drained(now)
        return self._emit()

    def worker_gone(self, worker_id: int, status: int | None, now: float) -> list[Action]:
        """The worker exited (`status` from waitpid; None: it died with the fork server)."""
        worker = self._workers.pop(worker_id, None)
        if worker is None:
            return self._emit()
        if worker_id in self._idle:
            self._idle.remove(worker_id)
        how = describe_exit(status) if status is not None else "died with the fork server"
        if worker.kill_reason and (status is None or killed_by_signal(status)):
            how += f" ({worker.kill_reason})"  # our signal ended it, not its own exit
        planned = worker.stop_sent and not worker.held and status == 0
        running = worker.running
        logger.log(
            logging.INFO if planned else logging.ERROR,
            "worker %s (pid %s) exited: %s%s%s",
            worker_id,
            worker.pid,
            how,
            f", retired: {worker.retire_reason}" if worker.retire_reason else "",
            f" while handling delivery {running.delivery.id}" if running else "",
        )
        self._out.append(
            WorkerExited(
                worker_id, worker.pid, worker.retire_reason if planned and worker.retire_reason else how
            )
        )
        self._lost_messages(worker, how, now)
        if worker_id == self._replacement:
            self._abort_replace(f"the replacement worker {how} before it was ready")
        elif worker_id == self._replaced and self._replacement is None:
            self._replace_next(now)
        if not worker.booted and not worker.stop_sent and status is not None and self.phase is Phase.RUNNING:
            self.guard.failed(now, how)
            if self.guard.tripped(now):
                self._fatal(
                    f"workers cannot boot: {self.guard.limit} failed within {self.guard.window:g}s, "
                    f"the last one {how} (a start event raising exits with code 3; see the log above)"
                )
                return self._emit()
        if self.phase is Phase.RUNNING:
            self._refill(now)
            self._dispatch(now)
        self._check_drained(now)
        return self._emit()

    # -- operators and time --------------------------------------------------------------

    def resize(self, delta: int, now: float) -> list[Action]:
        """TTIN/TTOU: move the ceiling by `delta` (the prefetch stays as started)."""
        floor = max(1, self.settings.min_workers)
        self.max_workers = max(floor, self.max_workers + delta)
        logger.info("--max-workers is now %d (the prefetch stays as started)", self.max_workers)
        active = [w for w in self._workers.values() if w.is_active]
        excess = len(active) - self.max_workers
        if excess > 0:
            order = sorted(active, key=lambda w: (bool(w.held), -w.last_busy_at))  # idle first
            for worker in order[:excess]:
                self._retire(worker, RetireReason.POOL_SHRUNK.value, counted=True)
        if self.phase is Phase.RUNNING:
            self._dispatch(now)
        return self._emit()

    def replace_all(self, now: float) -> list[Action]:
        """HUP: replace every worker one by one (spawn a new one, retire an old one once the
        new one is ready, wait for the old one to go)."""
        if self.phase is not Phase.RUNNING:
            return self._emit()
        if self._replace_queue or self._replacement is not None or self._replaced is not None:
            logger.info("a rolling restart is already running")
            return self._emit()
        self._replace_queue = [w.worker_id for w in self._workers.values() if w.is_active]
        logger.info("rolling restart: replacing %d workers one by one", len(self._replace_queue))
        self._replace_next(now)
        return self._emit()

    def patrol(self, now: float, memory: dict[int, int] | None = None) -> list[Action]:
        """Every --patrol-interval: recycle leaky or worn workers, retire idle ones down to
        the floor, refill it (decisions from `patrol.plan`). `memory`: bytes by worker id."""
        if self.phase is not Phase.RUNNING:
            return self._emit()
        for worker_id, size in (memory or {}).items():
            worker = self._workers.get(worker_id)
            if worker is not None:
                worker.memory_bytes = size
        active = [w for w in self._workers.values() if w.is_active]
        views = [
            WorkerView(
                w.worker_id,
                bool(w.held) or w.state is WorkerState.BOOTING,
                False,
                w.last_busy_at,
                w.handled,
                w.memory_bytes,
            )
            for w in active
        ]
        limits = Limits(
            self.settings.min_workers,
            self.max_workers,
            self.settings.max_idle,
            self.settings.max_worker_memory,
            self.settings.max_messages,
        )
        for step in plan(views, now, limits):
            if isinstance(step, Retire):
                worker = self._workers[step.worker_id]
                detail = self._retire_detail(worker, step.reason, now)
                self._retire(worker, step.reason.value, counted=True, detail=detail)
            elif isinstance(step, PlanSpawn):
                for _ in range(step.count):
                    self._spawn(now)
        self._dispatch(now)
        return self._emit()

    def tick(self, now: float) -> list[Action]:
        """The timer set by the last `SetTimer` fired: handler timeouts, deliveries near the
        consumer timeout, the graceful-stop deadline, --exit-when-idle."""
        self._timer_at = None
        self._release_held_back(now)
        self._kill_overdue_handlers(now)
        self._warn_late_handlers(now)
        self._expire_cache(now)
        if self.phase is Phase.DRAINING:
            if not self._immediate and self._drain_deadline is not None and now >= self._drain_deadline:
                logger.info("--graceful-timeout passed with %d handlers running: stopping them", self.busy())
                self._go_immediate(now)
            elif self._kill_deadline is not None and now >= self._kill_deadline:
                self._kill_stragglers(now)
        elif self.phase is Phase.RUNNING:
            self._check_idle_exit(now)
        deadline = self._next_deadline(now)
        if deadline is not None:
            # Every deadline due now was acted on above; one that is not is a bug, and must
            # still never make the timer fire again at the same instant (a spin).
            self._arm(max(deadline, now + MIN_TICK))
        return self._emit()

    # -- internals: dispatch and the pool ------------------------------------------------

    def _emit(self) -> list[Action]:
        self._bound_bytes()
        out, self._out = self._out, []
        return out

    def _bound_bytes(self) -> None:
        """Stop consuming while the bodies held exceed --max-cache-bytes; consume again at
        half of it (the broker still sends what was on the way: at most the prefetch)."""
        bound = self.settings.max_cache_bytes
        if not bound or self.phase is not Phase.RUNNING or not self._consuming:
            return
        held = self._open.bytes_of(self.generation)  # an old channel's are the broker's again
        if not self._paused and held > bound:
            self._paused = True
            self._pauses += 1
            logger.log(
                logging.WARNING if self._pauses == 1 else logging.DEBUG,  # routine with large bodies
                "holding %d bytes of messages, above --max-cache-bytes %d: consuming paused until "
                "half of it is left (pause %d)", held, bound, self._pauses,
            )  # fmt: skip
            self._out.append(PauseConsuming())
        elif self._paused and held <= bound // 2:
            self._paused = False
            self._resumed = True  # the idle clock starts again at the next tick
            logger.debug("holding %d bytes of messages: consuming again", held)
            self._out.append(ResumeConsuming())

    def _arm(self, at: float) -> None:
        if self._timer_at is None or at < self._timer_at:
            self._timer_at = at
            self._out.append(SetTimer(at))

    def _dispatch(self, now: float) -> None:
        """Idle workers first (most recently idle on top); only when none is idle do the
        windows of busy workers fill, the emptiest first."""
        cache, idle = self._cache, self._idle
        if self.phase is not Phase.RUNNING or not cache:
            return
        timeout = self.settings.timeout
        while cache and idle:
            worker = self._workers[idle.pop()]
            delivery = cache.take()
            assert delivery is not None
            worker.held.append(InFlight(delivery, now))
            worker.state = WorkerState.BUSY
            self._out.append(SendMessage(worker.worker_id, delivery))
            if timeout:
                self._arm(now + timeout)
        if cache:
            self._scale_up(now)
        if cache:
            self._fill_windows(now)

    def _window(self, busy: int) -> int:
        """How many messages a busy worker may hold."""
        handler_time = self._handler_time
        if handler_time is None:
            wanted = 2
        elif handler_time * 10 >= self.settings.consumer_timeout:
            wanted = 1  # a message must not wait behind a handler that long (consumer timeout)
        else:
            wanted = 1 + math.ceil(WINDOW_BUDGET / max(handler_time, 1e-6))
        share = self.settings.max_cache // max(1, busy)
        return max(1, min(wanted, MAX_WINDOW, share))

    def _fill_windows(self, now: float) -> None:
        """Only at the pool's ceiling with nothing booting: while the pool can grow, waiting
        messages stay in the cache for the new workers instead of behind a busy one."""
        busy = []
        active = 0
        for worker in self._workers.values():
            if worker.state is WorkerState.BOOTING:
                return
            if worker.is_active:
                active += 1
                if worker.state is WorkerState.BUSY:
                    busy.append(worker)
        if not busy or active < self.max_workers:
            return
        window = self._window(len(busy))
        # A worker whose handler already runs much longer than usual gets nothing more:
        # a message must not wait behind it (nor toward the consumer timeout).
        stall = max(WINDOW_BUDGET, STALL_FACTOR * (self._handler_time or 0.0))
        busy = [w for w in busy if w.running is None or now - (w.running.started_at or now) <= stall]
        if not busy:
            return
        cache = self._cache
        late = now - LATE_SHARE * self.settings.consumer_timeout
        while cache:
            worker = min(busy, key=lambda w: len(w.held))
            if len(worker.held) >= window or cache.peek().received_at <= late:
                return  # an old delivery waits for an idle worker, not behind a handler
            delivery = cache.take()
            assert delivery is not None
            worker.held.append(InFlight(delivery, None))
            self._out.append(SendMessage(worker.worker_id, delivery))

    def _learn_handler_time(self, seconds: float) -> None:
        average = self._handler_time
        self._handler_time = (
            seconds if average is None else average + HANDLER_TIME_WEIGHT * (seconds - average)
        )

    def _scale_up(self, now: float) -> None:
        if len(self._workers) >= self.max_workers and all(w.is_active for w in self._workers.values()):
            return  # the common case under load: at the ceiling already
        active = [w for w in self._workers.values() if w.is_active]
        booting = sum(1 for w in active if w.state is WorkerState.BOOTING)
        backlog = len(self._cache)
        count = workers_to_spawn(backlog, len(self._idle), booting, len(active), self.max_workers)
        for _ in range(count):
            self._spawn(now)

    def _refill(self, now: float) -> None:
        active = sum(1 for w in self._workers.values() if w.is_active)
        for _ in range(self.settings.min_workers - active):
            self._spawn(now)

    def _spawn(self, now: float) -> int:
        self._next_worker += 1
        worker_id = self._next_worker
        self._workers[worker_id] = WorkerSlot(worker_id, now)
        self._out.append(Spawn(worker_id))
        return worker_id

    def _after_last(self, worker: WorkerSlot, now: float) -> None:
        """The worker holds nothing any more: idle again, or stopped."""
        if worker.state is WorkerState.BUSY:
            if self.phase is not Phase.RUNNING:
                self._stop_worker(worker)
            else:
                worker.state = WorkerState.IDLE
                self._idle.append(worker.worker_id)
        elif worker.state is WorkerState.RETIRING:
            self._stop_worker(worker)

    def _withdraw(self, worker: WorkerSlot) -> None:
        """No more dispatch to this worker, whatever its state."""
        if worker.worker_id in self._idle:
            self._idle.remove(worker.worker_id)
        if worker.state is not WorkerState.STOPPING:
            worker.state = WorkerState.RETIRING

    def _retire(self, worker: WorkerSlot, reason: str, counted: bool, detail: str = "") -> None:
        """The retire handshake (rule 5): no more dispatch, then a stop once it holds nothing."""
        if not worker.is_active:
            return
        self._withdraw(worker)
        worker.retire_reason = worker.retire_reason or reason
        if counted:
            self.retired[reason] += 1
            logger.info(
                "worker %s (pid %s) retiring: %s%s",
                worker.worker_id,
                worker.pid,
                reason,
                f" ({detail})" if detail else "",
            )
        if not worker.held:
            self._stop_worker(worker)
        elif len(worker.held) > 1:
            self._out.append(TermWorker(worker.worker_id))  # its window comes back at once

    def _stop_worker(self, worker: WorkerSlot) -> None:
        assert not worker.held, f"{worker!r}: cannot stop a worker holding messages"
        if worker.state is WorkerState.STOPPING:
            return
        self._withdraw(worker)
        worker.state = WorkerState.STOPPING
        worker.stop_sent = True
        self._out.append(StopWorker(worker.worker_id))

    def _kill(self, worker: WorkerSlot, reason: str) -> None:
        if worker.kill_reason is None:
            worker.kill_reason = reason
        self._out.append(KillWorker(worker.worker_id, reason))

    def _retire_detail(self, worker: WorkerSlot, reason: RetireReason, now: float) -> str:
        if reason is RetireReason.MEMORY and worker.memory_bytes:
            limit = (self.settings.max_worker_memory or 0) / 1e6
            return f"{worker.memory_bytes / 1e6:.0f} MB > {limit:.0f} MB"
        if reason is RetireReason.IDLE:
            return f"idle {now - worker.last_busy_at:.1f}s"
        return ""

    def _lost_messages(self, worker: WorkerSlot, how: str, now: float) -> None:
        """What a gone worker held: the running message failed an attempt, unless our own
        kill ended it for another reason (a stop, or a kill meant for the message before
        it, whose result came in just before the kill): then it goes back uncounted, as do
        the unstarted ones."""
        held = list(worker.held)
        worker.held.clear()
        running = held[0] if held and held[0].started_at is not None else None
        if running is not None:
            meant_for_another = worker.kill_target is not None and worker.kill_target != running.delivery.id
            ours = worker.kill_reason == "stop" or self._immediate or meant_for_another
            if worker.kill_reason == "consumer-timeout" and running.started_at is not None:
                ran = now - running.started_at
                ours = ours or ran < LATE_SHARE * self.settings.consumer_timeout  # not hung
            if not ours:
                held.pop(0)
                self.counters.crashes += 1
                self.counters.failed += 1
                self._settle(running.delivery, self._crash_failure(worker, how))
        self._requeue_unstarted(held, now)

    def _crash_failure(self, worker: WorkerSlot, how: str) -> Failure:
        if worker.kill_reason == "consumer-timeout":
            return Failure(
                FailureKind.TIMEOUT,
                "ConsumerTimeout",
                f"the handler still ran with messages waiting behind it near --consumer-timeout "
                f"{self.settings.consumer_timeout:g}s",
                exit_status=how,
            )
        if worker.kill_reason == "timeout":
            return Failure(
                FailureKind.TIMEOUT,
                "HandlerTimeout",
                f"the handler ran longer than --timeout {self.settings.timeout:g}s",
                exit_status=how,
            )
        return Failure(
            FailureKind.CRASH, "WorkerDied", f"the worker {how} while handling the message", exit_status=how
        )

    def _requeue_unstarted(self, held: Iterable[InFlight], now: float) -> None:
        """Unstarted messages go back to the front of the cache, uncounted; one that has
        already waited near the consumer timeout goes back to the broker instead."""
        age = self._cache_age_limit()
        for entry in reversed(list(held)):
            delivery = entry.delivery
            fresh = delivery.received_at + age > now
            if fresh and self.phase is Phase.RUNNING and delivery.generation == self.generation:
                self._cache.put_front(delivery)
                self._arm(delivery.received_at + age)
            else:
                self._give_back(delivery)

    def _replace_next(self, now: float) -> None:
        self._replaced = None
        while self._replace_queue:
            old = self._workers.get(self._replace_queue.pop(0))
            if old is not None and old.is_active:
                self._replaced = old.worker_id
                self._replacement = self._spawn(now)
                return
        logger.info("rolling restart done")

    def _abort_replace(self, why: str) -> None:
        logger.error("rolling restart stopped: %s", why)
        self._replace_queue = []
        self._replacement = self._replaced = None

    def _fatal(self, reason: str) -> None:
        self.phase = Phase.STOPPED
        self._out.append(Fatal(reason))

    # -- internals: settling ---------------------------------------------------------------

    def _settle(self, delivery: Delivery, failure: Failure | None) -> None:
        """Carry out the policy for a finished attempt: ack, or republish then ack."""
        if self._open.get(delivery.id) is not delivery:
            logger.error("%r was settled already; not settling it again", delivery)
            return
        if delivery.generation != self.generation:
            logger.info("not settling %r from an old channel; the broker redelivers it", delivery)
            self._open.pop(delivery.id)
            return
        decision = decide(failure, delivery.attempt, self.settings.max_retries)
        if decision.action is Verdict.ACK:
            self._ack(delivery)
            return
        assert failure is not None
        properties = dict(delivery.properties)  # the sender's delivery mode, kept as sent
        wait = None
        if decision.action is Verdict.RETRY:
            wait = self._retry_wait(delivery, failure)
            target = delivery.queue if wait is None else delay_queue(delivery.queue, wait)
            properties["application_headers"] = retry_headers(delivery.headers, delivery.attempt)
        else:
            target = dead_letter_queue(delivery.queue, self.settings.dead_letter_queue)
            # A dead letter waits for a person: the sender's TTL would drop it unseen
            # (RabbitMQ's own dead-lettering removes it too).
            expiration = properties.pop("expiration", None)
            properties["application_headers"] = dead_letter_headers(
                delivery.headers,
                failure,
                delivery.attempt,
                delivery.queue,
                delivery.exchange,
                delivery.routing_key,
                dt.datetime.now(dt.UTC),
            )
            if expiration is not None:
                properties["application_headers"]["x-speed-original-expiration"] = expiration
        self._republish(delivery, decision, target, wait, properties)

    def _republish(
        self,
        delivery: Delivery,
        decision: Decision,
        target: str,
        wait: int | None,
        properties: dict[str, Any],
    ) -> None:
        self._next_publish += 1
        self._republishing[self._next_publish] = _Republish(delivery, decision, target, wait, properties)
        self._out.append(Publish(self._next_publish, target, delivery.body, properties, delivery.id))

    def _refused(self, entry: _Republish, why: str, now: float) -> None:
        """The broker did not take a retry or dead letter: the original goes back to its
        queue unacked, its attempt unchanged, after a wait that grows while refusals go on."""
        delivery = entry.delivery
        self.counters.refused += 1
        due = self._refusals.refused(entry.target, now)
        if self.phase is not Phase.RUNNING:
            due = now  # stopping: nothing here will try it again
        logger.error(
            "the broker refused %s of delivery %s to %r (%s; %d in a row); it goes back to %r in %.0fs",
            "the retry" if entry.decision.action is Verdict.RETRY else "the dead letter",
            delivery.id, entry.target, why, self._refusals.refusals_in_a_row(entry.target),
            delivery.queue, due - now,
        )  # fmt: skip
        if due <= now:
            self._give_back(delivery)
        else:
            self._held_back.append((due, delivery))
            self._arm(due)

    def _release_held_back(self, now: float, everything: bool = False) -> None:
        keep = []
        for due, delivery in self._held_back:
            if everything or due <= now:
                self._give_back(delivery)
            else:
                keep.append((due, delivery))
        self._held_back = keep

    def _retry_wait(self, delivery: Delivery, failure: Failure) -> int | None:
        """The delay step (ms) before the next attempt: the one the handler asked for,
        else one step further per failed attempt. None: at once."""
        if failure.retry_delay is not None:
            if not self._retry_steps and failure.retry_delay > 0 and not self._warned_no_ladder:
                self._warned_no_ladder = True
                logger.warning("a handler asked for Retry(delay=%s) but --retry-delay is 0: retrying at once",
                               failure.retry_delay)  # fmt: skip
            return step_for(self._retry_steps, failure.retry_delay)
        return step_after(self._retry_steps, delivery.attempt)

    def _ack(self, delivery: Delivery) -> None:
        self._open.pop(delivery.id)
        self.counters.acked += 1
        self._finished.append(delivery.tag)
        pending = len(self._finished)
        if pending == 1:
            self._out.append(AcksReady(urgent=self._ack_batch <= 1))
        elif pending == self._ack_batch:
            self._out.append(AcksReady(urgent=True))

    def _give_back(self, delivery: Delivery) -> None:
        """Return a delivery unacked (reject with requeue): not a failed attempt."""
        if self._open.pop(delivery.id) is None:
            return
        if delivery.generation != self.generation:
            return  # its channel is gone: the broker has it back already
        self._tracker.rejected(delivery.tag)
        self.counters.requeued += 1
        self._out.append(Reject(delivery, requeue=True))

    def _log_republished(self, entry: _Republish) -> None:
        delivery, failure = entry.delivery, entry.decision.failure
        assert failure is not None
        if entry.decision.action is Verdict.RETRY:
            logger.warning(
                "delivery %s from %r failed attempt %d (%s: %s); retrying %s",
                delivery.id,
                delivery.queue,
                delivery.attempt,
                failure.error_type,
                failure.message,
                "at once" if entry.target == delivery.queue else f"through {entry.target!r}",
            )
        else:
            logger.warning(
                "delivery %s from %r dead-lettered to %r after attempt %d: %s: %s",
                delivery.id,
                delivery.queue,
                entry.target,
                delivery.attempt,
                failure.error_type,
                failure.message,
            )

    # -- internals: time -----------------------------------------------------------------------

    def _cache_age_limit(self) -> float:
        return CACHE_AGE_LIMIT * self.settings.consumer_timeout

    def _window_age_limit(self) -> float:
        return WINDOW_AGE_LIMIT * self.settings.consumer_timeout

    def _kill_overdue_handlers(self, now: float) -> None:
        timeout = self.settings.timeout
        if not timeout:
            return
        for worker in self._workers.values():
            running = worker.running
            if (
                running is not None
                and worker.kill_reason is None
                and now >= (running.started_at or now) + timeout
            ):
                logger.warning(
                    "worker %s (pid %s): handler ran longer than --timeout %gs on delivery %s; killing it",
                    worker.worker_id,
                    worker.pid,
                    timeout,
                    running.delivery.id,
                )
                self._withdraw(worker)
                self._kill(worker, "timeout")
                worker.kill_target = running.delivery.id

    def _warn_late_handlers(self, now: float) -> None:
        """A running handler cannot be given back: at CACHE_AGE_LIMIT of the consumer
        timeout, say which message will make the broker close the channel."""
        age = self._cache_age_limit()
        for worker in self._workers.values():
            running = worker.running
            if running is None or running.warned or running.delivery.received_at + age > now:
                continue
            if worker.kill_reason is not None or running.delivery.generation != self.generation:
                continue  # being killed anyway, or its channel is gone and the broker has it back
            running.warned = True
            delivery = running.delivery
            logger.warning(
                "delivery %s from %r has been unacked %.0fs and its handler (worker %s, pid %s) still "
                "runs: at --consumer-timeout %gs the broker closes the channel and redelivers it "
                "(a --timeout below the consumer timeout bounds handlers)",
                delivery.id, delivery.queue, now - delivery.received_at, worker.worker_id, worker.pid,
                self.settings.consumer_timeout,
            )  # fmt: skip

    def _expire_cache(self, now: float) -> None:
        """RabbitMQ closes the channel when a delivery stays unacked past its consumer
        timeout: give back what waited too long so another consumer can take it. One that
        waits unstarted in a worker's window comes back through TERM (the worker finishes
        its current message, starts nothing more, and asks to exit)."""
        age = self._cache_age_limit()
        last = self._window_age_limit()
        for worker in self._workers.values():
            held = worker.held
            if len(held) < 2 or worker.kill_reason is not None:
                continue
            waited = held[1].delivery.received_at
            if waited + last <= now:
                # TERM did not free it in time (or this tick came late): the handler still
                # runs and the broker would close the channel over the window, so the worker
                # goes instead. A handler that itself ran past LATE_SHARE of the timeout
                # counts a failed attempt (rule 4): one that hangs forever ends dead-lettered
                # instead of cycling; any other goes back uncounted.
                logger.error(
                    "worker %s (pid %s): its handler still runs and delivery %s in its window nears the "
                    "consumer timeout; killing it (its other messages go back uncounted)",
                    worker.worker_id, worker.pid, held[1].delivery.id,
                )  # fmt: skip
                self._withdraw(worker)
                self._kill(worker, "consumer-timeout")
                worker.kill_target = held[0].delivery.id
            elif worker.state is WorkerState.BUSY and waited + age <= now:
                logger.warning(
                    "worker %s (pid %s): delivery %s waited in its window near the consumer timeout; "
                    "taking its window back", worker.worker_id, worker.pid, held[1].delivery.id,
                )  # fmt: skip
                self._retire(worker, "window near the consumer timeout", counted=True)
        for delivery in self._cache.expire(now, age):
            logger.warning(
                "delivery %s waited %.0fs in the cache; giving it back before the broker's consumer timeout",
                delivery.id,
                now - delivery.received_at,
            )
            self._give_back(delivery)

    def _check_idle_exit(self, now: float) -> None:
        limit = self.settings.exit_when_idle
        if not limit or not self._consuming or self._paused:
            return  # paused: nothing arrives because we asked, not because the queue is empty
        if self._resumed:
            self._resumed = False
            self._last_delivery_at = now
            return
        quiet = now - max(self._last_delivery_at, self._retries_due_at)
        waiting = self._cache or self.busy() or self._republishing or self._held_back
        if quiet >= limit and not waiting:
            logger.info("no message for %.1fs (--exit-when-idle): stopping", quiet)
            self._stops += 1
            self._begin_drain(now)

    def _next_deadline(self, now: float) -> float | None:
        times = self._worker_deadlines()
        waiting = [d.received_at for d in self._cache.peek_all()]
        if waiting:
            times.append(min(waiting) + self._cache_age_limit())
        if self._held_back:
            times.append(min(due for due, _ in self._held_back))
        if self.phase is Phase.DRAINING:
            if not self._immediate and self._drain_deadline is not None:
                times.append(self._drain_deadline)
            if self._kill_deadline is not None:
                times.append(self._kill_deadline)
        elif self.phase is Phase.RUNNING and self.settings.exit_when_idle and self._consuming:
            limit = self.settings.exit_when_idle
            last = max(self._last_delivery_at, self._retries_due_at)
            times.append(max(last + limit, now + min(1.0, limit / 4)))
        return min(times) if times else None

    def _worker_deadlines(self) -> list[float]:
        """--timeout of each running handler, the consumer-timeout warning for it, and the
        age limit of the first unstarted message in each window."""
        times: list[float] = []
        timeout, age = self.settings.timeout, self._cache_age_limit()
        for worker in self._workers.values():
            running = worker.running
            if running is not None and running.started_at is not None and worker.kill_reason is None:
                if timeout:
                    times.append(running.started_at + timeout)
                if not running.warned and running.delivery.generation == self.generation:
                    times.append(running.delivery.received_at + age)
            if len(worker.held) > 1 and worker.kill_reason is None:
                limit = age if worker.state is WorkerState.BUSY else self._window_age_limit()
                times.append(worker.held[1].delivery.received_at + limit)
        return times

    # -- internals: stopping -------------------------------------------------------------------

    def _begin_drain(self, now: float) -> None:
        """Graceful stop: cancel the consumers, give the cache back, let handlers finish."""
        self.phase = Phase.DRAINING
        logger.info(
            "stopping: cancelling consumers, returning %d cached messages, giving %d in-flight "
            "handlers up to %.0fs",
            len(self._cache),
            self.busy(),
            self.settings.graceful_timeout,
        )
        self._out.append(CancelConsumers())
        for delivery in self._cache.drain():
            self._give_back(delivery)
        self._release_held_back(now, everything=True)
        for worker in list(self._workers.values()):
            if not worker.held:
                self._stop_worker(worker)
            else:
                self._withdraw(worker)
                if len(worker.held) > 1:
                    self._out.append(TermWorker(worker.worker_id))  # its window comes back at once
        self._drain_deadline = now + self.settings.graceful_timeout
        self._arm(self._drain_deadline)
        self._check_drained(now)

    def _go_immediate(self, now: float) -> None:
        """Second signal or graceful timeout: kill running handlers; their messages go back
        unacked (not a failed attempt), and so do the originals of unconfirmed republishes."""
        self._immediate = True
        if self.phase is Phase.RUNNING:
            self._begin_drain(now)
        if self.phase is not Phase.DRAINING:
            return
        for entry in self._republishing.values():
            self._give_back(entry.delivery)  # its republish may still land: a duplicate at worst
        self._republishing.clear()
        for worker in list(self._workers.values()):
            if worker.held:
                self._kill(worker, "stop")
            else:
                self._stop_worker(worker)
        self._kill_deadline = now + STOP_GRACE
        self._arm(self._kill_deadline)
        self._check_drained(now)

    def _kill_stragglers(self, now: float) -> None:
        """Workers that did not exit within STOP_GRACE are killed; after another STOP_GRACE
        without their exit reports, the master stops waiting for them."""
        if self._stragglers_killed:
            logger.warning("%d workers did not report their exit; stopping anyway", len(self._workers))
            for worker in self._workers.values():
                for entry in worker.held:
                    self._give_back(entry.delivery)
            self._workers.clear()
            for republish in self._republishing.values():
                self._give_back(republish.delivery)
            self._republishing.clear()
            self._kill_deadline = None
            self._check_drained(now)
            return
        self._stragglers_killed = True
        for worker in self._workers.values():
            if worker.kill_reason is None:
                self._kill(worker, "stop")
        self._kill_deadline = now + STOP_GRACE  # the deadline moves on: never armed in the past

    def _check_drained(self, now: float) -> None:
        if self.phase is not Phase.DRAINING or self._workers or self._republishing or self._held_back:
            return
        self.phase = Phase.STOPPED
        self._out.append(Drained("immediate" if self._immediate else "graceful"))

    # -- stats -----------------------------------------------------------------------------------

    def snapshot(self, now: float) -> dict[str, Any]:
        """The pool and the cache for `Master.stat()` (no secrets here)."""
        return {
            "cache": {
                "size": len(self._cache),
                "capacity": self._cache.capacity,
                "bytes_held": self._open.bytes,
                "paused": self._paused,
                "pauses": self._pauses,
                "held_back": len(self._held_back),  #: refused republishes waiting to go back
            },
            "pool": {
                "min_workers": self.settings.min_workers,
                "max_workers": self.max_workers,
                "retired": dict(self.retired),
            },
            "workers": [_worker_stat(w, now) for w in self._workers.values()],
        }


def _worker_stat(worker: WorkerSlot, now: float) -> dict[str, Any]:
    running = worker.running
    return {
        "id": worker.worker_id,
        "pid": worker.pid,
        "state": worker.state.value,
        "held": len(worker.held),
        "handled": worker.handled,
        "failed": worker.failed,
        "memory_bytes": worker.memory_bytes,
        "message_age": round(now - (running.started_at or now), 3) if running else None,
        "idle_seconds": round(now - worker.last_busy_at, 3) if not worker.held else 0.0,
    }
