"""`Pool`: the master's side of the workers: spawn through the fork server, one reader
greenlet per worker, send frames, kill, and turn exits into one `on_gone` callback.

A worker is finished ("gone") once its exit status has been reported and its socket hit
EOF, so a result written just before exiting is never missed. If EOF does not come (a
grandchild kept the socket), the exit status alone finishes it after a second.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from typing import Any

import gevent
from gevent.pool import Group

from .delivery import Delivery
from .errors import ProtocolError
from .forkclient import ForkClient
from .protocol import (
    ExitRequestFrame,
    FrameDecoder,
    MessageFrame,
    ReadyFrame,
    ResultFrame,
    StatsFrame,
    StopFrame,
    encode,
    encode_meta,
    encode_parts,
)
from .workerproc import StateError, WorkerProc, WorkerState

logger = logging.getLogger(__name__)

#: Bytes read from a worker socket at once.
READ_SIZE = 256 * 1024
#: Seconds to wait for EOF after a worker's exit was reported.
EOF_GRACE = 1.0
#: Bodies up to this size are written together with the frame header (one syscall).
COALESCE_BODY = 64 * 1024


class PoolEvents:
    """What the master wants to hear from the pool. Subclassed by the master."""

    def on_worker_ready(self, proc: WorkerProc) -> None: ...
    def on_worker_result(self, proc: WorkerProc, frame: ResultFrame) -> None: ...
    def on_worker_exit_request(self, proc: WorkerProc, reason: str) -> None: ...
    def on_worker_gone(self, proc: WorkerProc, delivery: Delivery | None, status: int | None) -> None: ...


class Pool:
    def __init__(self, fork: ForkClient, group: Group, events: PoolEvents) -> None:
        self._fork = fork
        self._group = group
        self._events = events
        self._next_id = 0
        self.procs: dict[int, WorkerProc] = {}
        self._by_pid: dict[int, WorkerProc] = {}

    def __len__(self) -> int:
        return len(self.procs)

    def live(self) -> list[WorkerProc]:
        return list(self.procs.values())

    def active(self) -> list[WorkerProc]:
        """Workers that count toward the pool's size (not retiring or stopping)."""
        return [proc for proc in self.procs.values() if proc.is_active]

    def use_fork_server(self, fork: ForkClient) -> None:
        self._fork = fork

    def spawn(self) -> WorkerProc | None:
        """Ask the fork server for a worker; None if the fork server is gone (it is restarted
        by the master, which then refills the pool)."""
        self._next_id += 1
        try:
            conn = self._fork.spawn(self._next_id)
        except OSError as exc:
            logger.warning("cannot spawn worker %s: the fork server is gone (%s)", self._next_id, exc)
            return None
        proc = WorkerProc(self._next_id, conn, time.monotonic())
        self.procs[proc.worker_id] = proc
        self._group.spawn(self._read_loop, proc).name = f"reader-{proc.worker_id}"
        return proc

    # -- fork server reports ----------------------------------------------------------------

    def on_spawned(self, worker_id: int, pid: int) -> None:
        proc = self.procs.get(worker_id)
        if proc is None:
            return
        proc.pid = pid
        self._by_pid[pid] = proc
        logger.debug("worker %s started (pid %s)", worker_id, pid)

    def on_exited(self, pid: int, status: int) -> None:
        proc = self._by_pid.pop(pid, None)
        if proc is None:
            return
        proc.exit_status = status
        self._exited(proc)

    def _exited(self, proc: WorkerProc) -> None:
        proc.exited = True
        if proc.eof:
            self._finish(proc)
        else:
            gevent.spawn_later(EOF_GRACE, self._finish, proc)

    def on_server_lost(self) -> None:
        """The fork server died: its workers die with it and nobody will report their exits."""
        for proc in self.live():
            self.kill(proc)
            self._by_pid.pop(proc.pid or -1, None)
            self._exited(proc)

    def reap_missing(self) -> None:
        """Patrol backstop: finish workers whose process is gone without an exit report."""
        for proc in self.live():
            if proc.pid is None or proc.exited:
                continue
            try:
                os.kill(proc.pid, 0)
            except ProcessLookupError:
                logger.warning("worker %s (pid %s) vanished without an exit report", proc.worker_id, proc.pid)
                self._by_pid.pop(proc.pid, None)
                self._exited(proc)

    # -- talking to workers -------------------------------------------------------------------

    def send_message(self, proc: WorkerProc, delivery: Delivery) -> bool:
        """Hand `delivery` to an idle worker; False (and nothing assigned) if the write failed."""
        proc.assign(delivery, time.monotonic())
        frame = MessageFrame(delivery.id, {}, delivery.body)
        head, body = encode_parts(frame, encode_meta([delivery.id, delivery.meta()]))
        try:
            if len(body) <= COALESCE_BODY:
                proc.conn.sendall(head + body)
            else:
                proc.conn.sendall(head)
                proc.conn.sendall(body)
        except OSError as exc:
            logger.warning(
                "worker %s (pid %s): write failed (%s); delivery %s goes back to the cache",
                proc.worker_id,
                proc.pid,
                exc,
                delivery.id,
            )
            proc.unassign()
            proc.retire()
            self.kill(proc)
            return False
        return True

    def stop_worker(self, proc: WorkerProc) -> None:
        """Ask a worker that holds nothing to exit (the end of the retire handshake)."""
        if proc.state in (WorkerState.STOPPING, WorkerState.DEAD):
            return
        proc.stopping()
        try:
            proc.conn.sendall(encode(StopFrame()))
        except OSError:
            pass

    def kill(self, proc: WorkerProc, signum: int = signal.SIGKILL) -> None:
        if proc.pid is None or proc.state is WorkerState.DEAD:
            return
        try:
            os.kill(proc.pid, signum)
        except ProcessLookupError:  # already gone; its exit report is on the way
            pass

    # -- per-worker reader greenlet -----------------------------------------------------------

    def _read_loop(self, proc: WorkerProc) -> None:
        decoder = FrameDecoder()
        conn = proc.conn
        while True:
            try:
                data = conn.recv(READ_SIZE)
            except OSError:
                break
            if not data:
                break
            try:
                for frame in decoder.feed(data):
                    self._on_frame(proc, frame)
            except (ProtocolError, StateError) as exc:
                logger.error(
                    "worker %s (pid %s) sent a bad frame: %s; killing it", proc.worker_id, proc.pid, exc
                )
                self.kill(proc)
                break
        proc.eof = True
        if proc.exited:
            self._finish(proc)

    def _on_frame(self, proc: WorkerProc, frame: Any) -> None:
        if isinstance(frame, ResultFrame):
            self._events.on_worker_result(proc, frame)
        elif isinstance(frame, ReadyFrame):
            proc.booted = True  # even if it was retired while booting: it did boot
            if proc.state is WorkerState.BOOTING:
                proc.ready()
                self._events.on_worker_ready(proc)
        elif isinstance(frame, ExitRequestFrame):
            self._events.on_worker_exit_request(proc, frame.reason)
        elif isinstance(frame, StatsFrame):
            pass
        else:
            raise ProtocolError(f"unexpected {type(frame).__name__} from a worker")

    def _finish(self, proc: WorkerProc) -> None:
        if proc.state is WorkerState.DEAD:
            return
        delivery = proc.dead()
        self.procs.pop(proc.worker_id, None)
        try:
            proc.conn.close()
        except OSError:
            pass
        self._events.on_worker_gone(proc, delivery, proc.exit_status)
