"""The elastic, self-healing pool against a real RabbitMQ: every message counted by id."""

from __future__ import annotations

import json
import os
import random
import signal
import time
from pathlib import Path

import pytest

from tests.conftest import wait_until
from tests.helpers import (
    alive,
    get_all,
    handled_ids,
    publish_ids,
    publish_load,
    ready_count,
    session_processes,
    started_ids,
    worker_titles,
)

pytestmark = pytest.mark.timeout(240)


def dead_letters(queue: str) -> dict[int, dict]:
    return {json.loads(m.body)["id"]: m.properties["application_headers"] for m in get_all(queue + ".dead")}


def test_the_php_bug_bursts_and_pauses_lose_nothing(run_recorder, queue_names, tmp_path):
    """Idle workers retiring between bursts must never lose a message (the PHP original did)."""
    queue = queue_names()
    record = tmp_path / "rec"
    runner = run_recorder(
        queue,
        "--min-workers",
        "1",
        "--max-workers",
        "4",
        "--max-idle",
        "0.5s",
        "--patrol-interval",
        "0.2s",
        record=record,
    )
    wait_until(lambda: len(worker_titles(runner.pid)) == 1, 30, message="the first worker")
    published: list[int] = []
    grew = shrank = 0
    for cycle in range(20):
        ids = list(range(cycle * 40 + 1, cycle * 40 + 41))
        retired_before = runner.output().count("retiring: idle")
        publish_ids(queue, ids, extra={i: {"sleep": 0.02} for i in ids})
        published += ids
        peak = wait_until(
            lambda: max(len(worker_titles(runner.pid)), 1) if len(worker_titles(runner.pid)) > 1 else None,
            20,
            interval=0.01,
            message=f"cycle {cycle}: the pool to grow",
        )
        grew += peak > 1
        wait_until(
            lambda i=ids: set(i) <= set(handled_ids(record)), 30, message=f"cycle {cycle}: burst handled"
        )
        wait_until(lambda: len(worker_titles(runner.pid)) == 1, 30, message=f"cycle {cycle}: shrink to 1")
        shrank += runner.output().count("retiring: idle") > retired_before
    os.kill(runner.pid, signal.SIGTERM)
    assert runner.wait(30) == 0
    seen = handled_ids(record)
    assert set(seen) == set(published), "a message was lost"
    assert max(seen.values()) == 1, "a message was handled twice"
    assert ready_count(queue) == 0 and ready_count(queue + ".dead") == 0
    assert grew == 20 and shrank == 20, (grew, shrank)
    errors = [line for line in runner.output().splitlines() if " ERROR " in line]
    assert not errors, f"planned retirements logged as errors: {errors[:3]}"
    idle_retired = runner.output().count("retiring: idle")
    print(
        f"\nbursts: 20 cycles, {len(published)} published, {len(seen)} handled once, 0 dead-lettered, "
        f"0 duplicates; pool grew {grew}x and shrank {shrank}x; {idle_retired} idle retirements"
    )


def test_kill_storm_loses_nothing_and_the_pool_recovers(run_recorder, queue_names, tmp_path):
    queue = queue_names()
    ids = publish_load(queue, 4000, 0.01)
    record = tmp_path / "rec"
    runner = run_recorder(
        queue, "--min-workers", "4", "--max-workers", "4", "--exit-when-idle", "2s", record=record
    )
    wait_until(lambda: len(handled_ids(record)) >= 50, 30, message="load to start")
    kills = 0
    rng = random.Random(7)
    end = time.monotonic() + 10
    while time.monotonic() < end:
        busy = [pid for pid, title in worker_titles(runner.pid).items() if " busy " in title]
        if busy:
            try:
                os.kill(rng.choice(busy), signal.SIGKILL)
                kills += 1
            except ProcessLookupError:
                pass
        time.sleep(0.2)  # the storm's own pace, not a wait for a condition
    wait_until(lambda: len(worker_titles(runner.pid)) == 4, 15, message="the pool back to 4 workers")
    assert runner.wait(120) == 0, runner.output()[-3000:]
    seen = handled_ids(record)
    dead = dead_letters(queue)
    assert set(seen) | set(dead) == set(ids), "a message was lost"
    duplicates = sum(count - 1 for count in seen.values())
    assert ready_count(queue) == 0
    assert kills >= 20
    print(
        f"\nkill storm: {kills} workers killed, {len(ids)} published, {len(seen)} handled, "
        f"{len(dead)} dead-lettered, {duplicates} duplicates (handled, then killed before the ack)"
    )


def test_leaky_workers_are_recycled(run_recorder, queue_names, tmp_path):
    queue = queue_names()
    ids = list(range(1, 121))
    publish_ids(queue, ids, extra={i: {"leak": True, "sleep": 0.02} for i in ids})
    record = tmp_path / "rec"
    runner = run_recorder(
        queue,
        "--min-workers",
        "2",
        "--max-workers",
        "2",
        "--max-worker-memory",
        "100MB",
        "--patrol-interval",
        "0.2s",
        "--exit-when-idle",
        "2s",
        record=record,
    )
    assert runner.wait(120) == 0, runner.output()[-3000:]
    output = runner.output()
    recycled = output.count("retiring: memory")
    assert recycled >= 2, output[-3000:]
    seen = handled_ids(record)
    assert set(seen) == set(ids) and max(seen.values()) == 1
    print(f"\nmemory: {recycled} workers recycled over 100MB, {len(seen)} of {len(ids)} handled once")


def test_hung_handlers_are_killed_and_dead_lettered_after_their_retries(run_recorder, queue_names, tmp_path):
    queue = queue_names()
    ids = list(range(1, 21))
    hung = {3, 7}
    publish_ids(queue, ids, extra={i: {"hang": True} for i in hung})
    record = tmp_path / "rec"
    runner = run_recorder(
        queue,
        "--min-workers",
        "2",
        "--max-workers",
        "2",
        "--timeout",
        "1s",
        "--max-retries",
        "1",
        "--exit-when-idle",
        "3s",
        record=record,
    )
    assert runner.wait(60) == 0, runner.output()[-3000:]
    dead = dead_letters(queue)
    assert set(dead) == hung
    for headers in dead.values():
        assert headers["x-speed-reason"] == "timeout" and headers["x-speed-attempt"] == 2
        assert headers["x-speed-exit-status"].startswith("killed by SIGKILL")
    assert started_ids(record) == {3: 2, 7: 2}
    seen = handled_ids(record)
    assert set(seen) == set(ids) - hung and max(seen.values()) == 1


@pytest.mark.parametrize("queue_type", ["classic", "quorum"])
def test_poison_message_is_delivered_max_retries_plus_one_times(
    run_recorder, queue_names, tmp_path, queue_type
):
    queue = queue_names(queue_type)
    ids = list(range(1, 11))
    publish_ids(queue, ids, extra={5: {"exit": True}}, queue_type=queue_type)
    record = tmp_path / "rec"
    runner = run_recorder(
        queue,
        "--queue-type",
        queue_type,
        "--max-workers",
        "2",
        "--max-retries",
        "2",
        "--exit-when-idle",
        "2s",
        record=record,
    )
    assert runner.wait(60) == 0, runner.output()[-3000:]
    assert started_ids(record) == {5: 3}
    dead = dead_letters(queue)
    assert set(dead) == {5} and dead[5]["x-speed-attempt"] == 3 and dead[5]["x-speed-reason"] == "crash"
    assert set(handled_ids(record)) == set(ids) - {5}


def test_workers_that_cannot_boot_stop_the_master(run_cli, queue_names):
    runner = run_cli(
        "run",
        "tests.apps.lifecycle:app",
        "-q",
        queue_names(),
        "--max-workers",
        "2",
        env={"SG_FAIL_START": "1"},
    )
    started = time.monotonic()
    assert runner.wait(30) == 1
    assert time.monotonic() - started < 15
    output = runner.output()
    fatal = [line for line in output.splitlines() if "fatal:" in line]
    assert len(fatal) == 1 and "workers cannot boot" in fatal[0], output[-2000:]
    assert output.count("start event raised") <= 6, "fork storm"


def test_hup_replaces_every_worker_under_load_and_loses_nothing(run_recorder, queue_names, tmp_path):
    queue = queue_names()
    ids = publish_load(queue, 1500, 0.005)
    record = tmp_path / "rec"
    runner = run_recorder(
        queue, "--min-workers", "2", "--max-workers", "2", "--exit-when-idle", "2s", record=record
    )
    wait_until(lambda: len(handled_ids(record)) >= 100, 30, message="load to start")
    before = set(worker_titles(runner.pid))
    assert len(before) == 2
    os.kill(runner.pid, signal.SIGHUP)
    wait_until(lambda: "rolling restart done" in runner.output(), 60, message="the rolling restart")
    after = set(worker_titles(runner.pid))
    assert not before & after and not any(alive(pid) for pid in before)
    assert runner.wait(120) == 0
    seen = handled_ids(record)
    assert set(seen) == set(ids) and max(seen.values()) == 1
    assert {r["pid"] for r in map(json.loads, record.read_text().splitlines())} - before, "new workers worked"


def test_ttin_ttou_and_usr1(run_recorder, queue_names, tmp_path):
    queue = queue_names()
    runner = run_recorder(
        queue, "--min-workers", "1", "--max-workers", "1", "--max-cache", "12", record=tmp_path / "rec"
    )
    wait_until(lambda: len(worker_titles(runner.pid)) == 1, 30, message="the first worker")
    os.kill(runner.pid, signal.SIGTTIN)
    wait_until(lambda: "--max-workers is now 2" in runner.output(), 10, message="TTIN")
    os.kill(runner.pid, signal.SIGTTIN)
    wait_until(lambda: "--max-workers is now 3" in runner.output(), 10, message="second TTIN")
    ids = publish_load(queue, 60, 0.1)
    wait_until(lambda: len(worker_titles(runner.pid)) == 3, 20, message="the pool to grow to 3")
    os.kill(runner.pid, signal.SIGTTOU)
    wait_until(lambda: "--max-workers is now 2" in runner.output().split("is now 3")[-1], 10, message="TTOU")
    wait_until(lambda: "retiring: pool-shrunk" in runner.output(), 10, message="a worker retired")
    os.kill(runner.pid, signal.SIGUSR1)
    line = wait_until(
        lambda: [ln for ln in runner.output().splitlines() if " stats {" in ln], 10, message="USR1"
    )
    stats = json.loads(line[-1].split(" stats ", 1)[1])
    assert stats["pool"]["max_workers"] == 2 and stats["queues"] == [queue]
    assert stats["totals"]["received"] >= 1 and "guest:guest" not in line[-1]
    assert {"pid", "state", "handled", "failed", "memory_bytes", "message_age", "idle_seconds"} <= set(
        stats["workers"][0]
    )
    wait_until(lambda: set(ids) <= set(handled_ids(tmp_path / "rec")), 60, message="all handled")
    os.kill(runner.pid, signal.SIGTERM)
    assert runner.wait(30) == 0


def test_fork_server_death_is_survived(run_recorder, queue_names, tmp_path):
    queue = queue_names()
    ids = publish_load(queue, 600, 0.01)
    record = tmp_path / "rec"
    runner = run_recorder(
        queue, "--min-workers", "2", "--max-workers", "2", "--exit-when-idle", "2s", record=record
    )
    wait_until(lambda: len(handled_ids(record)) >= 50, 30, message="load to start")
    servers = [
        pid
        for pid in session_processes(runner.pid)
        if "forkserver" in Path(f"/proc/{pid}/cmdline").read_text()
    ]
    assert len(servers) == 1
    os.kill(servers[0], signal.SIGKILL)
    assert runner.wait(120) == 0, runner.output()[-3000:]
    assert "starting a new one" in runner.output()
    seen = handled_ids(record)
    dead = dead_letters(queue)
    assert set(seen) | set(dead) == set(ids) and not dead
