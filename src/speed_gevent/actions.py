"""What the router asks the master to do. Plain values, no behaviour.

The router (`router.py`) decides; the master turns each action into a write, a signal
or a timer. Acks are not here as a pushed action: the router keeps finished tags and the
consumer greenlet takes them (`Router.take_acks`) right before it writes, so they leave
in batches and always after the rejects queued before them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .delivery import Delivery


@dataclass(frozen=True, slots=True)
class Spawn:
    """Ask the fork server for worker `worker_id`."""

    worker_id: int


@dataclass(frozen=True, slots=True)
class SendMessage:
    """Write this delivery's frame to the worker."""

    worker_id: int
    delivery: Delivery


@dataclass(frozen=True, slots=True)
class StopWorker:
    """Write a StopFrame: the worker holds nothing and will exit."""

    worker_id: int


@dataclass(frozen=True, slots=True)
class KillWorker:
    """SIGKILL the worker (`reason`: timeout, stop, protocol error, write failed)."""

    worker_id: int
    reason: str


@dataclass(frozen=True, slots=True)
class TermWorker:
    """SIGTERM the worker: it finishes the message it runs, starts nothing more and asks
    to exit, so the messages waiting in its window come back at once."""

    worker_id: int


@dataclass(frozen=True, slots=True)
class Reject:
    """basic.reject on the delivery's channel generation (requeue: give it back)."""

    delivery: Delivery
    requeue: bool = True


@dataclass(frozen=True, slots=True)
class Publish:
    """Publish to the default exchange, mandatory, confirmed: answer with `publish_done(id, ...)`."""

    publish_id: int
    routing_key: str
    body: bytes
    properties: dict[str, Any]
    delivery_id: int  #: the delivery this republishes (acked once the broker confirms)


@dataclass(frozen=True, slots=True)
class Ack:
    """basic.ack of `tag` on channel generation `generation`."""

    generation: int
    tag: int
    multiple: bool = False


@dataclass(frozen=True, slots=True)
class AcksReady:
    """Finished tags wait for the consumer greenlet to take and write them: within a few
    milliseconds (so several leave as one multiple-ack), or at once when `urgent` (enough
    are waiting that holding them back would starve the prefetch window)."""

    urgent: bool = False


@dataclass(frozen=True, slots=True)
class CancelConsumers:
    """basic.cancel every consumer (the start of a graceful stop)."""


@dataclass(frozen=True, slots=True)
class PauseConsuming:
    """basic.cancel every consumer: the bodies the master holds exceed --max-cache-bytes
    (the broker has no byte prefetch: it answers `prefetch_size` with NOT_IMPLEMENTED)."""


@dataclass(frozen=True, slots=True)
class ResumeConsuming:
    """basic.qos and basic.consume again: what the master holds fell to half the bound."""


@dataclass(frozen=True, slots=True)
class SetTimer:
    """Call `Router.tick(now)` at monotonic time `at` (replaces the timer set before)."""

    at: float


@dataclass(frozen=True, slots=True)
class WorkerExited:
    """A worker is gone; for the master's `worker_exit` event."""

    worker_id: int
    pid: int | None
    reason: str


@dataclass(frozen=True, slots=True)
class Drained:
    """The stop sequence is done: close the connection (flushing what is queued), exit 0."""

    how: str


@dataclass(frozen=True, slots=True)
class Fatal:
    """The master cannot go on: stop everything and exit 1."""

    reason: str


Action = (
    Spawn | SendMessage | StopWorker | KillWorker | TermWorker | Reject | Publish | AcksReady
    | CancelConsumers | PauseConsuming | ResumeConsuming | SetTimer | WorkerExited | Drained | Fatal
)  # fmt: skip
