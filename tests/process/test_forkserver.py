"""The fork server and workers over real sockets and forks, driven by a blocking stand-in
for the master (no broker, no gevent in this process)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from speed_gevent.errors import WorkerExit
from speed_gevent.protocol import (
    BootErrorFrame,
    ExitedFrame,
    ExitRequestFrame,
    FrameDecoder,
    MessageFrame,
    OkFrame,
    Outcome,
    ReadyFrame,
    ServerReadyFrame,
    SpawnedFrame,
    SpawnFrame,
    StopFrame,
    decode,
    encode,
)
from tests.conftest import ROOT, wait_until
from tests.helpers import alive

pytestmark = pytest.mark.timeout(60)


class ForkServerHarness:
    def __init__(self, target: str, env: dict[str, str] | None = None, stderr=None) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.ctrl = ours
        self.ctrl.settimeout(10)
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "speed_gevent.forkserver",
                "--fd",
                str(theirs.fileno()),
                "--target",
                target,
                "--master-pid",
                str(os.getpid()),
            ],
            pass_fds=(theirs.fileno(),),
            cwd=ROOT,
            env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})},
            stderr=stderr,
        )
        theirs.close()
        self.first = decode(self.ctrl.recv(65536))

    def spawn(self, worker_id: int = 1) -> tuple[int, socket.socket]:
        master_end, worker_end = socket.socketpair()
        socket.send_fds(self.ctrl, [encode(SpawnFrame(worker_id))], [worker_end.fileno()])
        worker_end.close()
        spawned = decode(self.ctrl.recv(65536))
        assert isinstance(spawned, SpawnedFrame) and spawned.worker_id == worker_id
        master_end.settimeout(10)
        assert read_frames(master_end, 1) == [ReadyFrame(spawned.pid)]
        return spawned.pid, master_end

    def next_exit(self) -> ExitedFrame:
        frame = decode(self.ctrl.recv(65536))
        assert isinstance(frame, ExitedFrame)
        return frame

    def close(self) -> None:
        self.ctrl.close()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


_decoders: dict[int, FrameDecoder] = {}


def read_frames(sock: socket.socket, count: int) -> list:
    decoder = _decoders.setdefault(sock.fileno(), FrameDecoder())
    frames: list = []
    while len(frames) < count:
        data = sock.recv(65536)
        assert data, "worker closed its socket"
        frames += decoder.feed(data)
    return frames


@pytest.fixture
def server():
    _decoders.clear()
    harness = ForkServerHarness("tests.apps.recorder:handle")
    assert isinstance(harness.first, ServerReadyFrame)
    yield harness
    harness.close()


def message(i: int, body: dict) -> MessageFrame:
    meta = {
        "queue": "q",
        "exchange": "",
        "routing_key": "q",
        "redelivered": False,
        "attempt": 1,
        "properties": {"application_headers": {"k": "v"}},
    }
    return MessageFrame(i, meta, json.dumps(body).encode())


def test_worker_runs_the_handler_and_reports_results(server, tmp_path):
    pid, conn = server.spawn()
    conn.sendall(encode(message(1, {"id": 1})) + encode(message(2, {"id": 2, "fail": True})))
    before = time.monotonic()
    ok, failed = read_frames(conn, 2)
    assert isinstance(ok, OkFrame) and ok.id == 1
    assert ok.started_at <= ok.finished_at <= time.monotonic(), "the worker's times are on our clock"
    assert failed.started_at >= ok.finished_at and failed.finished_at >= failed.started_at
    assert before - 5 < ok.started_at
    assert failed.id == 2 and failed.outcome == Outcome.ERROR
    assert failed.error_type == "ValueError" and failed.error_message == "boom 2"
    assert "Traceback" in failed.traceback and "boom 2" in failed.traceback
    conn.sendall(encode(message(3, {"id": 3, "reject": True})))
    assert read_frames(conn, 1)[0].outcome == Outcome.REJECT


def test_worker_holds_only_its_socket_and_stdio(server):
    pid, conn = server.spawn(1)
    pid2, conn2 = server.spawn(2)
    fds = sorted(int(fd) for fd in os.listdir(f"/proc/{pid}/fd"))
    assert len(fds) == 4 and fds[:3] == [0, 1, 2], fds
    target = os.readlink(f"/proc/{pid}/fd/{fds[3]}")
    assert target.startswith("socket:")
    fds2 = sorted(int(fd) for fd in os.listdir(f"/proc/{pid2}/fd"))
    assert len(fds2) == 4, fds2


def test_worker_exits_on_eof_and_the_exit_is_reported(server):
    pid, conn = server.spawn()
    conn.close()
    exited = server.next_exit()
    assert exited.pid == pid and os.WIFEXITED(exited.status) and os.WEXITSTATUS(exited.status) == 0


def test_term_asks_to_leave_then_stop_frame_ends_it(server):
    pid, conn = server.spawn()
    os.kill(pid, signal.SIGTERM)
    assert read_frames(conn, 1) == [ExitRequestFrame("TERM received")]
    conn.sendall(encode(StopFrame()))
    exited = server.next_exit()
    assert exited.pid == pid and os.WEXITSTATUS(exited.status) == 0


def test_int_and_hup_are_ignored_by_workers(server):
    pid, conn = server.spawn()
    os.kill(pid, signal.SIGINT)
    os.kill(pid, signal.SIGHUP)
    conn.sendall(encode(message(1, {"id": 1})))
    (result,) = read_frames(conn, 1)
    assert isinstance(result, OkFrame) and result.id == 1


def test_corrupt_frame_ends_the_worker_not_the_server(server):
    pid, conn = server.spawn(1)
    conn.sendall(b"garbage that is not a frame")
    exited = server.next_exit()
    assert exited.pid == pid and os.WEXITSTATUS(exited.status) == WorkerExit.PROTOCOL_ERROR
    pid2, conn2 = server.spawn(2)  # the server still forks
    assert pid2 != pid


def test_worker_killed_mid_message_is_reported(server):
    pid, conn = server.spawn()
    conn.sendall(encode(message(1, {"id": 1, "exit": True})))
    exited = server.next_exit()
    assert exited.pid == pid and os.WEXITSTATUS(exited.status) == 9


def test_workers_die_with_the_fork_server(server):
    pid, conn = server.spawn()
    server.proc.kill()
    wait_until(lambda: not alive(pid), 2.0, message="worker to die with the fork server")


def test_fork_server_dies_with_its_parent(tmp_path):
    """Start the fork server from a throwaway parent; SIGKILL the parent; all are gone in 2 s."""
    script = tmp_path / "parent.py"
    script.write_text(
        "import os, socket, subprocess, sys, time\n"
        "from speed_gevent.protocol import encode, decode, SpawnFrame\n"
        "ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)\n"
        "p = subprocess.Popen([sys.executable, '-m', 'speed_gevent.forkserver', '--fd', str(theirs.fileno()),"
        " '--target', 'tests.apps.recorder:handle', '--master-pid', str(os.getpid())],"
        " pass_fds=(theirs.fileno(),))\n"
        "decode(ours.recv(65536))\n"
        "a, b = socket.socketpair()\n"
        "socket.send_fds(ours, [encode(SpawnFrame(1))], [b.fileno()])\n"
        "print(p.pid, decode(ours.recv(65536)).pid, flush=True)\n"
        "time.sleep(60)\n"
    )
    parent = subprocess.Popen(
        [sys.executable, str(script)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    server_pid, worker_pid = map(int, parent.stdout.readline().split())
    parent.kill()
    parent.wait()
    started = time.monotonic()
    wait_until(
        lambda: not alive(server_pid) and not alive(worker_pid),
        2.0,
        message="fork server and worker to die with their parent",
    )
    assert time.monotonic() - started < 2.0


def test_master_closing_with_reports_unread_ends_the_server_quietly():
    """A master that stops with an exit report still unread resets the socket (seen in CI
    as a traceback from the fork server); that is an ordinary goodbye."""
    harness = ForkServerHarness("tests.apps.recorder:handle", stderr=subprocess.PIPE)
    try:
        pid, conn = harness.spawn()
        conn.close()  # the worker leaves; its exit report is sent and never read
        wait_until(lambda: not alive(pid), 5, message="the worker to be reaped")
        time.sleep(0.1)  # measurement pacing: let the server write the report it owes
        harness.ctrl.close()
        assert harness.proc.wait(10) == WorkerExit.OK
        stderr = harness.proc.stderr.read().decode()
        assert "Traceback" not in stderr, stderr
    finally:
        harness.close()


def test_broken_target_is_reported_before_any_worker():
    harness = ForkServerHarness("tests.apps.broken:handle")
    try:
        assert isinstance(harness.first, BootErrorFrame)
        assert "cannot import module 'tests.apps.broken': RuntimeError" in harness.first.message
        assert harness.proc.wait(10) == WorkerExit.BOOT_FAILED
    finally:
        harness.close()


def test_failing_start_event_means_boot_failure():
    harness = ForkServerHarness("tests.apps.lifecycle:app", env={"SG_FAIL_START": "1"})
    try:
        master_end, worker_end = socket.socketpair()
        socket.send_fds(harness.ctrl, [encode(SpawnFrame(1))], [worker_end.fileno()])
        worker_end.close()
        spawned = decode(harness.ctrl.recv(65536))
        exited = harness.next_exit()
        assert exited.pid == spawned.pid and os.WEXITSTATUS(exited.status) == WorkerExit.BOOT_FAILED
    finally:
        harness.close()


def test_a_window_runs_in_order_and_term_hands_back_what_was_not_started(server, tmp_path):
    """Several messages in one write run in order, one result each; a TERM during the
    first means: finish it, ask to exit, start nothing more."""
    pid, conn = server.spawn()
    conn.sendall(b"".join(encode(message(i, {"id": i, "sleep": 0.3 if i == 1 else 0})) for i in (1, 2, 3)))
    wait_until(
        lambda: "busy" in Path(f"/proc/{pid}/cmdline").read_text(), 5, message="the first handler running"
    )
    os.kill(pid, signal.SIGTERM)
    first, request = read_frames(conn, 2)
    assert isinstance(first, OkFrame) and first.id == 1
    assert request == ExitRequestFrame("TERM received")
    conn.sendall(encode(StopFrame()))
    exited = server.next_exit()
    assert exited.pid == pid and os.WEXITSTATUS(exited.status) == 0


def test_an_idle_worker_sleeps_in_the_kernel_not_in_a_poll_loop(server):
    """No per-call timeout: an idle worker makes no system calls at all."""
    import psutil

    pid, conn = server.spawn()
    conn.sendall(encode(message(1, {"id": 1})))
    read_frames(conn, 1)
    process = psutil.Process(pid)
    before = process.num_ctx_switches().voluntary
    time.sleep(1.5)
    assert process.num_ctx_switches().voluntary - before <= 1


def test_a_user_signal_handler_that_stops_an_idle_worker_wakes_it_at_once():
    """worker.stop() from a handler's own signal handler: the idle wait is left at once
    (the wake-up is not an Exception a handler's `except Exception` would swallow), and
    only after every callback for that signal ran."""
    harness = ForkServerHarness("tests.apps.stopper:app")
    try:
        pid, conn = harness.spawn()
        conn.sendall(encode(message(1, {"id": 1})))
        read_frames(conn, 1)  # it handled one and is idle now
        os.kill(pid, signal.SIGUSR1)
        conn.settimeout(2)  # well under the idle wait's recheck
        assert read_frames(conn, 1) == [ExitRequestFrame("USR1 asked twice")]
    finally:
        harness.close()


def test_a_fork_server_whose_master_is_already_gone_exits_at_once():
    """Its parent is not the master it was started for (the master died and it was
    re-parented before it could ask for the parent-death signal): it leaves."""
    gone = subprocess.Popen(["true"])
    gone.wait()  # a pid that is nobody's parent now
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    proc = subprocess.Popen(
        [sys.executable, "-m", "speed_gevent.forkserver", "--fd", str(theirs.fileno()),
         "--target", "tests.apps.recorder:handle", "--master-pid", str(gone.pid)],
        pass_fds=(theirs.fileno(),), cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
    )  # fmt: skip
    theirs.close()
    assert proc.wait(10) == WorkerExit.PARENT_GONE
    ours.close()
