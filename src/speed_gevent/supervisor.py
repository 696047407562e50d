"""`Supervisor`: keeps the pool the right shape while the master runs.

Scale up at once when messages wait and no worker is idle; on each patrol, recycle
leaky or worn workers, retire idle ones down to `--min-workers` and refill the floor
(decisions from the pure `patrol.plan`); kill a handler that outlives `--timeout`;
replace every worker one by one on HUP; resize on TTIN/TTOU; stop a fork loop when
workers cannot boot. Retiring is always the handshake of rule 5: no more dispatch,
then a StopFrame once the worker holds nothing.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import gevent

from .cache import MessageCache
from .config import Settings
from .delivery import Delivery
from .patrol import (
    Limits,
    Retire,
    RetireReason,
    Spawn,
    SpawnGuard,
    WorkerView,
    plan,
    sample_memory,
    workers_to_spawn,
)
from .pool import Pool
from .settle import Settler
from .workerproc import WorkerProc, WorkerState

logger = logging.getLogger(__name__)

#: Share of --consumer-timeout a delivery may wait in the cache before it is given back.
CACHE_AGE_LIMIT = 0.9
#: Seconds a replacement worker gets to boot during a rolling restart.
REPLACE_BOOT_TIMEOUT = 30.0


class Supervisor:
    def __init__(
        self,
        settings: Settings,
        pool: Pool,
        cache: MessageCache,
        settler: Settler,
        wait_until: Callable[[Callable[[], bool], float], bool],
        fatal: Callable[[str], None],
    ) -> None:
        self.settings = settings
        self.min_workers = settings.min_workers
        self.max_workers = settings.max_workers
        self._pool = pool
        self._cache = cache
        self._settler = settler
        self._wait_until = wait_until
        self._fatal = fatal
        self.guard = SpawnGuard()
        self.retired: Counter[str] = Counter()
        self._replacing: gevent.Greenlet | None = None

    def limits(self) -> Limits:
        s = self.settings
        return Limits(self.min_workers, self.max_workers, s.max_idle, s.max_worker_memory, s.max_messages)

    # -- growing ------------------------------------------------------------------------------

    def spawn(self, count: int = 1) -> None:
        for _ in range(count):
            self._pool.spawn()

    def start_floor(self) -> None:
        self.spawn(self.min_workers)

    def scale_up(self) -> None:
        """Called when messages wait and no worker is idle: grow at once, up to the ceiling."""
        active = self._pool.active()
        booting = sum(1 for proc in active if proc.state is WorkerState.BOOTING)
        idle = sum(1 for proc in active if proc.state is WorkerState.IDLE)
        self.spawn(workers_to_spawn(len(self._cache), idle, booting, len(active), self.max_workers))

    def refill(self) -> None:
        missing = self.min_workers - len(self._pool.active())
        if missing > 0:
            self.spawn(missing)

    # -- shrinking ----------------------------------------------------------------------------

    def retire(self, proc: WorkerProc, reason: RetireReason, detail: str = "") -> None:
        if not proc.is_active:
            return
        proc.retire(reason.value)
        self.retired[reason.value] += 1
        logger.info(
            "worker %s (pid %s) retiring: %s%s",
            proc.worker_id,
            proc.pid,
            reason.value,
            f" ({detail})" if detail else "",
        )
        if proc.delivery is None:
            self._pool.stop_worker(proc)

    def after_result(self, proc: WorkerProc) -> None:
        limit = self.settings.max_messages
        if limit and proc.handled >= limit and proc.is_active:
            self.retire(proc, RetireReason.MAX_MESSAGES, f"{proc.handled} messages")

    # -- the patrol -----------------------------------------------------------------------------

    def patrol_once(self, now: float) -> None:
        self._pool.reap_missing()
        active = self._pool.active()
        if self.settings.max_worker_memory:
            sizes = sample_memory(proc.pid for proc in active if proc.pid)
            for proc in active:
                proc.memory_bytes = sizes.get(proc.pid or -1, proc.memory_bytes)
        views = [
            WorkerView(
                p.worker_id,
                p.delivery is not None or p.state is WorkerState.BOOTING,
                False,
                p.last_busy_at,
                p.handled,
                p.memory_bytes,
            )
            for p in active
        ]
        by_id = {proc.worker_id: proc for proc in active}
        for action in plan(views, now, self.limits()):
            if isinstance(action, Retire):
                proc = by_id[action.worker_id]
                self.retire(proc, action.reason, self._detail(proc, action.reason, now))
            elif isinstance(action, Spawn):
                self.spawn(action.count)
        self._expire_cache(now)

    def _detail(self, proc: WorkerProc, reason: RetireReason, now: float) -> str:
        if reason is RetireReason.MEMORY and proc.memory_bytes:
            return f"{proc.memory_bytes / 1e6:.0f} MB > {(self.settings.max_worker_memory or 0) / 1e6:.0f} MB"
        if reason is RetireReason.IDLE:
            return f"idle {now - proc.last_busy_at:.1f}s"
        return ""

    def _expire_cache(self, now: float) -> None:
        """RabbitMQ closes the channel when a delivery stays unacked past its consumer
        timeout; give back what waited too long so other consumers can take it."""
        for delivery in self._cache.expire(now - CACHE_AGE_LIMIT * self.settings.consumer_timeout):
            logger.warning(
                "delivery %s waited %.0fs in the cache; giving it back before the broker's consumer timeout",
                delivery.id,
                now - delivery.received_at,
            )
            self._settler.give_back(delivery)

    # -- handler timeouts -------------------------------------------------------------------------

    def arm_timeout(self, proc: WorkerProc, delivery: Delivery) -> None:
        if self.settings.timeout is None:
            return
        timer = gevent.get_hub().loop.timer(self.settings.timeout)
        timer.start(self._timed_out, proc, delivery.id)
        proc.timer = timer

    @staticmethod
    def disarm_timeout(proc: WorkerProc) -> None:
        if proc.timer is not None:
            proc.timer.stop()
            proc.timer.close()
            proc.timer = None

    def _timed_out(self, proc: WorkerProc, delivery_id: int) -> None:
        proc.timer = None
        if proc.delivery is None or proc.delivery.id != delivery_id:
            return
        logger.warning(
            "worker %s (pid %s): handler ran longer than --timeout %gs on delivery %s; killing it",
            proc.worker_id,
            proc.pid,
            self.settings.timeout,
            delivery_id,
        )
        proc.kill_reason = "timeout"
        self._pool.kill(proc)

    # -- boot failures ------------------------------------------------------------------------------

    def worker_gone(self, proc: WorkerProc, how: str) -> bool:
        """Note a worker's exit; False if workers keep failing to boot (the master must stop)."""
        self.disarm_timeout(proc)
        if proc.booted or proc.stop_sent:
            return True
        now = time.monotonic()
        self.guard.failed(now, how)
        if self.guard.tripped(now):
            self._fatal(
                f"workers cannot boot: {self.guard.limit} failed within "
                f"{self.guard.window:g}s, the last one {how} (a start event raising "
                "exits with code 3; see the log above)"
            )
            return False
        return True

    # -- operator signals ---------------------------------------------------------------------------

    def replace_all(self) -> None:
        if self._replacing is not None and not self._replacing.dead:
            logger.info("a rolling restart is already running")
            return
        olds = self._pool.active()
        logger.info("rolling restart: replacing %d workers one by one", len(olds))
        self._replacing = gevent.spawn(self._replace_loop, olds)

    def _replace_loop(self, olds: list[WorkerProc]) -> None:
        for old in olds:
            if not old.is_active:
                continue
            new = self._pool.spawn()
            deadline = time.monotonic() + REPLACE_BOOT_TIMEOUT
            if new is not None:
                self._wait_until(lambda n=new: n.booted or not n.is_alive, deadline)
            if new is None or not new.booted:
                logger.error("rolling restart stopped: a replacement worker did not boot")
                return
            self.retire(old, RetireReason.REPLACED)
            self._wait_until(
                lambda o=old: not o.is_alive, time.monotonic() + self.settings.graceful_timeout + 5
            )
        logger.info("rolling restart done")

    def resize(self, delta: int) -> None:
        floor = max(1, self.min_workers)
        self.max_workers = max(floor, self.max_workers + delta)
        logger.info("--max-workers is now %d (the prefetch stays as started)", self.max_workers)
        active = self._pool.active()
        excess = len(active) - self.max_workers
        if excess > 0:
            # idle ones first, then the most recently busy
            order = sorted(active, key=lambda p: (p.delivery is not None, -p.last_busy_at))
            for proc in order[:excess]:
                self.retire(proc, RetireReason.POOL_SHRUNK)

    def snapshot(self) -> dict[str, Any]:
        return {
            "min_workers": self.min_workers,
            "max_workers": self.max_workers,
            "retired": dict(self.retired),
        }
