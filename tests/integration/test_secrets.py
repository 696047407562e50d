"""A canary password in the broker URL, on a RabbitMQ user of its own, must never show:
not in the log at debug level (a reconnect included), not in a process title, not in
the environment of the fork server or a worker, not in `publish` output."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import ROOT, wait_until
from tests.helpers import (
    broker_connection_of,
    broker_user,
    close_broker_connection,
    consumer_count,
    handled_ids,
    publish_ids,
    read_records,
    session_processes,
)

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def canary() -> Iterator[tuple[str, str]]:
    """(broker URL, password) of a user made for this test alone."""
    with broker_user() as (user, password):
        yield f"amqp://{user}:{password}@localhost:5672//", password


def test_the_broker_password_shows_nowhere(run_recorder, queue_names, tmp_path, canary):
    url, password = canary
    queue = queue_names()
    publish_ids(queue, [1, 2, 3])
    record = tmp_path / "rec"
    runner = run_recorder(queue, "--min-workers", "2", "--log-level", "debug", "--exit-when-idle", "3s",
                          "-b", url, handler="environment", record=record,
                          env={"SPEED_GEVENT_BROKER": url})  # fmt: skip
    wait_until(lambda: set(handled_ids(record)) == {1, 2, 3}, 30, message="the first messages")
    for entry in read_records(record):  # what a handler can read of its environment
        assert not any(password in value for value in entry["environ"])
    children = session_processes(runner.pid)
    assert len(children) >= 3, "the fork server and two workers"
    seen = {pid: Path(f"/proc/{pid}/environ").read_bytes() + Path(f"/proc/{pid}/cmdline").read_bytes()
            for pid in children}  # fmt: skip
    assert all(password.encode() not in text for text in seen.values())
    assert password.encode() not in Path(f"/proc/{runner.pid}/cmdline").read_bytes()
    connection = wait_until(lambda: broker_connection_of(runner.pid), 20, message="our connection")
    close_broker_connection(connection[0])  # the reconnect path logs too
    wait_until(lambda: "recovered the connection" in runner.output(), 30, message="the recovery")
    wait_until(lambda: consumer_count(queue) == 1, 30, message="consuming again")
    publish_ids(queue, [4])
    assert runner.wait(60) == 0, runner.output()[-3000:]
    assert set(handled_ids(record)) == {1, 2, 3, 4}
    assert password not in runner.output()
    user = url.split("//")[1].split(":")[0]
    assert f"{user}:**@" in runner.output(), "the URL is logged, masked"

    published = subprocess.run(
        [sys.executable, "-m", "speed_gevent", "publish", queue, "--count", "1", "-b", url, "--passive"],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert published.returncode == 0, published.stderr
    assert password not in published.stdout + published.stderr
