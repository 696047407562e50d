"""`Message`: what a handler receives. Built in the worker from a MessageFrame."""

from __future__ import annotations

import json
from typing import Any

#: Our own header: the attempt number of this delivery (1 for the first).
ATTEMPT_HEADER = "x-speed-attempt"
DELIVERY_COUNT_HEADER = "x-delivery-count"  #: the broker's, on quorum queues


class MessageDecodeError(ValueError):
    """The body is not what the handler asked for (UTF-8 text, JSON)."""


class Message:
    """One delivery as the handler sees it. `body` is the broker's bytes, untouched."""

    __slots__ = ("body", "_meta")

    def __init__(self, body: bytes, meta: dict[str, Any]) -> None:
        self.body = body
        self._meta = meta

    @property
    def text(self) -> str:
        """The body decoded as UTF-8 (MessageDecodeError if it is not)."""
        try:
            return self.body.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise MessageDecodeError(
                f"message body is not UTF-8 text (byte {exc.start}: {self.body[exc.start : exc.start + 1]!r})"
            ) from None

    def json(self) -> Any:
        """The body parsed as JSON (MessageDecodeError if it is not)."""
        try:
            return json.loads(self.text)
        except json.JSONDecodeError as exc:
            raise MessageDecodeError(f"message body is not JSON: {exc}") from None

    @property
    def properties(self) -> dict[str, Any]:
        """AMQP basic properties (content_type, correlation_id, reply_to, message_id, ...)."""
        properties: dict[str, Any] = self._meta["properties"]
        return properties

    @property
    def headers(self) -> dict[str, Any]:
        headers: dict[str, Any] = self.properties.get("application_headers") or {}
        return headers

    @property
    def queue(self) -> str:
        value: str = self._meta["queue"]
        return value

    @property
    def exchange(self) -> str:
        value: str = self._meta["exchange"]
        return value

    @property
    def routing_key(self) -> str:
        value: str = self._meta["routing_key"]
        return value

    @property
    def redelivered(self) -> bool:
        value: bool = self._meta["redelivered"]
        return value

    @property
    def attempt(self) -> int:
        """1 for the first delivery, counting failed attempts before this one."""
        value: int = self._meta["attempt"]
        return value

    @property
    def delivery_count(self) -> int | None:
        """How often the broker delivered this message before (a quorum queue's
        x-delivery-count, which also counts messages we gave back unstarted); None where
        the queue keeps no count. Not the attempt number: see `attempt`."""
        value = self.headers.get(DELIVERY_COUNT_HEADER)
        if isinstance(value, int) and not isinstance(value, bool):
            return max(0, value)
        return None

    def __repr__(self) -> str:
        return f"<Message queue={self.queue!r} attempt={self.attempt} {len(self.body)} bytes>"
