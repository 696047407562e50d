"""The patrol's decisions, as pure functions of worker views, `now` and limits.

`plan()` says which workers to spawn or retire on each patrol; `SpawnGuard` stops a
fork loop when workers cannot boot. Sampling memory is the master's job
(`osproc.sample_memory`); the router applies the plan.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum


class RetireReason(Enum):
    IDLE = "idle"
    MEMORY = "memory"
    MAX_MESSAGES = "max-messages"
    REPLACED = "replaced"
    POOL_SHRUNK = "pool-shrunk"


@dataclass(frozen=True)
class WorkerView:
    """What the patrol needs to know about one live worker."""

    worker_id: int
    busy: bool
    retiring: bool
    last_busy_at: float
    handled: int
    memory_bytes: int | None = None


@dataclass(frozen=True)
class Limits:
    min_workers: int
    max_workers: int
    max_idle: float | None  #: seconds; None never retires idle workers
    max_worker_memory: int | None  #: bytes
    max_messages: int | None


@dataclass(frozen=True)
class Spawn:
    count: int


@dataclass(frozen=True)
class Retire:
    worker_id: int
    reason: RetireReason


Action = Spawn | Retire


def plan(views: Sequence[WorkerView], now: float, limits: Limits) -> list[Action]:
    """Recycle leaky or worn workers, retire idle ones down to the floor, refill the floor."""
    actions: list[Action] = []
    active = [view for view in views if not view.retiring]
    for view in active:
        reason = _recycle_reason(view, limits)
        if reason is not None:
            actions.append(Retire(view.worker_id, reason))
    recycled = {action.worker_id for action in actions if isinstance(action, Retire)}
    remaining = len(active) - len(recycled)
    if limits.max_idle is not None:
        idle = sorted(
            (v for v in active if v.worker_id not in recycled and not v.busy
             and now - v.last_busy_at > limits.max_idle),
            key=lambda v: v.last_busy_at,
        )  # fmt: skip
        for view in idle:
            if remaining <= limits.min_workers:
                break
            actions.append(Retire(view.worker_id, RetireReason.IDLE))
            remaining -= 1
    if remaining < limits.min_workers:
        actions.append(Spawn(limits.min_workers - remaining))
    return actions


def _recycle_reason(view: WorkerView, limits: Limits) -> RetireReason | None:
    if limits.max_worker_memory and view.memory_bytes and view.memory_bytes > limits.max_worker_memory:
        return RetireReason.MEMORY
    if limits.max_messages and view.handled >= limits.max_messages:
        return RetireReason.MAX_MESSAGES
    return None


def workers_to_spawn(backlog: int, idle: int, booting: int, live: int, max_workers: int) -> int:
    """Scale up at once: enough new workers for the waiting messages, up to the ceiling."""
    if backlog <= idle + booting:
        return 0
    return max(0, min(backlog - idle - booting, max_workers - live))


class SpawnGuard:
    """Trips after `limit` boot failures within `window` seconds (restart-storm brake)."""

    def __init__(self, limit: int = 5, window: float = 10.0) -> None:
        self.limit = limit
        self.window = window
        self._failures: deque[float] = deque()
        self.last_reason = ""

    def failed(self, now: float, reason: str) -> None:
        self._failures.append(now)
        self.last_reason = reason

    def tripped(self, now: float) -> bool:
        while self._failures and now - self._failures[0] > self.window:
            self._failures.popleft()
        return len(self._failures) >= self.limit
