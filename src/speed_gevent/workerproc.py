"""`WorkerProc`: the master's record of one worker, with its lifecycle as an enum.

Pure. Transitions live here and raise on illegal moves, so "never write a message to a
worker that is exiting" (rule 5) is checked in one place: only an IDLE worker may be
given a delivery, and RETIRING means "finish the current message, then stop".
"""

from __future__ import annotations

from enum import Enum
from typing import Any

from .delivery import Delivery


class WorkerState(Enum):
    BOOTING = "booting"
    IDLE = "idle"
    BUSY = "busy"
    RETIRING = "retiring"
    STOPPING = "stopping"
    DEAD = "dead"


class StateError(RuntimeError):
    """An illegal transition: a bug in the master, never a user error."""


class WorkerProc:
    """Invariant: `delivery` is set exactly while the worker holds a message."""

    def __init__(self, worker_id: int, conn: Any, now: float) -> None:
        self.worker_id = worker_id
        self.conn = conn  # the master's socket end; opaque here
        self.pid: int | None = None
        self.state = WorkerState.BOOTING
        self.delivery: Delivery | None = None
        self.busy_since: float | None = None
        self.spawned_at = now
        self.last_busy_at = now
        self.handled = 0
        self.failed = 0
        self.exit_status: int | None = None
        self.eof = False
        self.exited = False  #: its exit was reported (or its process is known to be gone)
        self.stop_sent = False  #: the master asked it to stop (a clean exit is then expected)
        self.booted = False  #: reported ready at least once (else its death is a boot failure)
        self.retire_reason: str | None = None
        self.kill_reason: str | None = None  #: why the master killed it, if it did
        self.timer: Any = None  #: the in-flight delivery's timeout timer, if armed
        self.memory_bytes: int | None = None  #: last patrol sample

    def __repr__(self) -> str:
        return f"<worker {self.worker_id} pid={self.pid} {self.state.value}>"

    @property
    def is_idle(self) -> bool:
        return self.state is WorkerState.IDLE

    @property
    def is_alive(self) -> bool:
        return self.state is not WorkerState.DEAD

    def _require(self, *states: WorkerState) -> None:
        if self.state not in states:
            raise StateError(f"{self!r}: expected {'/'.join(s.value for s in states)}")

    def ready(self) -> None:
        self._require(WorkerState.BOOTING)
        self.state = WorkerState.IDLE
        self.booted = True

    def assign(self, delivery: Delivery, now: float) -> None:
        self._require(WorkerState.IDLE)
        self.state = WorkerState.BUSY
        self.delivery = delivery
        self.busy_since = now

    def unassign(self) -> Delivery:
        """Take back a delivery that never reached the worker (the write failed)."""
        self._require(WorkerState.BUSY)
        delivery, self.delivery = self.delivery, None
        assert delivery is not None
        self.state = WorkerState.IDLE
        return delivery

    def complete(self, delivery_id: int, now: float, failed: bool) -> Delivery:
        """The worker's result for `delivery_id`; a result for anything else is refused."""
        self._require(WorkerState.BUSY, WorkerState.RETIRING)
        if self.delivery is None or self.delivery.id != delivery_id:
            raise StateError(f"{self!r}: result for {delivery_id}, holding {self.delivery!r}")
        delivery, self.delivery = self.delivery, None
        self.busy_since = None
        self.last_busy_at = now
        self.handled += 1
        self.failed += failed
        if self.state is WorkerState.BUSY:
            self.state = WorkerState.IDLE
        return delivery

    @property
    def is_active(self) -> bool:
        """Counts toward the pool's size: alive and not on its way out."""
        return self.state in (WorkerState.BOOTING, WorkerState.IDLE, WorkerState.BUSY)

    def retire(self, reason: str = "") -> None:
        """No more dispatch; the master stops it once it holds nothing."""
        self._require(WorkerState.BOOTING, WorkerState.IDLE, WorkerState.BUSY, WorkerState.RETIRING)
        self.state = WorkerState.RETIRING
        self.retire_reason = self.retire_reason or reason

    def stopping(self) -> None:
        if self.delivery is not None:
            raise StateError(f"{self!r}: cannot stop while holding {self.delivery!r}")
        self.state = WorkerState.STOPPING
        self.stop_sent = True

    def dead(self) -> Delivery | None:
        """Mark gone; returns the delivery it held, if any (its attempt failed)."""
        delivery, self.delivery = self.delivery, None
        self.state = WorkerState.DEAD
        return delivery
