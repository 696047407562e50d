"""End to end through the real CLI and a real RabbitMQ: count every message by id."""

from __future__ import annotations

import fcntl
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from speed_gevent.publish import publish_messages
from tests.conftest import BROKER, ROOT, wait_until
from tests.helpers import (
    alive,
    broker_connection_of,
    get_all,
    handled_ids,
    ids_in,
    process_titles,
    publish_ids,
    publish_load,
    read_records,
    ready_count,
    session_processes,
    unacked_counts,
)

pytestmark = pytest.mark.timeout(180)

DEAD_LETTER_HEADERS = {
    "x-speed-attempt", "x-speed-reason", "x-speed-error-type", "x-speed-error-message", "x-speed-traceback",
    "x-speed-origin-queue", "x-speed-origin-exchange", "x-speed-origin-routing-key", "x-speed-failed-at",
    "x-speed-exit-status", "x-speed-original-expiration",
}  # fmt: skip


def rate_from(output: str) -> str:
    match = re.search(r"(\d+) msg/s over ([\d.]+)s", output)
    return f"{match.group(1)} msg/s over {match.group(2)}s" if match else "?"


def test_10000_messages_over_3_queues_4_workers(run_cli, queue_names, tmp_path):
    queues = [queue_names(label) for label in "abc"]
    ids = list(range(1, 10_001))
    for index, queue in enumerate(queues):
        publish_ids(queue, ids[index::3])
    record = tmp_path / "rec"
    args = ["run", "tests.apps.recorder:handle", "--max-workers", "4", "--exit-when-idle", "2s"]
    for queue in queues:
        args += ["--queue", queue]
    runner = run_cli(*args, env={"SG_RECORD": str(record)})
    assert runner.wait(120) == 0, runner.output()[-3000:]
    seen = handled_ids(record)
    assert set(seen) == set(ids)
    assert max(seen.values()) == 1, "duplicates"
    for queue in queues:
        assert ready_count(queue) == 0
        assert ready_count(queue + ".dead") == 0
    output = runner.output()
    assert "received 10000, handled 10000 (failed 0)" in output, "deliveries were requeued or lost"
    assert "stopped (graceful)" in output
    print(f"\n10,000 messages, 3 queues, 4 workers: {rate_from(output)}")


def test_unacked_never_exceeds_max_cache(run_recorder, queue_names, tmp_path):
    queue = queue_names()
    ids = publish_load(queue, 400, 0.05)
    record = tmp_path / "rec"
    runner = run_recorder(
        queue, "--max-workers", "4", "--max-cache", "20", "--exit-when-idle", "1s", record=record
    )
    samples = []
    wait_until(lambda: handled_ids(record), 30, message="first handled message")
    while runner.proc.poll() is None and len(samples) < 6:
        samples.append(unacked_counts().get(queue, 0))
    assert runner.wait(60) == 0
    assert samples and max(samples) <= 20, samples
    assert max(samples) > 0, f"sampling saw no unacked messages at all: {samples}"
    print(f"\nunacked samples with --max-cache 20: {samples}")
    assert set(handled_ids(record)) == set(ids)


def test_sigterm_under_load_returns_the_rest_and_loses_nothing(run_recorder, queue_names, tmp_path):
    queue = queue_names()
    ids = publish_load(queue, 2000, 0.01)
    record = tmp_path / "rec"
    runner = run_recorder(queue, "--max-workers", "2", "--graceful-timeout", "10s", record=record)
    wait_until(lambda: len(handled_ids(record)) >= 100, 30, message="100 handled")
    stopped_at = time.monotonic()
    os.kill(runner.pid, signal.SIGTERM)
    assert runner.wait(15) == 0
    assert time.monotonic() - stopped_at < 10
    handled = handled_ids(record)
    messages = get_all(queue)
    back = [json.loads(msg.body)["id"] for msg in messages]
    assert max(handled.values()) == 1, "a message was handled twice"
    assert len(back) == len(set(back)), "a message is twice in the queue"
    assert not set(handled) & set(back), "a message was handled and also returned"
    assert set(handled) | set(back) == set(ids), "a message was lost"
    assert "stopped (graceful)" in runner.output()
    # What the summary calls requeued is what the broker got back from us: the messages
    # that come again marked redelivered (the rest never left the queue).
    requeued = int(re.search(r"requeued (\d+)", runner.output()).group(1))
    assert requeued > 0 and requeued == sum(msg.delivery_info["redelivered"] for msg in messages)


def test_master_sigkill_leaves_no_worker_and_loses_nothing(run_recorder, queue_names, tmp_path):
    queue = queue_names()
    ids = publish_load(queue, 1000, 0.005)
    record = tmp_path / "rec"
    runner = run_recorder(queue, "--min-workers", "3", "--max-workers", "3", record=record)
    wait_until(lambda: len(handled_ids(record)) >= 100, 30, message="100 handled")
    children = session_processes(runner.pid)
    assert len(children) == 4, children  # the fork server and three workers
    os.kill(runner.pid, signal.SIGKILL)
    runner.proc.wait()
    killed_at = time.monotonic()
    wait_until(lambda: not any(alive(pid) for pid in children), 2.0, message="workers to die")
    assert time.monotonic() - killed_at <= 2.0
    rerun = run_recorder(
        queue, "--min-workers", "3", "--max-workers", "3", "--exit-when-idle", "2s", record=record
    )
    assert rerun.wait(60) == 0
    assert set(handled_ids(record)) == set(ids), "a message was lost"
    assert ready_count(queue) == 0


def test_failures_are_dead_lettered_with_their_story(run_recorder, queue_names, tmp_path):
    queue = queue_names()
    ids = list(range(1, 201))
    raising = {i for i in ids if i % 10 == 0}
    exiting = {i for i in ids if i % 20 == 5}
    rejected = {7}
    extra = {i: {"fail": True} for i in raising}
    extra.update({i: {"exit": True} for i in exiting})
    extra.update({i: {"reject": True} for i in rejected})
    publish_ids(queue, ids, extra=extra)
    record = tmp_path / "rec"
    runner = run_recorder(
        queue, "--max-workers", "3", "--max-retries", "0", "--exit-when-idle", "2s", record=record
    )
    assert runner.wait(60) == 0, runner.output()[-3000:]
    dead = {}
    for msg in get_all(queue + ".dead"):
        dead[json.loads(msg.body)["id"]] = msg.properties["application_headers"]
    assert set(dead) == raising | exiting | rejected
    handled = handled_ids(record)
    assert set(handled) == set(ids) - set(dead) and max(handled.values()) == 1
    assert len(handled) + len(dead) == len(ids)
    boom = dead[10]
    assert boom["x-speed-reason"] == "error" and boom["x-speed-error-type"] == "ValueError"
    assert boom["x-speed-error-message"] == "boom 10" and "boom 10" in boom["x-speed-traceback"]
    assert boom["x-speed-origin-queue"] == queue and boom["x-speed-attempt"] == 1
    crash = dead[5]
    assert crash["x-speed-reason"] == "crash" and crash["x-speed-exit-status"] == "exit code 9"
    assert dead[7]["x-speed-reason"] == "reject" and dead[7]["x-speed-error-message"] == "asked to reject"
    assert ready_count(queue) == 0


def test_retries_then_dead_letter_as_the_sender_sent_it(run_recorder, queue_names, tmp_path):
    queue = queue_names()
    # Transient and with a TTL: the dead letter stays transient and loses only the TTL.
    sent = {"delivery_mode": 1, "expiration": "600000", "message_id": "m1", "content_type": "text/json"}
    publish_messages(BROKER, queue, [json.dumps({"id": 1, "fail": True}).encode()], properties=sent)
    publish_ids(queue, [2, 3], extra={3: {"fail_attempts": 1}})
    record = tmp_path / "rec"
    runner = run_recorder(
        queue, "--max-workers", "1", "--max-retries", "2", "--retry-delay", "0", "--exit-when-idle", "2s",
        record=record,
    )  # fmt: skip
    assert runner.wait(60) == 0
    dead = get_all(queue + ".dead")
    assert len(dead) == 1 and json.loads(dead[0].body) == {"id": 1, "fail": True}
    properties, headers = dead[0].properties, dead[0].properties["application_headers"]
    assert headers["x-speed-attempt"] == 3 and headers["x-speed-original-expiration"] == "600000"
    assert "expiration" not in properties
    assert (properties["delivery_mode"], properties["message_id"]) == (1, "m1")
    assert properties["content_type"] == "text/json"
    # Our bookkeeping stays out of what users see: only the attempt and the story.
    assert all(not name.startswith("x-speed-") or name in DEAD_LETTER_HEADERS for name in headers), headers
    assert handled_ids(record) == {2: 1, 3: 1}
    retried = [r for r in read_records(record) if r["id"] == 3 and "event" not in r]
    assert retried[0]["attempt"] == 2 and retried[0]["headers"] == ["x-speed-attempt"]
    assert "retried 3, dead-lettered 1" in runner.output()


def test_second_signal_stops_at_once_and_returns_the_message(run_cli, queue_names, tmp_path):
    queue = queue_names()
    publish_ids(queue, [1], extra={1: {"sleep": 60}})
    runner = run_cli("run", "tests.apps.recorder:handle", "-q", queue, "--max-workers", "1")
    wait_until(lambda: "busy" in titles(runner.pid), 30, message="the worker to be busy")
    os.kill(runner.pid, signal.SIGTERM)
    wait_until(lambda: "stopping: cancelling consumers" in runner.output(), 10, message="graceful stop")
    started = time.monotonic()
    os.kill(runner.pid, signal.SIGINT)
    assert runner.wait(10) == 0
    assert time.monotonic() - started < 5
    assert ready_count(queue + ".dead") == 0
    (back,) = get_all(queue)
    assert back.delivery_info["redelivered"], "it went out and came back"
    assert "stopped (immediate)" in runner.output() and "requeued 1," in runner.output()


def test_graceful_timeout_kills_the_handler_without_counting_a_failure(run_cli, queue_names):
    queue = queue_names()
    publish_ids(queue, [1], extra={1: {"sleep": 60}})
    runner = run_cli(
        "run", "tests.apps.recorder:handle", "-q", queue, "--max-workers", "1", "--graceful-timeout", "1s"
    )
    wait_until(lambda: "busy" in titles(runner.pid), 30, message="the worker to be busy")
    os.kill(runner.pid, signal.SIGTERM)
    assert runner.wait(15) == 0
    assert ready_count(queue) == 1 and ready_count(queue + ".dead") == 0
    back = get_all(queue)
    assert "x-speed-attempt" not in (back[0].properties.get("application_headers") or {})


def titles(leader: int) -> str:
    return "\n".join(process_titles(leader).values())


def test_process_titles_and_no_password(run_recorder, queue_names):
    queue = queue_names()
    runner = run_recorder(
        queue,
        "--min-workers",
        "2",
        "--max-workers",
        "2",
        "--name",
        "titled",
        env={"SPEED_GEVENT_BROKER": "amqp://guest:guest@localhost:5672//"},
    )
    seen = wait_until(
        lambda: (t := titles(runner.pid)).count("speed-gevent: worker") == 2 and t, 30, message="titles"
    )
    assert f"speed-gevent: master titled [{queue}]" in seen
    assert "speed-gevent: worker 1 idle" in seen and "speed-gevent: worker 2 idle" in seen
    assert "guest:guest" not in seen
    os.kill(runner.pid, signal.SIGUSR1)
    wait_until(lambda: "stats {" in runner.output(), 10, message="USR1 stats")
    os.kill(runner.pid, signal.SIGTERM)
    assert runner.wait(15) == 0
    assert "guest:guest" not in runner.output()


def test_handler_runs_unpatched_and_workers_hold_only_their_socket(run_recorder, queue_names, tmp_path):
    queue = queue_names()
    publish_ids(queue, [1], extra={})
    record = tmp_path / "rec"
    runner = run_recorder(queue, "--min-workers", "2", "--max-workers", "2", handler="inspect", record=record)
    from tests.helpers import read_records

    seen = wait_until(lambda: read_records(record), 30, message="the inspect handler")[0]
    assert seen["socket_module"] == "socket", "the handler saw a gevent-patched socket"
    assert seen["real_thread"] is True
    workers = [
        pid
        for pid in session_processes(runner.pid)
        if "speed-gevent: worker" in Path(f"/proc/{pid}/cmdline").read_text()
    ]
    assert len(workers) == 2
    for pid in workers:
        fds = os.listdir(f"/proc/{pid}/fd")
        links = sorted(os.readlink(f"/proc/{pid}/fd/{fd}") for fd in fds if int(fd) > 2)
        assert len(links) == 1 and links[0].startswith("socket:"), (pid, links)
    os.kill(runner.pid, signal.SIGTERM)
    assert runner.wait(15) == 0


def test_heartbeats_are_asked_for(run_cli, queue_names):
    """kombu leaves heartbeats off unless asked; the broker must see the one we ask for."""
    runner = run_cli(
        "run", "tests.apps.recorder:handle", "-q", queue_names(), "--max-workers", "1", "--heartbeat", "7s"
    )
    connection = wait_until(lambda: broker_connection_of(runner.pid), 30, message="the connection")
    assert connection[2] == 7
    os.kill(runner.pid, signal.SIGTERM)
    assert runner.wait(15) == 0


def test_consumer_wakes_on_acks_not_on_a_timer(run_recorder, queue_names, tmp_path):
    """With a 2-message window nothing new arrives until acks leave; a drain that slept on a
    fixed 1 s timeout would need 1,000 s for 2,000 messages. Event-driven, it takes seconds."""
    queue = queue_names()
    ids = list(range(1, 2001))
    publish_ids(queue, ids)
    record = tmp_path / "rec"
    runner = run_recorder(
        queue, "--max-workers", "2", "--max-cache", "2", "--exit-when-idle", "1s", record=record
    )
    assert runner.wait(60) == 0
    assert set(handled_ids(record)) == set(ids)


def test_quorum_queue_with_per_consumer_prefetch(run_recorder, queue_names, tmp_path):
    """Quorum queues refuse global QoS: consuming two of them must work, within the cache bound."""
    queues = [queue_names("qa"), queue_names("qb")]
    ids = list(range(1, 301))
    for index, queue in enumerate(queues):
        publish_ids(queue, ids[index::2], extra={i: {"sleep": 0.02} for i in ids}, queue_type="quorum")
    record = tmp_path / "rec"
    runner = run_recorder(
        queues,
        "--queue-type",
        "quorum",
        "--max-workers",
        "3",
        "--max-cache",
        "6",
        "--exit-when-idle",
        "1s",
        record=record,
    )
    wait_until(lambda: handled_ids(record), 30, message="first handled message")
    samples = []
    while runner.proc.poll() is None and len(samples) < 3:
        counts = unacked_counts()
        samples.append(sum(counts.get(queue, 0) for queue in queues))
    assert runner.wait(60) == 0, runner.output()[-2000:]
    assert max(samples) <= 6, samples
    seen = handled_ids(record)
    assert set(seen) == set(ids) and max(seen.values()) == 1


def test_a_dead_worker_is_replaced(run_cli, queue_names, tmp_path):
    queue = queue_names()
    runner = run_cli(
        "run", "tests.apps.recorder:handle", "-q", queue, "--min-workers", "2", "--max-workers", "2"
    )
    wait_until(lambda: titles(runner.pid).count("idle") == 2, 30, message="two idle workers")
    workers = [
        pid
        for pid in session_processes(runner.pid)
        if "speed-gevent: worker" in Path(f"/proc/{pid}/cmdline").read_text()
    ]
    os.kill(workers[0], signal.SIGKILL)
    wait_until(lambda: not alive(workers[0]), 5, message="the worker to die")
    wait_until(lambda: "worker 3 idle" in titles(runner.pid), 10, message="a replacement worker")
    record = tmp_path / "rec"
    assert titles(runner.pid).count("idle") == 2
    os.kill(runner.pid, signal.SIGTERM)
    assert runner.wait(15) == 0
    assert not record.exists()


def test_handler_retry_asks_for_another_attempt(run_recorder, queue_names, tmp_path):
    queue = queue_names()
    publish_ids(queue, [1, 2], extra={1: {"retry": True}})
    record = tmp_path / "rec"
    runner = run_recorder(queue, "--max-workers", "1", "--exit-when-idle", "2s", record=record)
    assert runner.wait(60) == 0
    records = {r["id"]: r for r in read_records(record)}
    assert handled_ids(record) == {1: 1, 2: 1}
    assert records[1]["attempt"] == 2 and records[2]["attempt"] == 1
    assert "retried 1, dead-lettered 0" in runner.output()
    assert ready_count(queue + ".dead") == 0


def test_a_stderr_nobody_reads_does_not_stop_the_master(queue_names, tmp_path):
    """Over a thousand warnings into a stderr pipe (shrunk to one page) that is not read:
    the master keeps working, since a real thread writes its lines; what does not fit is
    dropped, counted, and the count is written once the pipe is read again."""
    queue = queue_names()
    ids = list(range(1, 1301))
    publish_ids(queue, ids, extra={i: {"fail": True} for i in ids})
    env = {k: v for k, v in os.environ.items() if not k.startswith("SPEED_GEVENT_")}
    env.update({"SPEED_GEVENT_BROKER": BROKER, "PYTHONPATH": str(ROOT)})
    read_end, write_end = os.pipe()
    fcntl.fcntl(write_end, fcntl.F_SETPIPE_SZ, 4096)  # whatever the page size: one page
    process = subprocess.Popen(
        [sys.executable, "-m", "speed_gevent", "run", "tests.apps.recorder:handle", "-q", queue,
         "--max-retries", "0", "--max-workers", "2", "--exit-when-idle", "3s"],
        cwd=ROOT, env=env, stderr=write_end,
    )  # fmt: skip
    os.close(write_end)
    try:
        wait_until(
            lambda: ready_count(queue + ".dead") == len(ids), 60, message="every message dead-lettered"
        )
        with os.fdopen(read_end, "r", errors="replace") as pipe:  # read at last, to the end
            errors = pipe.read()
        process.wait(60)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == 0, errors[-2000:]
    assert "log lines dropped: stderr was not read" in errors
    assert "dead-lettered 1300" in errors, errors[-2000:]
    assert sorted(ids_in(queue + ".dead")) == ids


def test_large_messages_pause_consuming_above_the_byte_bound(run_recorder, queue_names, tmp_path):
    """300 KB bodies, a 1 MB bound and a prefetch of 16: consuming pauses (the broker would
    otherwise hand over 4.8 MB) and resumes, again and again; every message handled once."""
    queue = queue_names()
    ids = list(range(1, 41))
    padding = "p" * 300_000
    publish_ids(queue, ids, extra={i: {"sleep": 0.05, "padding": padding} for i in ids})
    record = tmp_path / "rec"
    runner = run_recorder(queue, "--min-workers", "2", "--max-workers", "2", "--max-cache", "16",
                          "--max-cache-bytes", "1MB", "--exit-when-idle", "2s", "--log-level", "debug",
                          record=record)  # fmt: skip
    assert runner.wait(90) == 0, runner.output()[-3000:]
    handled = handled_ids(record)
    assert set(handled) == set(ids) and max(handled.values()) == 1, runner.output()[-3000:]
    output = runner.output()
    pauses = output.count("consuming paused")
    assert pauses >= 2 and output.count("consuming again") >= pauses - 1, output[-3000:]
    held = [int(n) for n in re.findall(r"holding (\d+) bytes of messages, above", output)]
    assert max(held) <= 1_000_000 + 16 * 310_000, "the bound plus what was on the way at most"
    assert ids_in(queue) == []
