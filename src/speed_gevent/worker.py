"""The worker process: plain, unpatched Python that runs the handler.

Forked by the fork server. It reads MessageFrames from its socketpair end, runs the
handler on each in order, writes each result as its handler returns (an OkFrame of a few
bytes with the handler's start and end, or a ResultFrame with the error), and exits on
StopFrame or EOF. It holds no fd but that
socket and stdio. Signals: INT and HUP are ignored (the master decides); TERM means
"finish the current message, then leave", done through an ExitRequest handshake so the
master never writes a message to a worker that is exiting: after an ExitRequest the
worker starts nothing more, and the master takes back what it sent and was not started.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import struct
import sys
import time
import traceback
from collections import deque
from dataclasses import replace
from typing import NoReturn

from .app import App
from .errors import ProtocolError, Reject, Retry, WorkerExit
from .message import Message
from .osproc import die_with_parent, set_title
from .protocol import (
    ExitRequestFrame,
    FrameDecoder,
    MessageFrame,
    Outcome,
    ReadyFrame,
    ResultFrame,
    StopFrame,
    encode,
    encode_ok,
)

logger = logging.getLogger(__name__)

#: Seconds an idle worker sleeps in the kernel before it looks at its stop flag again.
IDLE_RECHECK = 5
#: Bytes read from the socket at once (a reused buffer: every idle worker keeps it resident).
READ_SIZE = 64 * 1024
#: Longest traceback text sent back, in characters.
TRACEBACK_LIMIT = 2000


class _Wakeup(BaseException):
    """Raised by `stop()` (TERM, or a user signal handler) to leave the idle wait, never
    while a byte is at stake. A BaseException, so a handler's `except Exception` lets it by."""


class Worker:
    """Handed to worker events and signal handlers: who this worker is, and a way out."""

    def __init__(self, worker_id: int, name: str, app: App, sock: socket.socket, parent_pid: int) -> None:
        self.id = worker_id
        self._parent_pid = parent_pid
        self.name = name
        self.pid = os.getpid()
        self.app = app
        self.handled = 0
        self._sock = sock
        self._exit_reason: str | None = None
        self._exit_requested = False
        self._stopping = False
        self._idle = False  # blocked in the idle wait: a TERM may interrupt it
        self._state = ""

    def stop(self, reason: str = "requested") -> None:
        """Leave after the current message (through the master's handshake). Safe from
        any thread and any handler: it only sets a flag; a signal handler wakes the idle
        wait once all its callbacks ran (another thread's stop is seen within IDLE_RECHECK)."""
        self._exit_reason = reason

    def _wake_if_stopping(self) -> None:
        """Called last in a signal handler (the main thread): leave the idle wait now."""
        if self._idle and self._exit_reason is not None and not self._exit_requested:
            raise _Wakeup()

    def title(self, state: str) -> None:
        set_title(f"speed-gevent: worker {self.id} {state}")

    def _set_state(self, state: str) -> None:
        """The process title follows idle/busy/retiring/stopping, not each message."""
        if state != self._state:
            self._state = state
            self.title(state)

    # -- the loop -------------------------------------------------------------------
    #
    # While frames wait, reads are non-blocking (one recv_into a reused buffer per batch).
    # With nothing to do, the worker blocks in a MSG_PEEK of one byte: the peek consumes
    # nothing, so a TERM handler may raise out of it without losing a byte of the stream.

    def serve(self) -> WorkerExit:
        sock = self._sock
        sock.sendall(encode(ReadyFrame(self.pid)))
        decoder = FrameDecoder()
        buffer = bytearray(READ_SIZE)
        view = memoryview(buffer)
        pending: deque[object] = deque()
        self._set_state("idle")
        while not self._stopping:
            if pending:
                self._handle_frame(pending.popleft())
                continue
            try:
                size = sock.recv_into(buffer, READ_SIZE, socket.MSG_DONTWAIT)
            except BlockingIOError:
                self._between_frames()
                if not self._stopping:
                    self._set_state("retiring" if self._exit_requested else "idle")
                    self._wait_for_data()
                continue
            if not size:
                self.app.emit("disconnect", self)
                return WorkerExit.OK
            pending.extend(decoder.feed(view[:size]))
        return WorkerExit.OK

    def _wait_for_data(self) -> None:
        """Block until a byte arrives, a TERM wakes us, or IDLE_RECHECK passes (SO_RCVTIMEO:
        a TERM that lands between our check and the system call is seen then)."""
        try:
            self._idle = True
            try:
                if self._exit_reason is None or self._exit_requested:
                    self._sock.recv(1, socket.MSG_PEEK)
            finally:
                self._idle = False
        except (_Wakeup, BlockingIOError, TimeoutError):
            pass

    def _between_frames(self) -> None:
        if self._exit_reason and not self._exit_requested:
            self._exit_requested = True
            self._set_state("retiring")
            self._sock.sendall(encode(ExitRequestFrame(self._exit_reason)))

    def _handle_frame(self, frame: object) -> None:
        if isinstance(frame, MessageFrame):
            if self._exit_reason is not None:
                # Asked to leave: start nothing more. The master hands back whatever it
                # sent us that we did not start (ExitRequest says we started nothing else).
                self._between_frames()
                return
            self._sock.sendall(self._run(frame))
        elif isinstance(frame, StopFrame):
            self._stopping = True
            self._set_state("stopping")
        else:
            raise ProtocolError(f"unexpected frame {type(frame).__name__} from the master")

    def _run(self, frame: MessageFrame) -> bytes:
        started = time.monotonic()
        message = Message(frame.body, frame.meta)
        if self._state != "busy":
            self._state = "busy"
            self.title(f"busy {message.queue}")
        handler = self.app.message_handler
        assert handler is not None
        try:
            self.app.emit("message", self, message)
            handler(message)
            self.handled += 1
            return encode_ok(frame.id, started, time.monotonic())
        except Retry as exc:
            result = ResultFrame(frame.id, Outcome.RETRY, "Retry", str(exc), retry_delay=exc.delay)
        except Reject as exc:
            result = ResultFrame(frame.id, Outcome.REJECT, "Reject", exc.reason)
        except Exception as exc:
            self.app.emit("error", exc, self)
            result = ResultFrame(
                frame.id,
                Outcome.ERROR,
                type(exc).__qualname__,
                _safe_str(exc),
                traceback.format_exc(limit=8)[-TRACEBACK_LIMIT:],
            )
        self.handled += 1
        return encode(replace(result, started_at=started, finished_at=time.monotonic()))


def _safe_str(exc: BaseException) -> str:
    try:
        return str(exc)[:TRACEBACK_LIMIT]
    except Exception:
        return f"<unprintable {type(exc).__name__}>"


def _install_signals(worker: Worker) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, _on_term(worker))
    for sig in (signal.SIGCHLD, signal.SIGUSR1, signal.SIGUSR2, signal.SIGTTIN, signal.SIGTTOU):
        signal.signal(sig, signal.SIG_DFL)
    for signum, callbacks in worker.app.signal_handlers.items():
        signal.signal(signum, _user_signal(worker, callbacks))


def _on_term(worker: Worker) -> object:
    def handle(signum: int, frame: object) -> None:
        worker.stop("TERM received")
        worker._wake_if_stopping()

    return handle


def _user_signal(worker: Worker, callbacks: list) -> object:
    def handle(signum: int, frame: object) -> None:
        for callback in callbacks:
            try:
                callback(signum, worker)
            except Exception:
                logger.exception("worker signal handler %r raised", callback)
        worker._wake_if_stopping()  # after every callback ran, even if one called stop()

    return handle


def run_worker(sock: socket.socket, app: App, worker_id: int, name: str, parent_pid: int) -> NoReturn:
    """Body of a freshly forked worker; never returns into the fork server's code."""
    code = WorkerExit.OK
    try:
        if not die_with_parent(parent_pid):
            os._exit(WorkerExit.PARENT_GONE)
        # The fd came from the gevent master, where it is non-blocking at the OS level.
        # Blocking, with no per-call timeout: the parent's death arrives as PDEATHSIG or EOF.
        # Only the idle wait gives up after IDLE_RECHECK, at the socket level (no poll).
        sock.setblocking(True)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, struct.pack("ll", IDLE_RECHECK, 0))
        worker = Worker(worker_id, name, app, sock, parent_pid)
        _install_signals(worker)
        worker.title("starting")
        try:
            app.emit_strict("start", worker)
        except Exception as exc:
            logger.error(
                "worker %s (pid %s): start event raised %s: %s; cannot boot",
                worker_id,
                worker.pid,
                type(exc).__name__,
                exc,
            )
            os._exit(WorkerExit.BOOT_FAILED)
        try:
            code = worker.serve()
        except ProtocolError as exc:
            logger.error("worker %s (pid %s): %s; exiting", worker_id, worker.pid, exc)
            code = WorkerExit.PROTOCOL_ERROR
        except (BrokenPipeError, ConnectionResetError):
            app.emit("disconnect", worker)
        app.emit("end", worker)
    except BaseException:  # a crash must never fall through into the fork server loop
        logger.exception("worker %s crashed", worker_id)
        code = WorkerExit.CRASHED
    _flush_stdio()
    os._exit(code)


def _flush_stdio() -> None:
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:
            pass
