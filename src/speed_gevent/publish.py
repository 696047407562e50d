"""`speed-gevent publish`: send messages for trying things out, with nothing silently dropped.

Declares the queue like `run` does, publishes with `mandatory` on a confirm-mode channel
and waits until the broker confirmed every message (acks tracked asynchronously, so a
batch costs one round trip, not one per message).
"""

from __future__ import annotations

import time
from typing import Any

from amqp import Connection
from amqp import Message as AmqpMessage

from .amqpconn import open_connection
from .errors import BrokerError
from .topology import ensure_queues
from .urls import mask_url

#: Seconds to wait for the broker's confirms after the last publish.
CONFIRM_TIMEOUT = 60.0


def render_body(template: str, n: int) -> bytes:
    """`{n}` in the body becomes the message's number (1-based), so each message is unique."""
    return template.replace("{n}", str(n)).encode()


def publish_messages(
    url: str,
    queue: str,
    bodies: list[bytes],
    queue_type: str = "classic",
    passive: bool = False,
    declare_dead: bool = True,
    properties: dict[str, Any] | None = None,
) -> int:
    """Publish `bodies` to `queue` via the default exchange; returns how many were confirmed."""
    conn = open_connection(url, None, 10, mask_url(url))
    try:
        ensure_queues(conn, (queue,), queue_type, passive, dead_letters=declare_dead)
        channel = conn.channel()
        return _publish_confirmed(conn, channel, queue, bodies, properties or {})
    finally:
        conn.close()


def _publish_confirmed(
    conn: Connection, channel: Any, queue: str, bodies: list[bytes], properties: dict[str, Any]
) -> int:
    confirmed: set[int] = set()
    failed: list[str] = []

    def on_ack(tag: int, multiple: bool) -> None:
        confirmed.update(range(1, tag + 1) if multiple else (tag,))

    def on_nack(tag: int, multiple: bool) -> None:
        failed.append(f"broker nacked message {tag}")

    def on_return(exc: Exception, exchange: str, routing_key: str, message: Any) -> None:
        failed.append(f"queue {routing_key!r} did not take a message: {exc}")

    channel.confirm_select()
    channel.events["basic_ack"].add(on_ack)
    channel.events["basic_nack"].add(on_nack)
    channel.events["basic_return"].add(on_return)
    props = {"delivery_mode": 2, **properties}
    for body in bodies:
        channel.basic_publish(AmqpMessage(body, **props), exchange="", routing_key=queue, mandatory=True)
    deadline = time.monotonic() + CONFIRM_TIMEOUT
    while len(confirmed) < len(bodies) and not failed:
        if time.monotonic() > deadline:
            raise BrokerError(f"only {len(confirmed)} of {len(bodies)} messages confirmed in time")
        try:
            conn.drain_events(timeout=1)
        except TimeoutError:
            pass
    if failed:
        raise BrokerError(failed[0])
    return len(confirmed)
