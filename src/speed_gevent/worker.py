"""The worker process: plain, unpatched Python that runs the handler.

Forked by the fork server. It reads MessageFrames from its socketpair end, runs the
handler, writes ResultFrames, and exits on StopFrame or EOF. It holds no fd but that
socket and stdio. Signals: INT and HUP are ignored (the master decides); TERM means
"finish the current message, then leave", done through an ExitRequest handshake so the
master never writes a message to a worker that is exiting.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import sys
import traceback
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
)

logger = logging.getLogger(__name__)

#: Seconds between checks of the stop flag and the parent while no frame arrives.
POLL_INTERVAL = 1.0
#: Bytes read from the socket at once.
READ_SIZE = 256 * 1024
#: Longest traceback text sent back, in characters.
TRACEBACK_LIMIT = 2000


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

    def stop(self, reason: str = "requested") -> None:
        """Leave after the current message (through the master's handshake)."""
        self._exit_reason = reason

    def title(self, state: str) -> None:
        set_title(f"speed-gevent: worker {self.id} {state}")

    # -- the loop -------------------------------------------------------------------

    def serve(self) -> WorkerExit:
        self._sock.sendall(encode(ReadyFrame(self.pid)))
        decoder = FrameDecoder()
        self.title("idle")
        while not self._stopping:
            try:
                data = self._sock.recv(READ_SIZE)
            except TimeoutError:
                if os.getppid() != self._parent_pid:
                    return WorkerExit.PARENT_GONE
                self._between_frames()
                continue
            if not data:
                self.app.emit("disconnect", self)
                return WorkerExit.OK
            for frame in decoder.feed(data):
                self._handle_frame(frame)
            self._between_frames()
        return WorkerExit.OK

    def _between_frames(self) -> None:
        if self._exit_reason and not self._exit_requested:
            self._exit_requested = True
            self.title("retiring")
            self._sock.sendall(encode(ExitRequestFrame(self._exit_reason)))

    def _handle_frame(self, frame: object) -> None:
        if isinstance(frame, MessageFrame):
            self._sock.sendall(encode(self._run(frame)))
        elif isinstance(frame, StopFrame):
            self._stopping = True
            self.title("stopping")
        else:
            raise ProtocolError(f"unexpected frame {type(frame).__name__} from the master")

    def _run(self, frame: MessageFrame) -> ResultFrame:
        message = Message(frame.body, frame.meta)
        self.title(f"busy {message.queue}")
        handler = self.app.message_handler
        assert handler is not None
        try:
            self.app.emit("message", self, message)
            handler(message)
            result = ResultFrame(frame.id, Outcome.OK)
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
        self.title("retiring" if self._exit_requested else "idle")
        return result


def _safe_str(exc: BaseException) -> str:
    try:
        return str(exc)[:TRACEBACK_LIMIT]
    except Exception:
        return f"<unprintable {type(exc).__name__}>"


def _install_signals(worker: Worker) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, lambda signum, frame: worker.stop("TERM received"))
    for sig in (signal.SIGCHLD, signal.SIGUSR1, signal.SIGUSR2, signal.SIGTTIN, signal.SIGTTOU):
        signal.signal(sig, signal.SIG_DFL)
    for signum, callbacks in worker.app.signal_handlers.items():
        signal.signal(signum, _user_signal(worker, callbacks))


def _user_signal(worker: Worker, callbacks: list) -> object:
    def handle(signum: int, frame: object) -> None:
        for callback in callbacks:
            try:
                callback(signum, worker)
            except Exception:
                logger.exception("worker signal handler %r raised", callback)

    return handle


def run_worker(sock: socket.socket, app: App, worker_id: int, name: str, parent_pid: int) -> NoReturn:
    """Body of a freshly forked worker; never returns into the fork server's code."""
    code = WorkerExit.OK
    try:
        if not die_with_parent(parent_pid):
            os._exit(WorkerExit.PARENT_GONE)
        # The fd came from the gevent master, where it is non-blocking at the OS level.
        sock.setblocking(True)
        sock.settimeout(POLL_INTERVAL)
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
