"""Shared fixtures: the broker URL, unique queue names, running the real CLI, polling."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from speed_gevent.backoff import delay_queue, ladder

ROOT = Path(__file__).resolve().parent.parent
BROKER = os.environ.get("SPEED_GEVENT_TEST_BROKER", "amqp://guest:guest@localhost:5672//")
#: Delay-queue steps (ms) a test run may make, deleted with each test's queues: the
#: default ladder and the short one the retry tests use (RETRY_OPTIONS).
RETRY_OPTIONS = ("--retry-delay", "500ms", "--retry-delay-max", "10s")
TEST_LADDER_STEPS = sorted({*ladder(1.0, 3600.0), *ladder(0.5, 10.0)})


def wait_until(
    predicate: Callable[[], Any], timeout: float, interval: float = 0.05, message: str = "condition"
) -> Any:
    """Poll `predicate` until it returns something truthy; fail the test at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {message}")
        time.sleep(interval)


def _broker_answers() -> bool:
    from kombu import Connection

    try:
        with Connection(BROKER, connect_timeout=3) as conn:
            conn.connect()
        return True
    except Exception:
        return False


_BROKER_OK: bool | None = None


def pytest_runtest_setup(item: pytest.Item) -> None:
    global _BROKER_OK
    if item.get_closest_marker("rabbitmq") is None:
        return
    if _BROKER_OK is None:
        _BROKER_OK = _broker_answers()
    if not _BROKER_OK:
        if os.environ.get("CI"):
            pytest.fail(f"RabbitMQ is required in CI but {BROKER.split('@')[-1]} does not answer")
        pytest.skip("no RabbitMQ reachable (run scripts/broker.sh)")


@pytest.fixture
def broker_url() -> str:
    return BROKER


@pytest.fixture
def queue_names(request: pytest.FixtureRequest) -> Iterator[Callable[[str], str]]:
    """Make unique queue names for this test; delete them (and their .dead) afterwards."""
    made: list[str] = []

    def make(label: str = "q") -> str:
        name = f"test-{request.node.name[:40]}-{label}-{uuid.uuid4().hex[:8]}"
        made.append(name)
        return name

    yield make
    if made and _BROKER_OK:
        from tests.helpers import delete_queues

        delete_queues(made + [name + ".dead" for name in made] + [
            delay_queue(name, step) for name in made for step in TEST_LADDER_STEPS])  # fmt: skip


class Runner:
    """A `speed-gevent` process started the way a user starts it."""

    def __init__(self, args: list[str], env: dict[str, str], tmp: Path) -> None:
        self.log_path = tmp / f"run-{uuid.uuid4().hex[:6]}.log"
        with open(self.log_path, "wb") as log:  # the child keeps its own copy of the fd
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "speed_gevent", *args],
                cwd=ROOT,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def wait(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            pytest.fail(f"speed-gevent did not exit within {timeout}s; log:\n{self.output()[-3000:]}")

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture
def run_cli(tmp_path: Path) -> Iterator[Callable[..., Runner]]:
    runners: list[Runner] = []

    def start(*args: str, env: dict[str, str] | None = None) -> Runner:
        full_env = {k: v for k, v in os.environ.items() if not k.startswith("SPEED_GEVENT_")}
        full_env.update({"SPEED_GEVENT_BROKER": BROKER, "PYTHONPATH": str(ROOT)})
        full_env.update(env or {})
        runner = Runner(list(args), full_env, tmp_path)
        runners.append(runner)
        return runner

    yield start
    for runner in runners:
        runner.close()


@pytest.fixture
def run_recorder(run_cli: Callable[..., Runner], tmp_path: Path) -> Callable[..., Runner]:
    """Run `speed-gevent run tests.apps.recorder:<handler>` on `queues`; the handler appends
    what it handled to `record` (a fresh file by default)."""

    def start(
        queues: str | list[str],
        *options: str,
        handler: str = "handle",
        record: Path | None = None,
        env: dict[str, str] | None = None,
    ) -> Runner:
        names = [queues] if isinstance(queues, str) else queues
        args = ["run", f"tests.apps.recorder:{handler}"]
        for name in names:
            args += ["-q", name]
        record = record or tmp_path / f"record-{uuid.uuid4().hex[:6]}"
        return run_cli(*args, *options, env={"SG_RECORD": str(record), **(env or {})})

    return start
