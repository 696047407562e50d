"""`WorkerSlot`: the router's record of one worker, with its lifecycle as an enum.

Pure. What a worker holds is an ordered collection (`held`, oldest first) of `InFlight`
entries, each with the time its handler started, so a worker can later hold a window of
several messages and `--timeout` still runs from each message's own start.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from enum import Enum

from .delivery import Delivery


class WorkerState(Enum):
    BOOTING = "booting"  #: forked (or asked for), not ready yet
    IDLE = "idle"  #: ready and holds nothing
    BUSY = "busy"  #: holds at least one message
    RETIRING = "retiring"  #: no more dispatch; stopped once it holds nothing
    STOPPING = "stopping"  #: StopFrame sent (or killed); waiting for its exit


@dataclass(slots=True)
class InFlight:
    delivery: Delivery
    started_at: float | None  #: when its handler started; None while it waits in the window
    warned: bool = False  #: its handler was logged as running near the consumer timeout


class WorkerSlot:
    __slots__ = ("worker_id", "pid", "state", "held", "last_busy_at", "handled",
                 "failed", "booted", "stop_sent", "retire_reason", "kill_reason", "kill_target",
                 "memory_bytes")  # fmt: skip

    def __init__(self, worker_id: int, now: float) -> None:
        self.worker_id = worker_id
        self.pid: int | None = None
        self.state = WorkerState.BOOTING
        self.held: deque[InFlight] = deque()
        self.last_busy_at = now
        self.handled = 0
        self.failed = 0
        self.booted = False  #: reported ready at least once (else its death is a boot failure)
        self.stop_sent = False  #: the master asked it to stop (a clean exit is then expected)
        self.retire_reason: str | None = None
        self.kill_reason: str | None = None  #: why the router asked for a SIGKILL, if it did
        self.kill_target: int | None = None  #: the delivery whose handler the kill was for
        self.memory_bytes: int | None = None  #: last patrol sample

    def __repr__(self) -> str:
        return f"<worker {self.worker_id} pid={self.pid} {self.state.value} holding {len(self.held)}>"

    @property
    def is_active(self) -> bool:
        """Counts toward the pool's size: not on its way out."""
        return self.state in (WorkerState.BOOTING, WorkerState.IDLE, WorkerState.BUSY)

    @property
    def running(self) -> InFlight | None:
        """The message whose handler runs now, if any."""
        if self.held and self.held[0].started_at is not None:
            return self.held[0]
        return None
