"""Queues as they are: look before declaring, declare only what is missing.

Most production queues are declared by someone else, with arguments we do not know
(priorities, TTLs, length limits, their own dead-letter exchange, a quorum type), and
AMQP cannot read a queue's arguments back. So a queue that exists is consumed as it is;
only a missing one is declared (durable, `--queue-type`), or refused with `--passive`.
Our dead-letter queue is declared when missing, `--passive` or not: it is ours.

A passive declare of a missing queue closes its channel (404), and a refused declare
does too (406), so each look and each declare uses a channel of its own.
"""

from __future__ import annotations

import logging
import re
from typing import Any

from amqp.exceptions import (
    AccessRefused,
    ChannelError,
    NotAllowed,
    NotFound,
    PreconditionFailed,
    ResourceLocked,
)

from .amqpconn import close_channel
from .backoff import delay_queue, delay_queue_arguments, step_label
from .errors import ConfigError, QueueMissingError
from .policy import dead_letter_queue

logger = logging.getLogger(__name__)

#: How RabbitMQ names the argument a declare differs in.
_INEQUIVALENT = re.compile(
    r"inequivalent arg '(?P<name>[^']+)'.*?: received (?P<ours>.*) but current is (?P<theirs>.*)$"
)


class QueueConflict(ConfigError):
    """A declare refused because the queue exists with other arguments."""

    def __init__(self, queue: str, differs: str) -> None:
        super().__init__(f"queue {queue!r} exists with other arguments than ours: {differs}")
        self.differs = differs


def queue_arguments(queue_type: str) -> dict[str, Any] | None:
    # Classic queues get no x-queue-type: an existing classic queue declared without the
    # argument would otherwise be refused as inequivalent on older brokers.
    return {"x-queue-type": "quorum"} if queue_type == "quorum" else None


#: RabbitMQ's NOT_FOUND for a classic durable queue whose node is away ("home node
#: 'rabbit@b' of durable queue 'q' in vhost '/' is down or inaccessible").
HOME_NODE_DOWN = "is down or inaccessible"


def differing_argument(reply_text: str) -> str:
    """'x-max-priority: the queue has the value '10' of type 'signedint', we sent none'
    from the broker's PRECONDITION_FAILED text (the text itself if it is not that)."""
    found = _INEQUIVALENT.search(reply_text)
    if found is None:
        return reply_text
    return f"{found['name']}: the queue has {found['theirs']}, we sent {found['ours']}"


def ensure_queues(
    connection: Any,
    queues: tuple[str, ...],
    queue_type: str,
    passive: bool,
    dead_letters: bool = True,
    retry_steps: tuple[int, ...] = (),
    dead_letter: str | None = None,
) -> bool:
    """Every source queue and its dead-letter queue exist when this returns, and the
    delay queues (one per step of `retry_steps`, in ms) as far as they can be made: True
    if all of them exist.

    `--passive` is about the queues the user names: those must exist. The dead-letter and
    delay queues are ours: looked at, and declared when missing.
    """
    complete = True
    for queue in queues:
        if not queue_exists(connection, queue):
            if passive:
                raise QueueMissingError(f"--queue: queue {queue!r} does not exist (--passive)")
            _declare_missing(connection, queue, queue_type)
        dead = dead_letter_queue(queue, dead_letter)
        if dead_letters and not queue_exists(connection, dead):
            _declare_missing(connection, dead, queue_type)
        complete = _ensure_delay_queues(connection, queue, queue_type, retry_steps) and complete
    return complete


def _ensure_delay_queues(connection: Any, source: str, queue_type: str, steps: tuple[int, ...]) -> bool:
    """One delay queue per step, looked at first (an existing one is taken as it is). A
    step that cannot be made (no configure permission, its cluster node away) is logged
    and skipped, never fatal: a retry due there is refused by the broker and goes back to
    the source queue at once instead."""
    complete = True
    for step in steps:
        name = delay_queue(source, step)
        try:
            if not queue_exists(connection, name):
                arguments = delay_queue_arguments(source, step, queue_type)
                _declare_missing(connection, name, queue_type, arguments)
        except (ConfigError, ChannelError) as exc:
            complete = False
            logger.warning("delay queue %r is unavailable (%s); retries due there go back at once", name, exc)
    if steps:
        logger.debug("delay queues of %r: %s", source, ", ".join(step_label(s) for s in steps))
    return complete


def _declare_missing(
    connection: Any, queue: str, queue_type: str, arguments: dict[str, Any] | None = None
) -> None:
    """Declare a queue that was missing when we looked; one that appeared meanwhile with
    arguments of its own (another instance, another application) is taken as it is."""
    try:
        declare_queue(connection, queue, queue_type, arguments)
    except QueueConflict as exc:
        if not queue_exists(connection, queue):
            raise
        logger.info("queue %r appeared meanwhile (%s); consuming it as it is", queue, exc.differs)


def queue_exists(connection: Any, queue: str) -> bool:
    """A passive declare, on a channel of its own: a missing queue closes that channel."""
    channel = connection.channel()
    try:
        channel.queue_declare(queue=queue, passive=True)
        return True
    except NotFound as exc:
        if HOME_NODE_DOWN in (exc.reply_text or ""):
            raise  # it exists, on a cluster node that is away: an outage, retried
        return False
    except ResourceLocked as exc:
        raise _locked(queue, exc) from None
    finally:
        close_channel(channel)


def declare_queue(
    connection: Any, queue: str, queue_type: str, arguments: dict[str, Any] | None = None
) -> None:
    """Declare one durable queue (with `arguments`, else those of `queue_type`). A
    conflict names the argument that differs; a refusal (no configure permission, say)
    is a configuration error, not an outage to retry. Declaring a queue that exists with
    the same arguments changes nothing."""
    channel = connection.channel()
    try:
        channel.queue_declare(
            queue=queue,
            durable=True,
            auto_delete=False,
            arguments=queue_arguments(queue_type) if arguments is None else arguments,
        )
        if arguments is None:
            logger.info("declared queue %r (%s)", queue, queue_type)
    except PreconditionFailed as exc:
        raise QueueConflict(queue, differing_argument(exc.reply_text)) from None
    except ResourceLocked as exc:
        raise _locked(queue, exc) from None
    except (AccessRefused, NotAllowed) as exc:
        raise ConfigError(
            f"cannot declare queue {queue!r}: {exc.reply_text} (declare it beforehand, or give "
            "this user configure permission on it)"
        ) from None
    finally:
        close_channel(channel)


def _locked(queue: str, exc: ResourceLocked) -> ConfigError:
    return ConfigError(f"cannot use queue {queue!r}: {exc.reply_text} (exclusive to another connection)")
