"""Master side of the fork server: start it, ask it for workers, read its reports.

Runs under gevent. The fork server is our only direct child; it is started with gevent's
subprocess (reaped through gevent's child watcher, never a raw SIGCHLD handler) and only
its control socket crosses over.
"""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
from collections.abc import Callable

import gevent

from .config import ENV_PREFIX
from .errors import FatalError, ProtocolError, TargetError
from .protocol import (
    BootErrorFrame,
    ExitedFrame,
    Frame,
    ServerReadyFrame,
    SpawnedFrame,
    SpawnFrame,
    decode,
    encode,
)

logger = logging.getLogger(__name__)

#: Largest control packet, in bytes (matches the fork server).
PACKET_SIZE = 65536
#: Seconds the fork server gets to import the handler module.
BOOT_TIMEOUT = 120.0


class ForkServerGone(OSError):
    """The fork server is not (or no longer) there to fork a worker."""


class ForkClient:
    def __init__(
        self,
        target: str,
        name: str,
        log_level: str,
        log_format: str,
        on_spawned: Callable[[int, int], None],
        on_exited: Callable[[int, int], None],
        on_lost: Callable[[str], None],
    ) -> None:
        self._argv = [
            sys.executable,
            "-m",
            "speed_gevent.forkserver",
            "--target",
            target,
            "--name",
            name,
            "--log-level",
            log_level,
            "--log-format",
            log_format,
        ]
        self._on_spawned = on_spawned
        self._on_exited = on_exited
        self._on_lost = on_lost
        self._ctrl: socket.socket | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._closing = False
        self._ready = False
        self.pid: int | None = None

    def start(self) -> None:
        """Start the fork server and wait until it imported TARGET (TargetError if it could not)."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        # The master's pid now, not when this was built (the master may have forked since).
        argv = [*self._argv, "--fd", str(theirs.fileno()), "--master-pid", str(os.getpid())]
        self._proc = subprocess.Popen(
            argv, pass_fds=(theirs.fileno(),), close_fds=True, env=worker_environment()
        )
        theirs.close()
        self._ctrl = ours
        self.pid = self._proc.pid
        first = self._first_frame()
        if isinstance(first, BootErrorFrame):
            self._proc.wait()
            raise TargetError(first.message)
        if not isinstance(first, ServerReadyFrame):
            raise FatalError(f"fork server sent {type(first).__name__} before ready")
        self._ready = True

    def _first_frame(self) -> Frame:
        assert self._ctrl is not None and self._proc is not None
        with gevent.Timeout(BOOT_TIMEOUT, FatalError(f"fork server not ready in {BOOT_TIMEOUT:.0f}s")):
            data = self._ctrl.recv(PACKET_SIZE)
        if not data:
            code = self._proc.wait()
            raise FatalError(f"fork server exited during start (exit code {code})")
        return decode(data)

    @property
    def ready(self) -> bool:
        """It answers spawn requests (started, not lost, not closing)."""
        return self._ready and not self._closing

    def spawn(self, worker_id: int) -> socket.socket:
        """Ask for worker `worker_id`; returns the master's end of its socketpair."""
        if self._ctrl is None or not self._ready or self._closing:
            raise ForkServerGone("the fork server is not ready")
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            socket.send_fds(self._ctrl, [encode(SpawnFrame(worker_id))], [theirs.fileno()])
        finally:
            theirs.close()
        return ours

    def report_loop(self) -> None:
        """Greenlet body: turn the fork server's reports into callbacks until it is gone."""
        assert self._ctrl is not None
        while True:
            try:
                data = self._ctrl.recv(PACKET_SIZE)
            except OSError:
                data = b""
            if not data:
                break
            try:
                frame = decode(data)
            except ProtocolError as exc:
                logger.error("fork server sent a corrupt report: %s", exc)
                continue
            if isinstance(frame, SpawnedFrame):
                self._on_spawned(frame.worker_id, frame.pid)
            elif isinstance(frame, ExitedFrame):
                self._on_exited(frame.pid, frame.status)
        self._ready = False
        if not self._closing:
            code = self._proc.wait() if self._proc else None
            self._on_lost(f"fork server exited (exit code {code})")

    def stop(self, timeout: float = 5.0) -> None:
        """Close the control socket (the server exits, and its workers die with it)."""
        self._closing = True
        if self._ctrl is not None:
            self._ctrl.close()
        if self._proc is not None and self._proc.poll() is None:
            try:
                self._proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()


def worker_environment() -> dict[str, str]:
    """The master's environment without the broker URL: it holds the password, and every
    handler could read it from os.environ (a handler that needs the broker gets its own)."""
    secret = ENV_PREFIX + "BROKER"
    return {name: value for name, value in os.environ.items() if name != secret}
