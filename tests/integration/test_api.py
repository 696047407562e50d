"""The Python API: App events in workers, master events and signals, the seed example."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

from tests.conftest import BROKER, ROOT, wait_until
from tests.helpers import ids_in, publish_ids, read_records

pytestmark = pytest.mark.timeout(120)


def test_app_events_run_in_workers(run_cli, queue_names, tmp_path):
    queue = queue_names()
    publish_ids(queue, [1, 2, 3], extra={2: {"fail": True}})
    record = tmp_path / "rec"
    runner = run_cli(
        "run",
        "tests.apps.lifecycle:app",
        "-q",
        queue,
        "--min-workers",
        "1",
        "--max-workers",
        "1",
        "--max-retries",
        "0",
        "--exit-when-idle",
        "1s",
        env={"SG_RECORD": str(record)},
    )
    assert runner.wait(60) == 0, runner.output()[-2000:]
    events = [(r["event"], r.get("id")) for r in read_records(record)]
    assert events[0] == ("start", None)
    assert ("message", 1) in events and ("handled", 1) in events and ("handled", 3) in events
    assert ("message", 2) in events and ("handled", 2) not in events
    assert ("error", None) in events and events[-1] == ("end", None)
    assert "a message callback that raises is logged" in runner.output()


def test_seed_example_runs(queue_names):
    queues = [queue_names("hello"), queue_names("world")]
    for queue in queues:
        publish_ids(queue, list(range(1, 6)))
    env = {k: v for k, v in os.environ.items() if not k.startswith("SPEED_GEVENT_")}
    env.update(
        {
            "SPEED_GEVENT_BROKER": BROKER,
            "SPEED_GEVENT_QUEUE": ",".join(queues),
            "SPEED_GEVENT_EXIT_WHEN_IDLE": "2s",
            "SPEED_GEVENT_PATROL_INTERVAL": "0.3s",
            "SPEED_GEVENT_MAX_IDLE": "0.5s",
            "PYTHONPATH": str(ROOT),
        }
    )
    result = subprocess.run(
        [sys.executable, "examples/seed_example.py"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=90,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "started" in result.stdout and "patrolling" in result.stdout
    assert "exit!!!" in result.stdout, result.stdout
    assert "handled 10 (failed 0)" in result.stderr


def test_a_slow_floor_neither_starts_the_idle_clock_nor_starves_heartbeats(run_cli, queue_names, tmp_path):
    """The floor takes longer to boot than --exit-when-idle and than the broker waits for
    a heartbeat: consuming starts once it is up, everything is handled, then the idle
    stop ends the run with 0 (it used to hang, or lose the connection)."""
    queue = queue_names()
    publish_ids(queue, [1, 2, 3])
    record = tmp_path / "rec"
    runner = run_cli(
        "run", "tests.apps.lifecycle:app", "-q", queue, "--min-workers", "1", "--max-workers", "1",
        "--exit-when-idle", "1s", "--heartbeat", "2s",
        env={"SG_RECORD": str(record), "SG_SLOW_START": "7"},
    )  # fmt: skip
    assert runner.wait(60) == 0, runner.output()[-2000:]
    handled = sorted(r["id"] for r in read_records(record) if r["event"] == "handled")
    assert handled == [1, 2, 3], runner.output()[-2000:]
    assert ids_in(queue) == []


def test_term_while_the_floor_boots_stops_cleanly(run_cli, queue_names, tmp_path):
    queue = queue_names()
    publish_ids(queue, [1])
    record = tmp_path / "rec"
    runner = run_cli(
        "run", "tests.apps.lifecycle:app", "-q", queue, "--min-workers", "1",
        env={"SG_RECORD": str(record), "SG_SLOW_START": "3"},
    )  # fmt: skip
    wait_until(lambda: record.exists() and read_records(record), 20, message="a worker booting")
    runner.proc.send_signal(signal.SIGTERM)
    assert runner.wait(30) == 0, runner.output()[-2000:]
    assert ids_in(queue) == [1], "nothing was consumed: the message is still in the queue"


def test_master_signals_outside_the_built_in_set_run_their_callbacks(queue_names, tmp_path):
    """USR2 and WINCH would otherwise keep their default action (USR2 kills the master)."""
    queue = queue_names()
    publish_ids(queue, [1])
    record = tmp_path / "rec"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "SG_SIGNALS": str(record), "SPEED_GEVENT_BROKER": BROKER}
    process = subprocess.Popen([sys.executable, "-m", "tests.apps.master_signals", queue], cwd=ROOT, env=env,
                               stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        assert process.stderr is not None
        for line in process.stderr:
            if "consuming" in line:
                break
        names = []
        for signum in (signal.SIGUSR2, signal.SIGWINCH, signal.SIGUSR1):
            process.send_signal(signum)
            names.append(signum.name)
            wait_until(
                lambda: record.read_text().splitlines()[1:] == names, 10, message=f"{signum.name} handled"
            )
        assert process.poll() is None, "the master is still running"
        assert record.read_text().splitlines()[0] == "refused: add_signal: SIGKILL cannot be caught"
        process.send_signal(signal.SIGTERM)
        _, errors = process.communicate(timeout=30)
        assert process.returncode == 0, errors[-2000:]
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    assert ids_in(queue) == []
