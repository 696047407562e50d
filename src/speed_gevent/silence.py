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

import _socket  # the C socket type, below gevent's and ssl's wrappers
import logging
import socket
import time
from types import TracebackType
from typing import Any

import gevent

#: Longest pause between two looks at the frame count, in seconds.
MAX_CHECK_INTERVAL = 1.0
#: Past the start-up deadline, a wait that heard nothing for this long ends: an answer
#: on its way (frames arriving) is still waited for.
DEADLINE_GRACE = 3.0

logger = logging.getLogger(__name__)


class SilenceWatchdog:
    """`with SilenceWatchdog(conn, grace, deadline):` around code that waits on `conn`;
    `fired` says whether it ended the connection, and `why`. Past `deadline` (monotonic
    seconds: --connect-timeout at start) the grace shrinks to DEADLINE_GRACE; an answer
    on its way is still waited for."""

    def __init__(self, conn: Any, grace: float, deadline: float | None = None) -> None:
        self._conn = conn
        self.grace = grace
        self._deadline = deadline
        self.fired = False
        self.why = ""
        self._seen = -1
        self._quiet_since = 0.0
        self._timer: Any = None

    def __enter__(self) -> SilenceWatchdog:
        self._seen = self._conn.bytes_recv
        self._quiet_since = time.monotonic()
        every = min(MAX_CHECK_INTERVAL, self.grace / 4)
        self._timer = gevent.get_hub().loop.timer(every, every)
        self._timer.start(self._check)
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._timer.close()

    def _check(self) -> None:
        """In the hub: must neither block nor raise."""
        try:
            now = time.monotonic()
            seen = self._conn.bytes_recv
            if seen != self._seen:
                self._seen, self._quiet_since = seen, now
                return
            quiet = now - self._quiet_since
            if self._readable():
                return
            if quiet >= self.grace:
                self._fire(f"the connection was silent for {self.grace:g}s")
            elif self._deadline is not None and now >= self._deadline and quiet >= DEADLINE_GRACE:
                self._fire(f"the start-up deadline (--connect-timeout) passed, silent for {quiet:.0f}s")
        except Exception as exc:  # a hub callback that raises prints a traceback and is lost
            logger.warning("the silence watchdog stopped: %s: %s", type(exc).__name__, exc)
            self._timer.stop()

    def _socket(self) -> Any:
        # `_transport`, not the `transport` property: on a collected connection that one
        # connects again, a blocking call in the hub.
        return getattr(getattr(self._conn, "_transport", None), "sock", None)

    def _readable(self) -> bool:
        """An answer already in the kernel's buffer: the greenlet has not read it yet."""
        raw = self._raw_socket()
        if raw is None:
            return False
        try:
            return bool(raw.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT))
        except OSError:
            return False
        finally:
            raw.detach()

    def _raw_socket(self) -> Any:
        """The connection's fd as a bare C socket (to detach, never close), or None once
        py-amqp let go of it."""
        sock = self._socket()
        if sock is None:
            return None
        try:
            return _socket.socket(fileno=sock.fileno())
        except (OSError, ValueError):  # closed meanwhile (fileno -1): its waits fail anyway
            return None

    def _fire(self, why: str) -> None:
        self.fired, self.why = True, why
        self._timer.stop()
        # Shut down below any TLS layer (an SSL socket's own shutdown drops its state, and
        # the close after it then fails); the fd stays open under its watchers.
        raw = self._raw_socket()
        if raw is None:
            return
        try:
            raw.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass  # already closed: the wait has its error anyway
        finally:
            raw.detach()
