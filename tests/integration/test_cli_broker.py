"""CLI cases that need the broker: passive declare, refused credentials/vhost, publish."""

from __future__ import annotations

import pytest

from tests.conftest import BROKER
from tests.helpers import ready_count
from tests.process.test_cli_errors import run

pytestmark = pytest.mark.timeout(60)


def test_passive_missing_queue_is_exit_2(queue_names):
    queue = queue_names()
    result = run(
        "run", "tests.apps.recorder:handle", "-q", queue, "--passive", env={"SPEED_GEVENT_BROKER": BROKER}
    )
    assert result.returncode == 2, result.stderr
    assert f"--queue: queue {queue!r} does not exist (--passive)" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("url, secret", [
    (BROKER.replace("guest:guest", "guest:wrong-password"), "wrong-password"),
    (BROKER.rstrip("/") + "/no-such-vhost", "guest"),
])  # fmt: skip
def test_refused_credentials_or_vhost_is_exit_3(queue_names, url, secret):
    result = run("run", "tests.apps.recorder:handle", "-q", queue_names(), env={"SPEED_GEVENT_BROKER": url})
    assert result.returncode == 3, result.stderr
    lines = result.stderr.strip().splitlines()
    assert "refused" in lines[-1] and "Traceback" not in result.stderr
    assert f":{secret}@" not in result.stderr


def test_connect_timeout_gives_up_with_exit_3(queue_names):
    result = run(
        "run",
        "tests.apps.recorder:handle",
        "-q",
        queue_names(),
        "--connect-timeout",
        "1s",
        env={"SPEED_GEVENT_BROKER": "amqp://guest:guest@127.0.0.1:1//"},
    )
    assert result.returncode == 3, result.stderr
    assert "cannot reach the broker" in result.stderr and "guest:guest" not in result.stderr


def test_publish_declares_and_confirms(queue_names):
    queue = queue_names()
    result = run("publish", queue, "--count", "25", env={"SPEED_GEVENT_BROKER": BROKER})
    assert result.returncode == 0, result.stderr
    assert "published 25 messages" in result.stdout
    assert ready_count(queue) == 25
    assert ready_count(queue + ".dead") == 0
