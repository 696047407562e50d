"""Declare the source queues and their dead-letter queues, classic or quorum, or check
that they exist (`--passive`)."""

from __future__ import annotations

from typing import Any

from amqp.exceptions import NotFound, PreconditionFailed

from .errors import ConfigError, QueueMissingError
from .policy import dead_letter_queue


def queue_arguments(queue_type: str) -> dict[str, Any] | None:
    # Classic queues get no x-queue-type: an existing classic queue declared without the
    # argument would otherwise be refused as inequivalent on older brokers.
    return {"x-queue-type": "quorum"} if queue_type == "quorum" else None


def declare_queue(channel: Any, queue: str, queue_type: str, passive: bool) -> None:
    """Declare one durable queue (or check it exists), turning broker refusals into our errors.

    The broker closes the channel on a refusal, so the caller opens a fresh one after.
    """
    try:
        channel.queue_declare(
            queue=queue,
            passive=passive,
            durable=True,
            auto_delete=False,
            arguments=None if passive else queue_arguments(queue_type),
        )
    except NotFound:
        raise QueueMissingError(f"--queue: queue {queue!r} does not exist (--passive)") from None
    except PreconditionFailed as exc:
        raise ConfigError(
            f"--queue-type: queue {queue!r} exists with other arguments: {exc.reply_text}"
        ) from None


def declare_all(channel: Any, queues: tuple[str, ...], queue_type: str, passive: bool) -> None:
    for queue in queues:
        declare_queue(channel, queue, queue_type, passive)
        declare_queue(channel, dead_letter_queue(queue), queue_type, passive)
