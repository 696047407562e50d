"""Example handlers for `speed-gevent run examples.handlers:handle`."""

from __future__ import annotations

import time

from speed_gevent import Message


def handle(message: Message) -> None:
    """Pretend to work for a millisecond on each message."""
    message.json()  # a body that is not JSON fails here and goes to the dead-letter queue
    time.sleep(0.001)
