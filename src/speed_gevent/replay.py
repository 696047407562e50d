"""`speed-gevent replay`: move dead letters back to the queue they failed in.

One message at a time: take it unacked (basic.get), publish a copy to its origin queue
(confirmed, mandatory), then ack it. Stopped anywhere, at most the one message in hand
is both replayed and still dead-lettered; none is lost. Our `x-speed-*` headers go, so
the attempt starts again at 1; everything else the sender set stays. A run replays at
most what the queue held when it started: letters that fail again and come back while
it runs wait for the next run instead of going round forever.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from amqp import Connection
from amqp import Message as AmqpMessage
from amqp.exceptions import MessageNacked, NotFound

from .amqpconn import close_channel, open_connection
from .errors import BrokerError, ConfigError, QueueMissingError
from .urls import mask_url

#: Our headers start so; the dead-letter queue's origin is one of them.
OWN_PREFIX = "x-speed-"
ORIGIN_HEADER = "x-speed-origin-queue"
#: Seconds to wait for the broker to confirm one replayed message.
CONFIRM_TIMEOUT = 30.0

Progress = Callable[[int, int], None]


@dataclass
class ReplaySummary:
    dead_queue: str
    to: Counter[str] = field(default_factory=Counter)  #: replayed, per target queue
    left: int = 0  #: in the dead-letter queue when the run ended (as counted at its start)

    @property
    def replayed(self) -> int:
        return sum(self.to.values())

    def line(self) -> str:
        where = ", ".join(f"{n} to {queue!r}" for queue, n in sorted(self.to.items())) or "none"
        return f"replayed {self.replayed} messages from {self.dead_queue!r} ({where}); {self.left} left there"


def replay_target(headers: dict[str, Any] | None, to: str | None) -> str | None:
    """Where a dead letter goes: `--to`, else the queue it failed in; None if neither."""
    if to:
        return to
    origin = (headers or {}).get(ORIGIN_HEADER)
    if isinstance(origin, bytes):
        origin = origin.decode("utf-8", "replace")
    return origin if isinstance(origin, str) and origin else None


def replay_properties(properties: dict[str, Any]) -> dict[str, Any]:
    """The sender's properties without our headers (the attempt starts again at 1)."""
    clean = dict(properties)
    original = clean.get("application_headers") or {}
    headers = {k: v for k, v in original.items() if not k.startswith(OWN_PREFIX)}
    if headers:
        clean["application_headers"] = headers
    else:
        clean.pop("application_headers", None)
    return clean


def replay(
    url: str,
    dead_queue: str,
    to: str | None = None,
    count: int | None = None,
    progress: Progress | None = None,
) -> ReplaySummary:
    """Replay up to `count` dead letters (all there were at start by default)."""
    conn = open_connection(url, None, 10, mask_url(url))
    try:
        available = _message_count(conn, dead_queue)
        summary = ReplaySummary(dead_queue, left=available)
        if to:
            _message_count(conn, to)  # exists, or one clear error before anything moves
        limit = available if count is None else min(count, available)
        _replay_each(conn, summary, to, limit, progress or (lambda done, total: None))
        return summary
    finally:
        conn.close()


def _replay_each(
    conn: Connection, summary: ReplaySummary, to: str | None, limit: int, progress: Progress
) -> None:
    take = conn.channel()
    take.auto_decode = False
    give = conn.channel()
    give.auto_decode = False
    returned: list[str] = []
    give.events["basic_return"].add(lambda exc, exchange, key, message: returned.append(str(exc)))
    checked: set[str] = {to} if to else set()
    for _ in range(limit):
        message = take.basic_get(summary.dead_queue, no_ack=False)
        if message is None:
            break  # someone else took the rest
        tag = message.delivery_info["delivery_tag"]
        target = replay_target(message.properties.get("application_headers"), to)
        if target is None:
            take.basic_reject(tag, requeue=True)
            raise ConfigError(
                f"a message in {summary.dead_queue!r} has no {ORIGIN_HEADER} header (it was not "
                f"dead-lettered by speed-gevent): name the queue it goes to with --to QUEUE; "
                f"{summary.replayed} replayed before it"
            )
        if target not in checked:
            try:
                _message_count(conn, target)
            except QueueMissingError:
                take.basic_reject(tag, requeue=True)
                raise
            checked.add(target)
        properties = replay_properties(message.properties)
        returned.clear()
        try:
            give.basic_publish_confirm(
                AmqpMessage(message.body, **properties), exchange="", routing_key=target, mandatory=True,
                confirm_timeout=CONFIRM_TIMEOUT,
            )  # fmt: skip
        except MessageNacked:
            returned.append("the broker nacked it")
        except TimeoutError:
            returned.append(f"no confirm within {CONFIRM_TIMEOUT:.0f}s (if it lands, it is there twice)")
        if returned:
            take.basic_reject(tag, requeue=True)
            raise BrokerError(f"queue {target!r} did not take a replayed message: {returned[0]}")
        take.basic_ack(tag)
        summary.to[target] += 1
        summary.left -= 1
        progress(summary.replayed, limit)
    close_channel(give)
    close_channel(take)


def _message_count(conn: Connection, queue: str) -> int:
    """Messages ready in `queue` (a passive declare on a channel of its own: a missing
    queue closes the channel it was asked on)."""
    channel = conn.channel()
    try:
        return int(channel.queue_declare(queue, passive=True).message_count)
    except NotFound:
        raise QueueMissingError(f"queue {queue!r} does not exist") from None
    finally:
        close_channel(channel)
