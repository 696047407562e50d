"""`Delivery`: a broker message plus the channel generation and tag it came with.

The unit the router passes around in the master. Its
body stays the broker's bytes; nothing here decodes it.
"""

from __future__ import annotations

from typing import Any

from .message import ATTEMPT_HEADER


class Delivery:
    """One delivery. `(generation, tag)` is only meaningful on the channel it came from."""

    __slots__ = ("id", "generation", "tag", "queue", "exchange", "routing_key", "redelivered",
                 "body", "properties", "received_at", "attempt", "frame_meta", "problem")  # fmt: skip

    def __init__(
        self,
        id: int,
        generation: int,
        tag: int,
        queue: str,
        exchange: str,
        routing_key: str,
        redelivered: bool,
        body: bytes,
        properties: dict[str, Any],
        received_at: float,
        problem: str | None = None,
    ) -> None:
        self.id = id
        self.generation = generation
        self.tag = tag
        self.queue = queue
        self.exchange = exchange
        self.routing_key = routing_key
        self.redelivered = redelivered
        self.body = body
        self.properties = properties
        self.received_at = received_at
        self.attempt = attempt_of(properties.get("application_headers"))
        self.frame_meta = b""  #: the worker frame's metadata, encoded once on arrival
        self.problem = problem  #: why it cannot be handed to a worker (it is dead-lettered)

    @property
    def headers(self) -> dict[str, Any]:
        return self.properties.get("application_headers") or {}

    def meta(self) -> dict[str, Any]:
        """What the worker's `Message` is built from."""
        return {
            "queue": self.queue,
            "exchange": self.exchange,
            "routing_key": self.routing_key,
            "redelivered": self.redelivered,
            "attempt": self.attempt,
            "properties": self.properties,
        }

    def __repr__(self) -> str:
        return f"<Delivery {self.id} {self.queue!r} gen={self.generation} tag={self.tag}>"


def attempt_of(headers: dict[str, Any] | None) -> int:
    """Attempt number: our header alone (1 if absent). A quorum queue's x-delivery-count
    also rises when we give a message back unstarted (a graceful stop, an expired cache
    entry), so counting it would push messages toward the dead letters for our own stops."""
    if not headers:
        return 1
    return max(1, _as_int(headers.get(ATTEMPT_HEADER), 1))


def _as_int(value: object, default: int) -> int:
    if isinstance(value, bool):
        return default
    if isinstance(value, int):
        return value
    if isinstance(value, str | bytes):
        try:  # "²".isdigit() is True, int("²") raises: parse, never trust the look
            return int(value.strip())
        except ValueError:
            return default
    return default
