"""`WorkerLinks`: the master's I/O with its workers, and nothing else.

Spawns through the fork server, reads each worker's socket in its own greenlet, writes
frames, sends signals, and reports what happened as events (`LinkEvents`) for the
router to decide on. It keeps no message state.

Writes never yield: frames queue per worker while the master carries out a batch of
actions, then go out with one non-blocking `os.write` per worker (`flush`); what the
socket does not take waits for that worker's writer greenlet, so frames to one worker
keep their order and only one greenlet ever writes a socket. When a write fails, the
router is told exactly which message frames did not go out whole: those never reached
the handler, while the ones before them may have (and may be running).

A worker is "gone" once its exit was reported and its socket hit EOF, so a result
written just before it exited is never missed; if EOF does not come (a grandchild kept
the socket), the exit report alone ends it after a second, after one last read of
whatever the socket still holds.
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
    OkFrame,
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
#: Most parts handed to one writev/sendmsg call (Linux's IOV_MAX is 1024).
IOV_MAX = 512
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
    def ok(self, worker_id: int, frame: OkFrame) -> None: ...
    def result(self, worker_id: int, frame: ResultFrame) -> None: ...
    def exit_request(self, worker_id: int, reason: str) -> None: ...
    def broken(self, worker_id: int, why: str) -> None: ...
    def write_failed(self, worker_id: int, undelivered: list[int]) -> None: ...
    def gone(self, worker_id: int, status: int | None) -> None: ...


class _Link:
    __slots__ = ("worker_id", "sock", "fd", "pid", "out", "writer", "eof", "exited", "status",
                 "finished", "failed", "dirty", "decoder")  # fmt: skip

    def __init__(self, worker_id: int, sock: Any) -> None:
        self.worker_id = worker_id
        self.sock = sock
        self.fd: int = sock.fileno()
        self.pid: int | None = None
        #: what the socket has not taken yet, in order: (bytes, delivery id of a message frame)
        self.out: list[tuple[bytes | memoryview, int | None]] = []
        self.writer: gevent.Greenlet | None = None
        self.eof = False
        self.exited = False
        self.status: int | None = None
        self.finished = False
        self.failed = False  # a write failed: nothing more is written
        self.dirty = False  # has frames queued for the next flush
        self.decoder = FrameDecoder(max_meta=MAX_WORKER_META_SIZE, max_body=0)


class WorkerLinks:
    def __init__(self, fork: ForkClient, spawn: Spawner, events: LinkEvents) -> None:
        self._fork = fork
        self._spawn_greenlet = spawn
        self._events = events
        self._links: dict[int, _Link] = {}
        self._by_pid: dict[int, _Link] = {}
        self._spawns: gevent.queue.Queue[int] = gevent.queue.Queue()
        self._stop_early: set[int] = set()  # a stop asked before the spawn went out
        self._kill_early: set[int] = set()  # a kill asked before the pid was known
        self._term_early: set[int] = set()  # a TERM asked before the pid was known
        self._dirty: list[_Link] = []  # links with frames queued since the last flush

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
            fork = self._fork
            try:
                sock = fork.spawn(worker_id)
                if fork is not self._fork or not fork.ready:
                    sock.close()  # the fork server died while we asked: its child dies too
                    raise OSError("the fork server died during the request")
            except OSError as exc:
                logger.warning("cannot spawn worker %s: the fork server is gone (%s)", worker_id, exc)
                self._stop_early.discard(worker_id)
                self._kill_early.discard(worker_id)
                self._term_early.discard(worker_id)
                self._events.spawn_failed(worker_id)
                continue
            link = _Link(worker_id, sock)
            self._links[worker_id] = link
            self._spawn_greenlet(f"reader-{worker_id}", self._read_loop, link)
            if worker_id in self._stop_early:
                self._stop_early.discard(worker_id)
                self._write(link, _STOP)
                self.flush()

    def on_spawned(self, worker_id: int, pid: int) -> None:
        link = self._links.get(worker_id)
        if link is None:
            return
        link.pid = pid
        self._by_pid[pid] = link
        self._events.spawned(worker_id, pid)
        if worker_id in self._kill_early:
            self._kill_early.discard(worker_id)
            self._signal(link, signal.SIGKILL)
        elif worker_id in self._term_early:
            self._signal(link, signal.SIGTERM)
        self._term_early.discard(worker_id)

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
            self._events.write_failed(worker_id, [delivery.id])
            return
        meta = delivery.frame_meta
        body = delivery.body
        head = HEADER.pack(MAGIC, VERSION, FrameType.MESSAGE, len(meta), len(body))
        if len(body) <= COALESCE_BODY:
            self._write(link, head + meta + body, delivery.id)
        else:  # no copy of a large body; the frame is delivered once its last part is
            self._write(link, head + meta)
            self._write(link, body, delivery.id)

    def send_stop(self, worker_id: int) -> None:
        link = self._links.get(worker_id)
        if link is None:
            self._stop_early.add(worker_id)
        else:
            self._write(link, _STOP)

    def term(self, worker_id: int) -> None:
        link = self._links.get(worker_id)
        if link is None or link.pid is None:
            self._term_early.add(worker_id)  # on_spawned sends it
        else:
            self._signal(link, signal.SIGTERM)

    def kill(self, worker_id: int) -> None:
        link = self._links.get(worker_id)
        if link is None or link.pid is None:
            self._kill_early.add(worker_id)  # on_spawned kills it
        else:
            self._signal(link, signal.SIGKILL)

    def _write(self, link: _Link, data: bytes, delivery_id: int | None = None) -> None:
        """Queue a frame (or its last part, for `delivery_id`); `flush()` writes it."""
        if link.failed:
            if delivery_id is not None:
                self._events.write_failed(link.worker_id, [delivery_id])
            return
        link.out.append((data, delivery_id))
        if link.writer is None and not link.dirty:
            link.dirty = True
            self._dirty.append(link)

    def flush(self) -> None:
        """Write what each worker got in this batch of actions: one non-blocking write
        per worker; what the socket does not take goes to that worker's writer greenlet."""
        dirty, self._dirty = self._dirty, []
        for link in dirty:
            link.dirty = False
            if link.failed or link.writer is not None or not link.out:
                continue
            try:  # writev: the frames of a batch in one call, a large body without a copy
                sent = os.writev(link.fd, [part for part, _ in link.out[:IOV_MAX]])
            except BlockingIOError:
                sent = 0
            except OSError:
                self._write_failed(link)
                continue
            _consume(link.out, sent)
            if link.out:
                link.writer = self._spawn_greenlet(f"writer-{link.worker_id}", self._write_loop, link)

    def _write_loop(self, link: _Link) -> None:
        """Greenlet body: send what the socket did not take, waiting for it to drain."""
        try:
            while link.out and not link.failed:
                sent = link.sock.sendmsg([part for part, _ in link.out[:IOV_MAX]])
                _consume(link.out, sent)
        except OSError:
            link.writer = None
            self._write_failed(link)
            return
        link.writer = None

    def _write_failed(self, link: _Link) -> None:
        """The socket is broken: the message frames not sent whole never reached the worker."""
        if link.failed:
            return
        link.failed = True
        undelivered = [delivery_id for _, delivery_id in link.out if delivery_id is not None]
        link.out = []
        self._events.write_failed(link.worker_id, undelivered)

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
        sock = link.sock
        while not link.finished:
            try:
                data = sock.recv(READ_SIZE)
            except OSError:
                break
            if not data or not self._deliver(link, data):
                break
        link.eof = True
        if link.exited:
            self._finish(link)

    def _deliver(self, link: _Link, data: bytes) -> bool:
        """Decode and report frames; False if the worker sent nonsense (it is ended)."""
        events = self._events
        worker_id = link.worker_id
        try:
            frames = link.decoder.feed(data)
        except ProtocolError as exc:
            events.broken(worker_id, f"sent a bad frame: {exc}")
            return False
        for frame in frames:
            if isinstance(frame, OkFrame):
                events.ok(worker_id, frame)
            elif isinstance(frame, ResultFrame):
                events.result(worker_id, frame)
            elif isinstance(frame, ReadyFrame):
                events.ready(worker_id)
            elif isinstance(frame, ExitRequestFrame):
                events.exit_request(worker_id, frame.reason)
            elif not isinstance(frame, StatsFrame):
                events.broken(worker_id, f"sent an unexpected {type(frame).__name__}")
                return False
        return True

    def _exited(self, link: _Link) -> None:
        link.exited = True
        if link.eof:
            self._finish(link)
        else:
            self._spawn_greenlet(f"eof-wait-{link.worker_id}", self._finish_later, link)

    def _finish_later(self, link: _Link) -> None:
        gevent.sleep(EOF_GRACE)
        if not link.finished and not link.eof:
            self._read_what_is_left(link)
        self._finish(link)

    def _read_what_is_left(self, link: _Link) -> None:
        """EOF did not come: take whatever results the socket still holds before closing."""
        try:
            while True:
                data = os.read(link.fd, READ_SIZE)
                if not data or not self._deliver(link, data):
                    return
        except OSError:  # BlockingIOError: nothing more; others: the socket is gone
            return

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


def _consume(out: list[tuple[bytes | memoryview, int | None]], sent: int) -> None:
    """Drop the first `sent` bytes from the queue of parts (keeping part boundaries)."""
    while sent and out:
        part, delivery_id = out[0]
        if sent >= len(part):
            sent -= len(part)
            out.pop(0)
        else:
            out[0] = (memoryview(part)[sent:], delivery_id)
            return
