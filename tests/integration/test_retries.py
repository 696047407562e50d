"""Retries that wait: a failed attempt waits in a delay queue of the broker (its step in
the name, its TTL the step) and comes back to the source queue; steps double per attempt;
`Retry(delay=...)` takes the nearest step at or above; the wait is measured from the
handler's own records, and every id is counted."""

from __future__ import annotations

import json
import signal

import pytest
from kombu import Connection

from speed_gevent.backoff import delay_queue
from speed_gevent.publish import publish_messages
from tests.conftest import BROKER, RETRY_OPTIONS, wait_until
from tests.helpers import (
    delete_queues,
    get_all,
    handled_ids,
    ids_in,
    publish_ids,
    rabbitmqctl,
    read_records,
    ready_count,
)

pytestmark = pytest.mark.timeout(120)

#: A wait may come back this much early: the broker's TTL clock and ours differ by the
#: time the republish took to be confirmed.
EARLY = 0.05


def fail_times(record) -> dict[tuple[int, int], float]:
    return {(r["id"], r["attempt"]): r["at"] for r in read_records(record) if r.get("event") == "fail"}


def starts(record) -> dict[tuple[int, int], float]:
    """When each attempt began: a fail record's time, or a handled record's start."""
    out = fail_times(record)
    for r in read_records(record):
        if "event" not in r:
            out[(r["id"], r["attempt"])] = r["start"]
    return out


def delay_queue_arguments_of(name: str) -> str:
    rows = rabbitmqctl("list_queues", "-q", "name", "arguments").splitlines()
    return next((row for row in rows if row.split("\t")[0] == name), "")


@pytest.mark.parametrize("queue_type", ["classic", "quorum"])
def test_each_retry_waits_one_step_longer_than_the_last(
    run_recorder, queue_names, tmp_path, tally, queue_type
):
    queue, record = queue_names(), tmp_path / "rec"
    ids = list(range(1, 31))
    failing = {i for i in ids if i % 5 == 0}  # fail twice, then pass
    publish_ids(queue, ids, extra={i: {"fail_attempts": 2} for i in failing}, queue_type=queue_type)
    runner = run_recorder(queue, "--max-workers", "2", "--queue-type", queue_type, *RETRY_OPTIONS,
                          "--exit-when-idle", "3s", record=record)  # fmt: skip
    assert runner.wait(90) == 0, runner.output()[-3000:]
    handled, began, failed = handled_ids(record), starts(record), fail_times(record)
    dead = [json.loads(m.body)["id"] for m in get_all(queue + ".dead")]
    tally(ids, handled, dead=dead, queued=[])
    assert handled == {i: 1 for i in ids} and dead == []
    for i in failing:
        assert began[(i, 2)] - failed[(i, 1)] >= 0.5 - EARLY, f"id {i}: the first retry waited 500ms"
        assert began[(i, 3)] - failed[(i, 2)] >= 1.0 - EARLY, f"id {i}: the second retry waited 1s"
    for step_ms in (500, 1000):
        name = delay_queue(queue, step_ms)
        assert ready_count(name) == 0, f"{name} emptied back into {queue}"
    assert ready_count(queue) == 0
    assert "retried 12," in runner.output()  # six ids, two retries each
    arguments = delay_queue_arguments_of(delay_queue(queue, 500))
    assert "x-message-ttl" in arguments and queue in arguments, arguments
    if queue_type == "quorum":
        assert "at-least-once" in arguments and "reject-publish" in arguments, arguments


def test_a_delay_the_handler_asks_for_takes_the_next_step_up(run_recorder, queue_names, tmp_path, tally):
    """Retry(delay=1.5) with steps of 500ms, 1s, 2s...: it waits in the 2s queue. The idle
    stop (1.5s, shorter than the wait) waits for the retry it scheduled instead of leaving
    it behind."""
    queue, record = queue_names(), tmp_path / "rec"
    publish_ids(queue, [1, 2], extra={1: {"retry_delay": 1.5}})
    runner = run_recorder(queue, "--max-workers", "1", *RETRY_OPTIONS, "--exit-when-idle", "1.5s",
                          record=record)  # fmt: skip
    assert runner.wait(60) == 0, runner.output()[-3000:]
    handled, began = handled_ids(record), starts(record)
    tally([1, 2], handled, dead=[], queued=[])
    assert handled == {1: 1, 2: 1}
    assert began[(1, 2)] - began[(1, 1)] >= 2.0 - EARLY
    assert f"through {delay_queue(queue, 2000)!r}" in runner.output()


def test_retries_at_once_without_a_delay(run_recorder, queue_names, tmp_path):
    queue, record = queue_names(), tmp_path / "rec"
    publish_ids(queue, [1], extra={1: {"fail_attempts": 1}})
    runner = run_recorder(queue, "--max-workers", "1", "--retry-delay", "0", "--exit-when-idle", "3s",
                          record=record)  # fmt: skip
    assert runner.wait(60) == 0, runner.output()[-3000:]
    assert handled_ids(record) == {1: 1}
    assert "retrying at once" in runner.output()
    assert delay_queue_arguments_of(delay_queue(queue, 1000)) == "", "no delay queue was declared"


def test_passive_consumes_the_named_queue_and_declares_our_delay_queues(run_recorder, queue_names, tmp_path):
    """--passive is about the queues the user names; the delay queues are ours."""
    queue, record = queue_names(), tmp_path / "rec"
    publish_ids(queue, [1, 2], extra={1: {"fail_attempts": 1}})  # declares the source queue
    runner = run_recorder(queue, "--passive", "--max-workers", "1", *RETRY_OPTIONS, "--exit-when-idle", "3s",
                          record=record)  # fmt: skip
    assert runner.wait(60) == 0, runner.output()[-3000:]
    began = starts(record)
    assert handled_ids(record) == {1: 1, 2: 1}
    assert began[(1, 2)] - began[(1, 1)] >= 0.5 - EARLY
    assert delay_queue_arguments_of(delay_queue(queue, 10_000)) != "", "the whole ladder was declared"


def test_retries_exhausted_wait_then_dead_letter(run_recorder, queue_names, tmp_path, tally):
    queue, record = queue_names(), tmp_path / "rec"
    publish_ids(queue, [1, 2], extra={1: {"fail_attempts": 99}})
    runner = run_recorder(queue, "--max-workers", "1", "--max-retries", "2", *RETRY_OPTIONS,
                          "--exit-when-idle", "3s", record=record)  # fmt: skip
    assert runner.wait(60) == 0, runner.output()[-3000:]
    dead = get_all(queue + ".dead")
    tally([1, 2], handled_ids(record), dead=[json.loads(m.body)["id"] for m in dead], queued=[])
    assert len(dead) == 1 and dead[0].properties["application_headers"]["x-speed-attempt"] == 3
    failed = fail_times(record)
    assert failed[(1, 2)] - failed[(1, 1)] >= 0.5 - EARLY and failed[(1, 3)] - failed[(1, 2)] >= 1.0 - EARLY
    assert handled_ids(record) == {2: 1}
    assert "retried 2, dead-lettered 1" in runner.output()


def test_messages_given_back_on_a_quorum_queue_keep_their_attempt(run_recorder, queue_names, tmp_path, tally):
    """A graceful stop gives cached messages back; the quorum queue counts that in
    x-delivery-count, shown to the handler as `delivery_count`, never as an attempt."""
    queue, first, second = queue_names(), tmp_path / "a", tmp_path / "b"
    ids = list(range(1, 41))
    publish_ids(queue, ids, extra={i: {"sleep": 0.05} for i in ids}, queue_type="quorum")
    runner = run_recorder(queue, "--queue-type", "quorum", "--max-workers", "1", "--max-cache", "40",
                          record=first)  # fmt: skip
    wait_until(lambda: len(handled_ids(first)) >= 3, 30, message="the first run handling")
    runner.proc.send_signal(signal.SIGTERM)
    assert runner.wait(30) == 0, runner.output()[-3000:]
    again = run_recorder(queue, "--queue-type", "quorum", "--max-workers", "2", "--max-retries", "0",
                         "--exit-when-idle", "3s", record=second)  # fmt: skip
    assert again.wait(60) == 0, again.output()[-3000:]
    handled = handled_ids(first) + handled_ids(second)
    tally(ids, handled, dead=[json.loads(m.body)["id"] for m in get_all(queue + ".dead")], queued=[])
    assert set(handled) == set(ids)
    # One CI run (quorum, RabbitMQ 3.10.8, a loaded machine) handled the message running at
    # the stop in both runs: not reproduced in 14 runs since, cause not found yet (an open
    # question in the notes). This test is about attempts; it bounds that duplicate to one.
    assert sum(count - 1 for count in handled.values()) <= 1, handled
    records = [r for r in read_records(second) if "event" not in r]
    assert records and all(r["attempt"] == 1 for r in records), records[:3]
    assert any((r["delivery_count"] or 0) >= 1 for r in records), "the broker counted the give-backs"


def test_a_delay_queue_deleted_under_us_sends_its_retries_back_at_once(
    run_recorder, queue_names, tmp_path, tally
):
    """The broker returns a retry published to a deleted delay queue: it is retried at once
    through the source queue, once, not given back to fail again at full speed."""
    queue, record = queue_names(), tmp_path / "rec"
    publish_ids(queue, [1])
    runner = run_recorder(queue, "--max-workers", "1", *RETRY_OPTIONS, record=record)
    wait_until(lambda: handled_ids(record) == {1: 1}, 30, message="consuming, delay queues made")
    delete_queues([delay_queue(queue, 500)])
    publish_ids(queue, [2], extra={2: {"fail_attempts": 1}})
    wait_until(lambda: 2 in handled_ids(record), 30, message="the retry handled")
    runner.proc.send_signal(signal.SIGTERM)
    assert runner.wait(30) == 0, runner.output()[-3000:]
    failed = [r for r in read_records(record) if r.get("event") == "fail"]
    tally([1, 2], handled_ids(record), dead=[], queued=[])
    assert handled_ids(record) == {1: 1, 2: 1} and len(failed) == 1
    assert "retrying it at once instead" in runner.output()
    assert "retried 1," in runner.output()


def test_a_dead_letter_the_broker_refuses_goes_back_after_a_wait_that_grows(
    run_recorder, queue_names, tmp_path, tally
):
    """`.dead` deleted under us: the broker returns each dead letter. The original goes
    back to its queue after 1 s, then 2 s, ... (not at once: that would spin), with its
    attempt unchanged; once `.dead` is back, the next dead letter lands."""
    queue, record = queue_names(), tmp_path / "rec"
    publish_ids(queue, [1])
    runner = run_recorder(queue, "--max-workers", "1", "--max-retries", "0", record=record)
    wait_until(lambda: handled_ids(record) == {1: 1}, 30, message="consuming, .dead made")
    delete_queues([queue + ".dead"])
    body = json.dumps({"id": 2, "fail_attempts": 99}).encode()
    publish_messages(BROKER, queue, [body], declare_dead=False)

    def failures() -> list[dict]:
        return [r for r in read_records(record) if r.get("event") == "fail"]

    wait_until(lambda: len(failures()) >= 3, 30, message="three refusals")
    with Connection(BROKER) as conn:
        conn.default_channel.queue_declare(queue + ".dead", durable=True)
    wait_until(lambda: ready_count(queue + ".dead") == 1, 30, message="the dead letter landed")
    runner.proc.send_signal(signal.SIGTERM)
    assert runner.wait(30) == 0, runner.output()[-3000:]
    attempts = failures()
    assert {r["attempt"] for r in attempts} == {1}, "a refusal is not an attempt"
    times = sorted(r["at"] for r in attempts)
    gaps = [b - a for a, b in zip(times, times[1:], strict=False)]
    assert len(times) == 4, times
    assert gaps[0] >= 1.0 - EARLY and gaps[1] >= 2.0 - EARLY and gaps[2] >= 4.0 - EARLY, gaps
    dead = ids_in(queue + ".dead")
    tally([1, 2], handled_ids(record), dead=dead, queued=[])
    assert dead == [2] and handled_ids(record) == {1: 1}
    assert "refused 3," in runner.output() and "dead-lettered 1," in runner.output()
    assert runner.output().count("the broker refused the dead letter of delivery") == 3
