"""The fork server: a fresh, unpatched interpreter that preforks workers for the master.

Started by the master as `python -m speed_gevent.forkserver --fd N ...` with only its
control socket (AF_UNIX SOCK_SEQPACKET, one frame per packet) passed. It imports the
handler once, so workers share its pages and a broken TARGET is reported before any
worker exists. Then it loops: a SpawnFrame arrives with a socketpair end (SCM_RIGHTS),
it forks, and reports the pid; on SIGCHLD it reaps and reports each exit status.

Why not fork the master: after `fork()` from a running gevent master, its greenlets run
on in the child, the child inherits the broker socket and every other worker's socket,
and handlers would run monkey-patched. A fresh interpreter has none of that.

It dies with the master (PDEATHSIG) and ignores TERM/INT/HUP, which a terminal or
`kill -- -PGID` sends to the whole group: the master alone decides when workers stop.
"""

from __future__ import annotations

import argparse
import gc
import logging
import os
import select
import signal
import socket
import sys

from .errors import TargetError, WorkerExit
from .logsetup import setup_logging
from .osproc import die_with_parent, release_free_memory, set_title
from .protocol import (
    BootErrorFrame,
    ExitedFrame,
    ServerReadyFrame,
    SpawnedFrame,
    SpawnFrame,
    decode,
    encode,
)
from .worker import run_worker

logger = logging.getLogger(__name__)

#: Largest control packet, in bytes.
PACKET_SIZE = 65536


class ForkServer:
    def __init__(self, ctrl: socket.socket, app: object, name: str, master_pid: int) -> None:
        self.ctrl = ctrl
        self.master_pid = master_pid
        self.app = app
        self.name = name
        self.pid = os.getpid()
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)

    def serve(self) -> int:
        """Fork on request until the master closes its end or dies.

        A master that closes with our last report still unread resets the socket instead
        of a plain EOF (and a write after its close breaks the pipe): both only mean it is
        done with us."""
        try:
            return self._serve()
        except ConnectionError:
            return WorkerExit.OK if os.getppid() == self.master_pid else WorkerExit.PARENT_GONE

    def _serve(self) -> int:
        signal.set_wakeup_fd(self._wake_w)
        # A Python-level handler is needed for the wakeup fd to be written on SIGCHLD.
        signal.signal(signal.SIGCHLD, lambda signum, frame: None)
        self.ctrl.sendall(encode(ServerReadyFrame(self.pid)))
        poller = select.poll()  # poll(2) holds no fd a child could inherit, unlike epoll
        poller.register(self.ctrl.fileno(), select.POLLIN)
        poller.register(self._wake_r, select.POLLIN)
        while os.getppid() == self.master_pid:
            for fd, _events in poller.poll(1000):
                if fd == self._wake_r:
                    self._drain_wakeups()
                elif not self._serve_request():
                    return WorkerExit.OK
            self._reap()
        return WorkerExit.PARENT_GONE

    def _drain_wakeups(self) -> None:
        try:
            while os.read(self._wake_r, 512):
                pass
        except BlockingIOError:
            pass

    def _serve_request(self) -> bool:
        data, fds, _flags, _addr = socket.recv_fds(self.ctrl, PACKET_SIZE, 1)
        if not data:
            return False
        frame = decode(data)
        if not isinstance(frame, SpawnFrame) or len(fds) != 1:
            for fd in fds:
                os.close(fd)
            logger.error("fork server: unexpected request %r with %d fds", frame, len(fds))
            return True
        self._fork(frame.worker_id, fds[0])
        return True

    def _fork(self, worker_id: int, fd: int) -> None:
        pid = os.fork()
        if pid == 0:
            self._become_worker(worker_id, fd)
        os.close(fd)
        self.ctrl.sendall(encode(SpawnedFrame(worker_id, pid)))

    def _become_worker(self, worker_id: int, fd: int) -> None:
        signal.set_wakeup_fd(-1)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        os.close(self._wake_r)
        os.close(self._wake_w)
        self.ctrl.close()
        sock = socket.socket(fileno=fd)
        run_worker(sock, self.app, worker_id, self.name, self.pid)  # type: ignore[arg-type]

    def _reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            self.ctrl.sendall(encode(ExitedFrame(pid, status)))


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="speed_gevent.forkserver")
    parser.add_argument("--fd", type=int, required=True)
    parser.add_argument("--target", required=True)
    parser.add_argument("--name", default="default")
    parser.add_argument("--log-level", default="info")
    parser.add_argument("--log-format", default="text")
    parser.add_argument("--master-pid", type=int, required=True)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    ctrl = socket.socket(fileno=args.fd)
    # The master's socket is non-blocking at the OS level and the flag travels with the fd.
    ctrl.setblocking(True)
    if not die_with_parent(args.master_pid):  # the master may have died before prctl ran
        return WorkerExit.PARENT_GONE
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2):
        signal.signal(sig, signal.SIG_IGN)
    setup_logging(args.log_level, args.log_format)
    set_title(f"speed-gevent: forkserver {args.name}")
    from .target import load_target

    try:
        app = load_target(args.target)
    except TargetError as exc:
        ctrl.sendall(encode(BootErrorFrame(str(exc))))
        return WorkerExit.BOOT_FAILED
    except BaseException as exc:  # SystemExit or KeyboardInterrupt while importing user code
        ctrl.sendall(encode(BootErrorFrame(f"TARGET {args.target!r}: import raised {exc!r}")))
        return WorkerExit.BOOT_FAILED
    # Everything a worker runs is imported now, and what exists is moved out of the cyclic
    # GC's reach: a collection in a worker would otherwise write to (and so copy) every
    # shared page holding an object header.
    gc.collect()
    gc.freeze()
    release_free_memory()  # fewer pages for every worker to share
    return ForkServer(ctrl, app, args.name, args.master_pid).serve()


if __name__ == "__main__":
    sys.exit(main())
