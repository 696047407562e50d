"""Bad input through the real CLI: one clear line on stderr, exit 2, no traceback, and
nothing started (checked before the fork server or the broker is touched)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

from tests.conftest import ROOT, wait_until

pytestmark = pytest.mark.timeout(60)

# No broker listens here: if a bad-input case reached the network it would hang or exit 3.
NOWHERE = "amqp://guest:guest@127.0.0.1:1//"


def run(*args: str, env: dict[str, str] | None = None, cwd=ROOT) -> subprocess.CompletedProcess:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("SPEED_GEVENT_")}
    full_env.update({"PYTHONPATH": str(ROOT), "SPEED_GEVENT_BROKER": NOWHERE, **(env or {})})
    return subprocess.run(
        [sys.executable, "-m", "speed_gevent", *args],
        capture_output=True,
        text=True,
        env=full_env,
        cwd=cwd,
        timeout=30,
    )


H = "tests.apps.recorder:handle"
CASES = [
    (["run", "tests.apps.nothere:handle", "-q", "a"], "cannot import module 'tests.apps.nothere'"),
    (["run", "tests.apps.broken:handle", "-q", "a"], "RuntimeError: this module is broken on purpose"),
    (["run", "tests.apps.recorder:_RECORD", "-q", "a"], "not callable"),
    (["run", "tests.apps.recorder", "-q", "a"], "expected module:callable"),
    (["run", H, "-q", "a", "-b", "amqp://u:pw@host:99999//"], "--broker: malformed URL"),
    (["run", H, "-q", "a", "-b", "localhost:5672"], "--broker: malformed URL"),
    (["run", H], "--queue: at least one queue is required"),
    (["run", H, "-q", ""], "--queue: queue name must not be empty"),
    (["run", H, "-q", "amq.x"], "starts with 'amq.'"),
    (["run", H, "-q", "a", "--max-workers", "x"], "--max-workers: expected a whole number"),
    (["run", H, "-q", "a", "--graceful-timeout", "soon"], "--graceful-timeout: expected a duration"),
    (["run", H, "-q", "a", "-q", "b", "--max-cache", "1"], "--max-cache: must be at least the number"),
    (["run", H, "-q", "a", "--config", "/nonexistent.toml"], "--config: cannot read"),
    (["run", H, "-q", "a", "--no-such-option"], "unrecognized arguments: --no-such-option"),
    (["run", H, "-q", "a", "--dead-letter-queue", "a"], "--dead-letter-queue: must not be one of the queues"),
    (["run", H, "-q", "a", "--dead-letter-queue", "amq.d"], "--dead-letter-queue: queue name 'amq.d' starts"),
    (["run", H, "-q", "a", "--queue-type", "fast"], "--queue-type: expected one of classic, quorum"),
    (["run", H, "-q", "a", "--min-workers", "3", "--max-workers", "2"], "--max-workers: must be at least"),
    (["run", H, "-q", "a", "--max-workers", "0"], "--max-workers: expected a whole number ≥ 1, got '0'"),
    (["run", H, "-q", "a", "--max-retries", "-1"], "--max-retries: expected a whole number ≥ 0"),
    (["run", H, "-q", "a", "--max-worker-memory", "lots"], "--max-worker-memory: expected a size"),
    (["run", H, "-q", "a", "--timeout", "2h"], "--timeout: must be below --consumer-timeout"),
    (["run", H, "-q", "a", "-b", "http://h/"], "--broker: malformed URL 'http://h/': scheme must be one of"),
    (["run", H, "-q", "x" * 250], "--queue: queue name 'xxxxxxxxxx"),
    (["run", H, "-q", "a", "--http", "localhost"], "--http: expected HOST:PORT such as 127.0.0.1:9100"),
    (["run", H, "-q", "a", "--http", "127.0.0.1:70000"], "--http: port 70000 is not between 1 and 65535"),
    (["publish", "amq.nope"], "starts with 'amq.'"),
    (["publish", "a", "--count", "0"], "--count: expected a whole number ≥ 1"),
    (["replay", ""], "queue name must not be empty"),
    (["replay", "a.dead", "--to", "amq.x"], "starts with 'amq.'"),
    (["replay", "a.dead", "--count", "-1"], "--count: expected a whole number ≥ 1"),
    (["replay", "a.dead", "--count", "many"], "--count: invalid int value"),
    (["replay", "a.dead", "-b", "localhost:5672"], "--broker: malformed URL"),
]  # fmt: skip


@pytest.mark.parametrize("args, message", CASES, ids=[" ".join(c[0][1:])[:50] for c in CASES])
def test_bad_input_is_one_clear_line_and_exit_2(args, message):
    result = run(*args)
    assert result.returncode == 2, result.stderr
    assert message in result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "pw@" not in result.stderr


@pytest.mark.parametrize("text, message", [
    ("max-workers = \n", "is not valid TOML"),
    ("max-wrkers = 3\n", "--config: unknown key 'max-wrkers'"),
    ('max-workers = "many"\n', "--max-workers: expected a whole number ≥ 1, got 'many' (from config file"),
])  # fmt: skip
def test_a_bad_config_file_is_one_line_and_exit_2(text, message, tmp_path):
    path = tmp_path / "speed.toml"
    path.write_text(text)
    result = run("run", H, "-q", "a", "--config", str(path))
    assert result.returncode == 2, result.stderr
    assert message in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_a_long_bad_value_is_not_quoted_whole():
    result = run("run", H, "-q", "y" * 250)
    assert result.returncode == 2 and len(result.stderr) < 300, result.stderr


def test_env_value_errors_name_the_variable():
    result = run(
        "run", "tests.apps.recorder:handle", env={"SPEED_GEVENT_QUEUE": "a", "SPEED_GEVENT_MAX_WORKERS": "-3"}
    )
    assert result.returncode == 2
    assert "(from SPEED_GEVENT_MAX_WORKERS)" in result.stderr


def test_an_unreachable_broker_is_one_line_and_exit_3_for_publish_and_replay():
    for command in (["publish", "a"], ["replay", "a.dead"]):
        result = run(*command)
        assert result.returncode == 3, result.stderr
        assert result.stderr.strip() == "speed-gevent: error: cannot reach the broker: Connection refused"


def test_an_http_port_in_use_is_one_line_and_exit_2():
    """Checked before the broker (none listens at NOWHERE) or the fork server is touched."""
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run("run", H, "-q", "a", "--http", f"127.0.0.1:{port}")
    assert result.returncode == 2, result.stderr
    expected = f"--http: cannot listen on 127.0.0.1:{port}: Address already in use"
    assert result.stderr.strip().endswith(expected)
    assert "Traceback" not in result.stderr


def test_version_and_help():
    assert run("--version").stdout.startswith("speed-gevent ")
    text = run("run", "--help").stdout
    for flag in ("--max-workers", "--max-cache", "--exit-when-idle", "SPEED_GEVENT_BROKER"):
        assert flag in text


@pytest.mark.parametrize("when", ["before-the-master", "fork-server-handshake"])
def test_a_stop_during_start_is_a_clean_exit_0(when, tmp_path):
    """TERM while the CLI still reads its config file (a FIFO it blocks on: before any
    handler of the master's), or while the fork server imports a slow target: exit 0,
    no traceback, nothing consumed (no broker listens at NOWHERE: it is never needed)."""
    fifo = tmp_path / "config.toml"
    os.mkfifo(fifo)
    env = {k: v for k, v in os.environ.items() if not k.startswith("SPEED_GEVENT_")}
    env.update({"PYTHONPATH": str(ROOT), "SPEED_GEVENT_BROKER": NOWHERE, "SG_SLOW_IMPORT": "3",
                "SPEED_GEVENT_CONFIG": str(fifo)})  # fmt: skip
    process = subprocess.Popen([sys.executable, "-m", "speed_gevent", "run", "tests.apps.slow_import:handle",
                                "-q", "a"], cwd=ROOT, env=env, stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        writer = wait_until(lambda: open_for_writing(fifo), 20, message="the CLI opening its config")
        if when == "before-the-master":
            process.send_signal(signal.SIGTERM)
        os.write(writer, b"")
        os.close(writer)  # the config is read (empty): start goes on
        if when == "fork-server-handshake":
            wait_until(lambda: any("forkserver" in t for t in child_titles(process.pid)), 20,
                       message="the fork server importing the target")  # fmt: skip
            process.send_signal(signal.SIGTERM)
        _, errors = process.communicate(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    assert process.returncode == 0, errors
    assert "Traceback" not in errors
    expected = "stopped before start" if when == "before-the-master" else "stopped during start"
    assert expected in errors, errors


def open_for_writing(fifo) -> int | None:
    """A write end of the FIFO once a reader has it open (None before)."""
    try:
        return os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
    except OSError:
        return None


def child_titles(pid: int) -> list[str]:
    import psutil

    try:
        return [" ".join(child.cmdline()) for child in psutil.Process(pid).children()]
    except psutil.Error:
        return []
