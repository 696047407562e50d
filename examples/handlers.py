"""Example handlers for `speed-gevent run examples.handlers:handle`."""

from __future__ import annotations

import time

from speed_gevent import Message


def handle(message: Message) -> None:
    """Pretend to work for a millisecond on each message."""
    message.json()  # a body that is not JSON fails here and goes to the dead-letter queue
    time.sleep(0.001)


def noop(message: Message) -> None:
    """Do nothing: measures the runner's own overhead."""


def sleep_10ms(message: Message) -> None:
    """A 10 ms handler, for pool-scaling measurements."""
    time.sleep(0.01)
