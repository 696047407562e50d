"""The Python API: App events in workers, master events and signals, the seed example."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.conftest import BROKER, ROOT
from tests.helpers import publish_ids, read_records

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
