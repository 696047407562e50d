"""`WorkerLinks`: the master's I/O with its workers, and nothing else.

Spawns through the fork server, reads each worker's socket in its own greenlet, writes
frames, sends signals, and reports what happened as events (`LinkEvents`) for the
router to decide on. It keeps no message state.

Writes never yield: a frame goes out with one non-blocking `os.write`; what the socket
does not take at once waits in the link's buffer for a writer greenlet, so frames to one
worker keep their order and only one greenlet ever writes a socket. A worker is "gone"
once its exit was reported and its socket hit EOF, so a result written just before it
exited is never missed (if EOF does not come, the exit report alone ends it after a
second).
"""

from __future__ import annotations

import logging
import os
import signal
from collections.abc import Callable
from typing import Any, Protocol

import gevent
import gevent.queue

from .delivery import Delivery
from .errors import ProtocolError
from .forkclient import ForkClient
from .protocol import (
    HEADER,
    MAGIC,
    MAX_WORKER_META_SIZE,
    VERSION,
    ExitRequestFrame,
    FrameDecoder,
    FrameType,
    ReadyFrame,
    ResultFrame,
    StatsFrame,
    StopFrame,
    encode,
)

logger = logging.getLogger(__name__)

#: Bytes read from a worker socket at once.
READ_SIZE = 256 * 1024
#: Bodies up to this size are written together with the frame header (one syscall).
COALESCE_BODY = 64 * 1024
#: Seconds to wait for EOF after a worker's exit was reported.
EOF_GRACE = 1.0

_STOP = encode(StopFrame())

#: Starts a named greenlet that the master links (a crash in it stops the master).
Spawner = Callable[..., gevent.Greenlet]


class LinkEvents(Protocol):
    """What the links report; the master turns each into a router event."""

    def spawn_failed(self, worker_id: int) -> None: ...
    def spawned(self, worker_id: int, pid: int) -> None: ...
    def ready(self, worker_id: int) -> None: ...
    def result(self, worker_id: int, frame: ResultFrame) -> None: ...
    def exit_request(self, worker_id: int, reason: str) -> None: ...
    def broken(self, worker_id: int, why: str) -> None: ...
    def write_failed(self, worker_id: int) -> None: ...
    def gone(self, worker_id: int, status: int | None) -> None: ...


class _Link:
    __slots__ = ("worker_id", "sock", "fd", "pid", "out", "writer", "eof", "exited", "status",
                 "finished", "failed")  # fmt: skip

    def __init__(self, worker_id: int, sock: Any) -> None:
        self.worker_id = worker_id
        self.sock = sock
        self.fd: int = sock.fileno()
        self.pid: int | None = None
        self.out: list[bytes] = []  # bytes the socket did not take yet, in order
        self.writer: gevent.Greenlet | None = None
        self.eof = False
        self.exited = False
        self.status: int | None = None
        self.finished = False
        self.failed = False  # a write failed: nothing more is written


class WorkerLinks:
    def __init__(self, fork: ForkClient, spawn: Spawner, events: LinkEvents) -> None:
        self._fork = fork
        self._spawn_greenlet = spawn
        self._events = events
        self._links: dict[int, _Link] = {}
        self._by_pid: dict[int, _Link] = {}
        self._spawns: gevent.queue.Queue[int] = gevent.queue.Queue()
        self._early: dict[int, str] = {}  # stop/kill asked before the spawn went out

    def __len__(self) -> int:
        return len(self._links)

    def pids(self) -> dict[int, int]:
        return {wid: link.pid for wid, link in self._links.items() if link.pid is not None}

    def use_fork_server(self, fork: ForkClient) -> None:
        self._fork = fork

    # -- spawning ----------------------------------------------------------------------

    def spawn(self, worker_id: int) -> None:
        """Queue a spawn; the spawner greenlet talks to the fork server (never inline)."""
        self._spawns.put(worker_id)

    def spawner_loop(self) -> None:
        """Greenlet body: one spawn request at a time to the fork server."""
        while True:
            worker_id = self._spawns.get()
            try:
                sock = self._fork.spawn(worker_id)
            except OSError as exc:
                logger.warning("cannot spawn worker %s: the fork server is gone (%s)", worker_id, exc)
                self._early.pop(worker_id, None)
                self._events.spawn_failed(worker_id)
                continue
            link = _Link(worker_id, sock)
            self._links[worker_id] = link
            self._spawn_greenlet(f"reader-{worker_id}", self._read_loop, link)
            early = self._early.pop(worker_id, None)
            if early == "stop":
                self._write(link, _STOP)

    def on_spawned(self, worker_id: int, pid: int) -> None:
        link = self._links.get(worker_id)
        if link is None:
            return
        link.pid = pid
        self._by_pid[pid] = link
        self._events.spawned(worker_id, pid)
        if self._early.pop(worker_id, None) == "kill":
            self._signal(link, signal.SIGKILL)

    def on_exited(self, pid: int, status: int) -> None:
        link = self._by_pid.pop(pid, None)
        if link is not None:
            link.status = status
            self._exited(link)

    def on_server_lost(self) -> None:
        """The fork server died: its workers die with it and nobody reports their exits."""
        for link in list(self._links.values()):
            self._signal(link, signal.SIGKILL)
            self._by_pid.pop(link.pid or -1, None)
            link.status = None
            self._exited(link)

    def reap_missing(self) -> None:
        """Patrol backstop: finish workers whose process is gone without an exit report."""
        for link in list(self._links.values()):
            if link.pid is None or link.exited:
                continue
            try:
                os.kill(link.pid, 0)
            except ProcessLookupError:
                logger.warning("worker %s (pid %s) vanished without an exit report", link.worker_id, link.pid)
                self._by_pid.pop(link.pid, None)
                self._exited(link)

    # -- writing ------------------------------------------------------------------------

    def send_message(self, worker_id: int, delivery: Delivery) -> None:
        link = self._links.get(worker_id)
        if link is None:
            self._events.write_failed(worker_id)
            return
        meta = delivery.frame_meta
        body = delivery.body
        head = HEADER.pack(MAGIC, VERSION, FrameType.MESSAGE, len(meta), len(body))
        if len(body) <= COALESCE_BODY:
            self._write(link, head + meta + body)
        else:
            self._write(link, head + meta, body)  # no copy of a large body

    def send_stop(self, worker_id: int) -> None:
        link = self._links.get(worker_id)
        if link is None:
            self._early[worker_id] = "stop"
        else:
            self._write(link, _STOP)

    def kill(self, worker_id: int) -> None:
        link = self._links.get(worker_id)
        if link is None:
            self._early[worker_id] = "kill"
        elif link.pid is None:
            self._early[worker_id] = "kill"  # on_spawned kills it
        else:
            self._signal(link, signal.SIGKILL)

    def _write(self, link: _Link, data: bytes, more: bytes = b"") -> None:
        if link.failed:
            return
        if link.out or link.writer is not None:
            link.out.append(data)
            if more:
                link.out.append(more)
            return
        try:
            sent = os.write(link.fd, data)
        except BlockingIOError:
            sent = 0
        except OSError:
            self._write_failed(link)
            return
        rest = [data[sent:]] if sent < len(data) else []
        if more:
            rest.append(more)
        if rest:
            link.out.extend(rest)
            link.writer = self._spawn_greenlet(f"writer-{link.worker_id}", self._write_loop, link)

    def _write_loop(self, link: _Link) -> None:
        try:
            while link.out and not link.failed:
                chunks, link.out = link.out, []
                link.sock.sendall(b"".join(chunks))
        except OSError:
            link.writer = None
            self._write_failed(link)
            return
        link.writer = None

    def _write_failed(self, link: _Link) -> None:
        if link.failed:
            return
        link.failed = True
        link.out = []
        self._events.write_failed(link.worker_id)

    @staticmethod
    def _signal(link: _Link, signum: int) -> None:
        if link.pid is None or link.exited:
            return
        try:
            os.kill(link.pid, signum)
        except ProcessLookupError:  # already gone; its exit report is on the way
            pass

    # -- reading ------------------------------------------------------------------------

    def _read_loop(self, link: _Link) -> None:
        decoder = FrameDecoder(max_meta=MAX_WORKER_META_SIZE, max_body=0)
        sock = link.sock
        events = self._events
        worker_id = link.worker_id
        while True:
            try:
                data = sock.recv(READ_SIZE)
            except OSError:
                break
            if not data:
                break
            try:
                frames = decoder.feed(data)
            except ProtocolError as exc:
                events.broken(worker_id, f"sent a bad frame: {exc}")
                break
            for frame in frames:
                if isinstance(frame, ResultFrame):
                    events.result(worker_id, frame)
                elif isinstance(frame, ReadyFrame):
                    events.ready(worker_id)
                elif isinstance(frame, ExitRequestFrame):
                    events.exit_request(worker_id, frame.reason)
                elif not isinstance(frame, StatsFrame):
                    events.broken(worker_id, f"sent an unexpected {type(frame).__name__}")
        link.eof = True
        if link.exited:
            self._finish(link)

    def _exited(self, link: _Link) -> None:
        link.exited = True
        if link.eof:
            self._finish(link)
        else:
            self._spawn_greenlet(f"eof-wait-{link.worker_id}", self._finish_later, link)

    def _finish_later(self, link: _Link) -> None:
        gevent.sleep(EOF_GRACE)
        self._finish(link)

    def _finish(self, link: _Link) -> None:
        if link.finished:
            return
        link.finished = True
        self._links.pop(link.worker_id, None)
        if link.writer is not None:
            link.writer.kill(block=False)
        try:
            link.sock.close()
        except OSError:
            pass
        self._events.gone(link.worker_id, link.status)
