"""Opening an AMQP connection with py-amqp itself, for the master and `publish`.

kombu stays out of the master: its imports (and billiard's, where Celery is installed)
cost megabytes in the one process that lives as long as the service.
"""

from __future__ import annotations

import logging
from typing import Any

from amqp import Connection
from amqp.exceptions import AccessRefused, ConnectionForced, NotAllowed

from .errors import BrokerError
from .urls import connection_params

logger = logging.getLogger(__name__)


def open_connection(
    url: str, heartbeat: float | None, connect_timeout: float | None, masked_url: str
) -> Connection:
    """Connect; heartbeats are asked for (0: off). BrokerError if the broker refused us,
    OSError if it cannot be reached."""
    conn = Connection(
        **connection_params(url), heartbeat=heartbeat or 0, connect_timeout=connect_timeout or 10
    )
    try:
        conn.connect()
    except (AccessRefused, NotAllowed) as exc:
        drop_connection(conn)
        raise BrokerError(f"broker {masked_url} refused us: {exc.reply_text}") from None
    except ConnectionForced as exc:
        drop_connection(conn)
        raise OSError(f"broker closed the connection: {exc}") from None
    except BaseException:
        drop_connection(conn)
        raise
    return conn


def drop_connection(conn: Connection) -> None:
    """Close the socket without the AMQP close handshake (the connection is broken or
    was never fully open)."""
    try:
        conn.collect()
    except Exception as exc:  # half-open or gone; nothing of ours is left on it
        logger.debug("dropping a connection: %s", exc)


def close_channel(channel: Any) -> None:
    """Close a channel for good (py-amqp reopens one the broker closed); a broken
    connection is heard of by the next call that needs it."""
    if channel is None:
        return
    try:
        channel.close()
    except Exception as exc:
        logger.debug("closing a channel: %s", exc)
