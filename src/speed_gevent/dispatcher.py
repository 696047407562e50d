"""`Dispatcher`: hands cached deliveries to idle workers, one at a time per worker.

Event-driven, never polling: it wakes when a delivery arrives, a worker becomes idle or
the master pokes it (a worker died, the ceiling rose). When messages still wait and no
worker is idle, it asks the supervisor to grow the pool at once.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable

import gevent.event

from .cache import CacheFull, MessageCache
from .delivery import Delivery
from .pool import Pool
from .supervisor import Supervisor
from .workerproc import WorkerProc

logger = logging.getLogger(__name__)


class Dispatcher:
    def __init__(
        self, cache: MessageCache, pool: Pool, supervisor: Supervisor, is_running: Callable[[], bool]
    ) -> None:
        self._cache = cache
        self._pool = pool
        self._supervisor = supervisor
        self._is_running = is_running
        self._idle: deque[WorkerProc] = deque()  # may hold stale entries; checked on use
        self._wake = gevent.event.Event()

    def offer(self, delivery: Delivery) -> bool:
        """Cache a delivery for the next idle worker; False if the cache is full (a bug)."""
        try:
            self._cache.put(delivery)
        except CacheFull as exc:
            logger.error("%s; giving it back to the broker", exc)
            return False
        self._wake.set()
        return True

    def worker_idle(self, proc: WorkerProc) -> None:
        self._idle.append(proc)
        self._wake.set()

    def poke(self) -> None:
        self._wake.set()

    def loop(self) -> None:
        """Greenlet body."""
        cache, idle, pool, supervisor = self._cache, self._idle, self._pool, self._supervisor
        while True:
            self._wake.wait()
            self._wake.clear()
            while cache and idle and self._is_running():
                proc = idle.popleft()
                if not proc.is_idle:
                    continue  # retired or gone since it was queued
                delivery = cache.take()
                assert delivery is not None
                if pool.send_message(proc, delivery):
                    supervisor.arm_timeout(proc, delivery)
                else:
                    cache.put_front(delivery)
            if cache and self._is_running():
                supervisor.scale_up()
