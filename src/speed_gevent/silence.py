"""A watchdog over py-amqp's synchronous waits.

py-amqp waits for a method's answer (channel.open-ok, declare-ok, consume-ok, cancel-ok)
with no deadline and checks no heartbeat meanwhile: on a connection gone silent the
consumer greenlet would wait for good. The watchdog reads py-amqp's own count of frames
received; once it has stood still for `grace` seconds, the socket is shut down, so that
wait, and every one after it (a channel close on the way out, say), fails at once. A
broker that is slow but alive (a quorum declare, a memory alarm that blocks us) still
sends heartbeats and is waited for. A gevent.Timeout would only interrupt the first wait.
"""

from __future__ import annotations

import socket
import time
from types import TracebackType
from typing import Any

import gevent

#: Longest pause between two looks at the frame count, in seconds.
MAX_CHECK_INTERVAL = 1.0


class SilenceWatchdog:
    """`with SilenceWatchdog(conn, grace):` around code that waits on `conn`; `fired`
    says whether it ended the connection."""

    def __init__(self, conn: Any, grace: float) -> None:
        self._conn = conn
        self.grace = grace
        self.fired = False
        self._seen = -1
        self._quiet_since = 0.0
        every = min(MAX_CHECK_INTERVAL, grace / 4)
        self._timer = gevent.get_hub().loop.timer(every, every)

    def __enter__(self) -> SilenceWatchdog:
        self._seen = self._conn.bytes_recv
        self._quiet_since = time.monotonic()
        self._timer.start(self._check)
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._timer.close()

    def _check(self) -> None:
        """In the hub: must neither block nor raise."""
        now = time.monotonic()
        seen = self._conn.bytes_recv
        if seen != self._seen:
            self._seen, self._quiet_since = seen, now
            return
        if now - self._quiet_since < self.grace:
            return
        self.fired = True
        self._timer.stop()
        try:
            self._conn.transport.sock.shutdown(socket.SHUT_RDWR)  # the fd stays open under its watchers
        except (AttributeError, OSError):
            pass  # already closed: the wait has its error anyway
