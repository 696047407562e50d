"""`speed-gevent replay`: dead letters made by a real run go back to their origin queue,
counted by id, with our headers gone and the sender's properties kept."""

from __future__ import annotations

import json

import pytest

from speed_gevent.publish import publish_messages
from tests.conftest import BROKER
from tests.helpers import delete_queues, get_all, handled_ids, ids_in, publish_ids, queue_exists, ready_count
from tests.process.test_cli_errors import run

pytestmark = pytest.mark.timeout(120)


def replay_cli(*args: str):
    return run("replay", *args, env={"SPEED_GEVENT_BROKER": BROKER})


def test_dead_letters_go_back_to_their_queue_clean_and_counted(run_recorder, queue_names, tmp_path, tally):
    queue, record = queue_names(), tmp_path / "rec"
    ids = list(range(1, 11))
    rejected = {i for i in ids if i % 2 == 0}
    publish_ids(queue, ids, extra={i: {"reject": True} for i in rejected})
    runner = run_recorder(queue, "--max-workers", "2", "--exit-when-idle", "1s", record=record)
    assert runner.wait(60) == 0, runner.output()[-3000:]
    assert ready_count(queue + ".dead") == len(rejected)

    first = replay_cli(queue + ".dead", "--count", "2")
    assert first.returncode == 0, first.stderr
    assert first.stdout.strip() == f"replayed 2 messages from '{queue}.dead' (2 to '{queue}'); 3 left there"
    assert "\r" not in first.stderr + first.stdout, "progress only on a terminal"
    rest = replay_cli(queue + ".dead")
    assert rest.returncode == 0, rest.stderr
    assert rest.stdout.startswith(f"replayed 3 messages from '{queue}.dead'")

    back = get_all(queue)
    assert ready_count(queue + ".dead") == 0
    replayed = [json.loads(m.body)["id"] for m in back]
    assert sorted(replayed) == sorted(rejected)
    for message in back:
        assert not any(name.startswith("x-speed-") for name in message.headers or {}), message.headers
        assert message.properties["delivery_mode"] == 2
    tally(ids, handled_ids(record), dead=[], queued=replayed)


def test_a_letter_without_an_origin_needs_to_and_stays_until_then(queue_names):
    """Not dead-lettered by us (no x-speed-origin-queue): exit 2 and it stays; with --to it
    goes there, with its own headers kept."""
    queue, target = queue_names(), queue_names()
    publish_ids(target, [])
    sent = {"application_headers": {"trace": "t-1"}, "message_id": "m-1", "delivery_mode": 1}
    publish_messages(BROKER, queue + ".dead", [b'{"id": 1}'], declare_dead=False, properties=sent)
    refused = replay_cli(queue + ".dead")
    assert refused.returncode == 2, refused.stderr
    assert "has no x-speed-origin-queue header" in refused.stderr and "--to QUEUE" in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1 and "Traceback" not in refused.stderr
    assert ready_count(queue + ".dead") == 1

    missing = replay_cli(queue + ".dead", "--to", queue_names())
    assert missing.returncode == 2 and "does not exist" in missing.stderr
    assert ready_count(queue + ".dead") == 1

    moved = replay_cli(queue + ".dead", "--to", target)
    assert moved.returncode == 0, moved.stderr
    (message,) = get_all(target)
    assert message.headers == {"trace": "t-1"} and message.properties["message_id"] == "m-1"
    assert message.properties["delivery_mode"] == 1
    assert ids_in(queue + ".dead") == []


def test_a_missing_dead_letter_queue_is_exit_2(queue_names):
    result = replay_cli(queue_names() + ".dead")
    assert result.returncode == 2 and "does not exist" in result.stderr


def test_one_shared_dead_letter_queue_for_two_queues_replays_each_to_its_own(
    run_recorder, queue_names, tmp_path, tally
):
    """--dead-letter-queue: letters from both source queues land in one queue (declared
    at start), no `<queue>.dead` is made, and replay sends each back where it failed."""
    first, second, shared, record = queue_names(), queue_names(), queue_names(), tmp_path / "rec"
    publish_ids(first, [1, 2], extra={2: {"reject": True}})
    publish_ids(second, [3, 4], extra={3: {"reject": True}})
    delete_queues([first + ".dead", second + ".dead"])  # made by publish_ids; must not come back
    runner = run_recorder([first, second], "--dead-letter-queue", shared, "--exit-when-idle", "1s",
                          record=record)  # fmt: skip
    assert runner.wait(60) == 0, runner.output()[-3000:]
    assert handled_ids(record) == {1: 1, 4: 1}
    assert ready_count(shared) == 2
    assert not queue_exists(first + ".dead") and not queue_exists(second + ".dead")
    result = replay_cli(shared)
    assert result.returncode == 0, result.stderr
    where = ", ".join(f"1 to {queue!r}" for queue in sorted([first, second]))
    assert result.stdout.strip() == f"replayed 2 messages from {shared!r} ({where}); 0 left there"
    back = {queue: ids_in(queue) for queue in (first, second)}
    assert back == {first: [2], second: [3]}
    tally([1, 2, 3, 4], handled_ids(record), dead=[], queued=back[first] + back[second])
