"""Queues that another application declared, with arguments of its own: consumed as they
are, with and without --passive; our dead-letter queue is declared when missing, and a
declare that really conflicts names the argument that differs."""

from __future__ import annotations

import json

import pytest
from amqp import Message
from kombu import Connection

from speed_gevent.errors import ConfigError
from speed_gevent.topology import declare_queue, ensure_queues
from tests.conftest import BROKER
from tests.helpers import broker_user, handled_ids, ids_in, queue_info
from tests.process.test_cli_errors import run

pytestmark = pytest.mark.timeout(90)

THEIR_ARGUMENTS = {
    "priority": {"x-max-priority": 10},
    "ttl": {"x-message-ttl": 600_000},
    "max-length": {"x-max-length": 1_000, "x-overflow": "reject-publish"},
    "quorum": {"x-queue-type": "quorum"},
    "own-dead-letter-exchange": {"x-dead-letter-exchange": "", "x-dead-letter-routing-key": "elsewhere"},
}
REJECTED = {3, 7, 11}


def declare_theirs(queue: str, arguments: dict) -> None:
    """What another application does: its own declare, its own arguments, no `.dead`."""
    with Connection(BROKER) as conn:
        conn.connection.channel().queue_declare(queue, durable=True, auto_delete=False, arguments=arguments)


def publish_theirs(queue: str, ids: list[int]) -> None:
    """Published straight to the queue, priorities included (no declare of ours)."""
    with Connection(BROKER) as conn:
        channel = conn.connection.channel()
        channel.confirm_select()
        for i in ids:
            body = json.dumps({"id": i, "reject": i in REJECTED}).encode()
            channel.basic_publish(
                Message(body, delivery_mode=2, priority=i % 10), exchange="", routing_key=queue
            )


@pytest.mark.parametrize("passive", [False, True], ids=["declaring", "passive"])
@pytest.mark.parametrize("kind", list(THEIR_ARGUMENTS))
def test_a_queue_declared_elsewhere_is_consumed_as_it_is(run_recorder, queue_names, tmp_path, kind, passive):
    queue = queue_names(kind)
    declare_theirs(queue, THEIR_ARGUMENTS[kind])
    ids = list(range(1, 31))
    publish_theirs(queue, ids)
    record = tmp_path / "rec"
    options = ["--max-workers", "2", "--exit-when-idle", "2s", *(["--passive"] if passive else [])]
    runner = run_recorder(queue, *options, record=record)
    assert runner.wait(60) == 0, runner.output()[-3000:]
    handled = handled_ids(record)
    assert set(handled) == set(ids) - REJECTED and max(handled.values()) == 1, runner.output()[-2000:]
    assert sorted(ids_in(queue + ".dead")) == sorted(REJECTED)  # ours, declared because it was missing
    assert ids_in(queue) == []
    assert f"declared queue {queue!r}" not in runner.output()
    assert f"declared queue {queue + '.dead'!r}" in runner.output()


def test_a_quorum_queue_stays_quorum_and_our_dead_letter_queue_takes_the_queue_type(queue_names):
    queue = queue_names()
    declare_theirs(queue, {"x-queue-type": "quorum"})
    with Connection(BROKER) as conn:
        ensure_queues(conn.connection, (queue,), "classic", passive=True)
    types = queue_info("type")
    assert (types[queue], types[queue + ".dead"]) == ("quorum", "classic")


def test_a_declare_that_really_conflicts_names_the_argument(queue_names):
    queue = queue_names()
    declare_theirs(queue, {"x-max-priority": 10})
    with Connection(BROKER) as conn, pytest.raises(ConfigError) as raised:
        declare_queue(conn.connection, queue, "classic")
    assert "x-max-priority: the queue has the value '10'" in str(raised.value), raised.value


def test_no_configure_permission_for_our_dead_letter_queue_is_one_clear_line(queue_names):
    """A user who may read and write but not declare, and a `.dead` queue nobody made:
    exit 2 naming the queue and the permission, not a traceback or endless retries."""
    queue = queue_names()
    declare_theirs(queue, {})
    with broker_user(configure="^$") as (user, password):
        result = run("run", "tests.apps.recorder:handle", "-q", queue, "--passive",
                     env={"SPEED_GEVENT_BROKER": f"amqp://{user}:{password}@localhost:5672//"})  # fmt: skip
    assert result.returncode == 2, result.stderr
    assert (
        f"cannot declare queue {queue + '.dead'!r}" in result.stderr
        and "configure permission" in result.stderr
    )
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("passive", [False, True], ids=["declaring", "passive"])
def test_a_queue_exclusive_to_another_connection_is_one_clear_line(queue_names, passive):
    """Even a passive look at it is refused (RESOURCE_LOCKED, on the channel): exit 2,
    not a start-up that retries it as an outage."""
    queue = queue_names()
    with Connection(BROKER) as owner:
        owner.connection.channel().queue_declare(queue, exclusive=True)
        result = run("run", "tests.apps.recorder:handle", "-q", queue, *(["--passive"] if passive else []),
                     "--connect-timeout", "20s", env={"SPEED_GEVENT_BROKER": BROKER})  # fmt: skip
    assert result.returncode == 2, result.stderr
    assert (
        f"cannot use queue {queue!r}" in result.stderr and "exclusive to another connection" in result.stderr
    )
    assert "Traceback" not in result.stderr and "cannot reach the broker" not in result.stderr
