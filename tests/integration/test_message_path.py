"""The router's message path against a real RabbitMQ: a pool that follows a trickle,
bodies exactly as real publishers sent them, and workers that write nonsense."""

from __future__ import annotations

import json
import os
import signal
import time

import pika
import pytest
from kombu import Connection, Exchange, Producer, Queue

from speed_gevent.publish import publish_messages
from tests.conftest import BROKER, wait_until
from tests.helpers import get_all, handled_ids, publish_ids, read_records, ready_count, worker_titles

pytestmark = [pytest.mark.rabbitmq, pytest.mark.timeout(180)]


def test_a_trickle_lets_the_pool_shrink_back(run_recorder, queue_names, tmp_path):
    """Grow with a burst, then a trickle one worker can carry (5 msg/s, 10 ms each): the
    pool is down to one or two workers within --max-idle plus a patrol interval."""
    queue = queue_names()
    record = tmp_path / "rec"
    runner = run_recorder(
        queue, "--min-workers", "1", "--max-workers", "4", "--max-idle", "3s", "--patrol-interval", "1s",
        record=record,
    )  # fmt: skip
    wait_until(lambda: len(worker_titles(runner.pid)) == 1, 30, message="the first worker")
    burst = list(range(1, 41))
    publish_ids(queue, burst, extra={i: {"sleep": 0.1} for i in burst})
    wait_until(
        lambda: len(worker_titles(runner.pid)) == 4, 20, interval=0.01, message="the pool to grow to 4"
    )
    wait_until(lambda: set(burst) <= set(handled_ids(record)), 30, message="the burst handled")
    published = list(burst)
    next_id = 100
    shrunk_at = None
    sizes = []
    started = time.monotonic()
    while time.monotonic() - started < 12:  # max-idle 3s + patrol 1s, with room to spare
        publish_ids(queue, [next_id], extra={next_id: {"sleep": 0.01}})
        published.append(next_id)
        next_id += 1
        time.sleep(0.2)  # the trickle's own pace, not a wait for a condition
        sizes.append(len(worker_titles(runner.pid)))
        if shrunk_at is None and sizes[-1] <= 2:
            shrunk_at = time.monotonic() - started
    assert shrunk_at is not None and shrunk_at <= 3 + 1 + 3, f"pool sizes during the trickle: {sizes}"
    assert sizes[-1] <= 2, f"the pool grew back under a trickle: {sizes}"
    wait_until(lambda: set(published) <= set(handled_ids(record)), 30, message="the trickle handled")
    os.kill(runner.pid, signal.SIGTERM)
    assert runner.wait(30) == 0
    seen = handled_ids(record)
    assert set(seen) == set(published) and max(seen.values()) == 1
    assert ready_count(queue) == 0 and ready_count(queue + ".dead") == 0


BODIES = {
    "utf8": ("utf-8", "grüße, 世界".encode()),
    "utf8-lie": ("utf-8", b"\xff\xfe not utf-8 at all \x80"),
    "latin1": ("latin-1", "café".encode("latin-1")),
    "unknown": ("x-made-up", b"\x00\x01\x02 raw"),
    "gzip-claim": ("gzip", b"not gzipped"),
    "empty": ("utf-8", b""),
}


def test_bodies_arrive_exactly_as_published_whatever_the_content_encoding(
    run_recorder, queue_names, tmp_path
):
    """pika with several content_encoding values (a body that matches, one that does not,
    unknown ones) and a kombu Producer: every handler sees the exact bytes, and the master
    lives on (py-amqp would hand a body with a content_encoding over as str)."""
    queue = queue_names()
    record = tmp_path / "rec"
    publish_ids(queue, [])  # declare the queue as the runner does
    # kombu spells the default vhost "//" at the end of the URL; pika wants "/%2F"
    params = pika.URLParameters(BROKER[:-1] + "%2F" if BROKER.endswith("//") else BROKER)
    with pika.BlockingConnection(params) as conn:
        channel = conn.channel()
        channel.confirm_delivery()
        for name, (encoding, body) in BODIES.items():
            props = pika.BasicProperties(content_encoding=encoding, message_id=name, delivery_mode=2)
            channel.basic_publish("", queue, body, props, mandatory=True)
    kombu_json = {"kombu": "json", "ü": 1}
    with Connection(BROKER) as conn:
        producer = Producer(conn.channel())
        target = Queue(queue, Exchange(""), routing_key=queue, no_declare=True)
        producer.publish(kombu_json, routing_key=queue, message_id="kombu-json", declare=[], retry=True)
        producer.publish(b"\xc3\x28 raw", routing_key=queue, message_id="kombu-bytes",
                         content_type="application/octet-stream", content_encoding="binary")  # fmt: skip
        producer.publish("text", routing_key=queue, message_id="kombu-text", serializer="json")
        del target
    expected = {name: body for name, (_, body) in BODIES.items()}
    expected["kombu-json"] = json.dumps(kombu_json).encode()
    expected["kombu-bytes"] = b"\xc3\x28 raw"
    expected["kombu-text"] = json.dumps("text").encode()
    runner = run_recorder(queue, "--exit-when-idle", "2s", handler="echo", record=record)
    assert runner.wait(60) == 0, runner.output()[-2000:]
    seen = {r["id"]: bytes.fromhex(r["body"]) for r in read_records(record)}
    assert seen == expected
    assert len(read_records(record)) == len(expected), "a body was handled twice"
    assert "fatal" not in runner.output() and "Traceback" not in runner.output()
    assert ready_count(queue) == 0 and ready_count(queue + ".dead") == 0


@pytest.mark.parametrize("kind", ["outcome", "huge", "truncated"])
def test_a_worker_writing_a_bad_frame_ends_only_that_worker(kind, run_recorder, queue_names, tmp_path):
    """A result with an unknown outcome, a header claiming a huge result, or half a
    result and then exit: that worker ends, its message counts one failed attempt and is
    handled on the next, and the master lives on."""
    queue = queue_names()
    record = tmp_path / "rec"
    publish_ids(queue, [1, 2, 3], extra={2: {"corrupt": kind}})
    runner = run_recorder(queue, "--max-workers", "2", "--exit-when-idle", "2s", record=record)
    assert runner.wait(60) == 0, runner.output()[-2000:]
    output = runner.output()
    assert "fatal" not in output and "Traceback" not in output
    if kind != "truncated":
        assert "sent a bad frame" in output
    handled = {r["id"]: r for r in read_records(record) if "event" not in r}
    assert sorted(handled) == [1, 2, 3] and handled[2]["attempt"] == 2
    assert ready_count(queue) == 0 and ready_count(queue + ".dead") == 0


BIG = 64 * 2**20


def test_bodies_a_handler_cannot_read_fail_as_attempts_and_a_big_one_leaves_no_trace(
    run_recorder, queue_names, tmp_path, tally
):
    """Not UTF-8 read with .text, not JSON or empty read with .json(): MessageDecodeError
    in the handler, retried, then dead-lettered with its type; never acked unhandled. A
    64 MiB body is handled whole, and the master's memory comes back down after it."""
    queue, record = queue_names(), tmp_path / "rec"
    bodies = {
        "text-bad": b"\xff\xfe not utf-8",
        "json-bad": b"not json",
        "json-empty": b"",
        "text-empty": b"",
        "json-big": b'"' + b"a" * (BIG - 2) + b'"',
    }
    publish_ids(queue, [])
    for name, body in bodies.items():
        assert publish_messages(BROKER, queue, [body], properties={"message_id": name}) == 1
    runner = run_recorder(queue, "--max-workers", "2", "--max-retries", "1", "--retry-delay", "0",
                          handler="decode", record=record)  # fmt: skip
    wait_until(lambda: {r["id"] for r in read_records(record)} == set(bodies), 60, message="every body read")
    wait_until(lambda: ready_count(queue + ".dead") == 3, 30, message="three dead letters")
    rss = wait_until(lambda: _rss_below(runner.proc.pid, 64 * 2**20), 30,
                     message="the master's memory back below 64 MiB after a 64 MiB body")  # fmt: skip
    runner.proc.send_signal(signal.SIGTERM)
    assert runner.wait(30) == 0, runner.output()[-3000:]
    seen: dict[str, list] = {}
    for r in read_records(record):
        seen.setdefault(r["id"], []).append((r["attempt"], r["error"], r["size"]))
    bad = {"text-bad", "json-bad", "json-empty"}
    for name in bad:
        assert seen[name] == [(1, "MessageDecodeError", len(bodies[name])), (2, "MessageDecodeError",
                              len(bodies[name]))]  # fmt: skip
    assert seen["text-empty"] == [(1, None, 0)] and seen["json-big"] == [(1, None, BIG)]
    dead = {m.properties["message_id"]: m.headers for m in get_all(queue + ".dead")}
    assert set(dead) == bad
    assert {h["x-speed-error-type"] for h in dead.values()} == {"MessageDecodeError"}
    assert ready_count(queue) == 0
    assert rss is not None


def _rss_below(pid: int, limit: int) -> int | None:
    """The process's resident size in bytes if it is below `limit`, else None."""
    with open(f"/proc/{pid}/status") as handle:
        for line in handle:
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1]) * 1024
                return rss if rss < limit else None
    return None
