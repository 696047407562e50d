"""Test helpers that talk to the broker directly (py-amqp, blocking, unpatched)."""

from __future__ import annotations

import json
import os
import subprocess
import uuid
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from kombu import Connection

from speed_gevent.publish import publish_messages
from tests.conftest import BROKER


def publish_ids(
    queue: str, ids: list[int], extra: dict[int, dict[str, Any]] | None = None, queue_type: str = "classic"
) -> None:
    """Publish one JSON message per id; `extra[id]` adds instructions for the test handler."""
    extra = extra or {}
    bodies = [json.dumps({"id": i, **extra.get(i, {})}).encode() for i in ids]
    assert publish_messages(BROKER, queue, bodies, queue_type=queue_type) == len(ids)


def publish_load(queue: str, count: int, sleep: float, queue_type: str = "classic") -> list[int]:
    """Publish ids 1..count whose handler sleeps `sleep` seconds each; returns the ids."""
    ids = list(range(1, count + 1))
    publish_ids(queue, ids, extra={i: {"sleep": sleep} for i in ids}, queue_type=queue_type)
    return ids


def ids_in(queue: str) -> list[int]:
    """Take every message out of `queue` and return the ids in their JSON bodies."""
    return [json.loads(msg.body)["id"] for msg in get_all(queue)]


def ready_count(queue: str) -> int:
    """Messages ready in `queue` (passive declare: exact and fast)."""
    with Connection(BROKER) as conn:
        channel = conn.connection.channel()
        return channel.queue_declare(queue, passive=True).message_count


def rabbitmqctl(*args: str) -> str:
    """Run `rabbitmqctl` (the broker's own view) and return its output."""
    return subprocess.run(
        ["rabbitmqctl", *args], capture_output=True, text=True, timeout=30, check=True
    ).stdout


def queue_info(column: str) -> dict[str, str]:
    """One column of `rabbitmqctl list_queues`, by queue name, as text."""
    out = rabbitmqctl("list_queues", "-q", "--no-table-headers", "name", column)
    return {parts[0]: parts[1] for parts in (line.split() for line in out.splitlines()) if len(parts) == 2}


def queue_column(column: str) -> dict[str, int]:
    """One numeric column of `rabbitmqctl list_queues`, by queue name."""
    return {name: int(value) for name, value in queue_info(column).items() if value.isdigit()}


@contextmanager
def broker_user(configure: str = ".*") -> Iterator[tuple[str, str]]:
    """(name, password) of a RabbitMQ user made for one test, with read and write on
    everything and `configure` as given; deleted afterwards."""
    user, password = f"sg-test-{uuid.uuid4().hex[:6]}", f"canary{uuid.uuid4().hex}"
    rabbitmqctl("add_user", user, password)
    try:
        rabbitmqctl("set_permissions", "-p", "/", user, configure, ".*", ".*")
        yield user, password
    finally:
        rabbitmqctl("delete_user", user)


def unacked_counts() -> dict[str, int]:
    """The broker's own count of unacknowledged messages per queue (rabbitmqctl)."""
    return queue_column("messages_unacknowledged")


def get_all(queue: str) -> list[Any]:
    """Take every message out of `queue` (acked), returning py-amqp messages."""
    messages = []
    with Connection(BROKER) as conn:
        channel = conn.connection.channel()
        while True:
            msg = channel.basic_get(queue, no_ack=True)
            if msg is None:
                return messages
            messages.append(msg)


def delete_queues(names: list[str]) -> None:
    with Connection(BROKER) as conn:
        for name in names:
            channel = conn.connection.channel()
            try:
                channel.queue_delete(name)
            except Exception:
                pass


def queue_exists(name: str) -> bool:
    with Connection(BROKER) as conn:
        channel = conn.connection.channel()
        try:
            channel.queue_declare(name, passive=True)
            return True
        except Exception:
            return False


def read_records(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def handled_ids(path: Path) -> Counter[int]:
    """How often each id was handled to the end (start markers are not counted)."""
    return Counter(record["id"] for record in read_records(path) if "event" not in record)


def started_ids(path: Path) -> Counter[int]:
    """How often each id was started by a handler that then exited or hung."""
    return Counter(record["id"] for record in read_records(path) if record.get("event") == "start")


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie is dead for our purposes
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def broker_connections() -> list[tuple[str, int, int]]:
    """(Erlang pid, client port, negotiated heartbeat) of every connection the broker holds."""
    out = subprocess.run(
        ["rabbitmqctl", "list_connections", "-q", "--no-table-headers", "pid", "peer_port", "timeout"],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    ).stdout
    rows = []
    for line in out.splitlines():
        parts = line.rsplit("\t", 2)
        if len(parts) == 3 and parts[1].isdigit() and parts[2].isdigit():
            rows.append((parts[0], int(parts[1]), int(parts[2])))
    return rows


def broker_connection_of(pid: int) -> tuple[str, int, int] | None:
    """The broker's record of the AMQP connection opened by process `pid`."""
    import psutil

    ports = {
        c.laddr.port for c in psutil.Process(pid).net_connections("tcp") if c.raddr and c.raddr.port == 5672
    }
    for row in broker_connections():
        if row[1] in ports:
            return row
    return None


def close_broker_connection(pid: str) -> None:
    subprocess.run(
        ["rabbitmqctl", "close_connection", pid, "closed by a test"],
        capture_output=True,
        timeout=30,
        check=True,
    )


def session_processes(leader: int) -> list[int]:
    """Pids in the session led by `leader` (a runner's master), the master left out."""
    import psutil

    found = []
    for process in psutil.process_iter(["pid"]):
        try:
            if os.getsid(process.pid) == leader and process.pid != leader:
                found.append(process.pid)
        except OSError:
            continue
    return found


def process_titles(leader: int) -> dict[int, str]:
    """pid -> process title for the master `leader` and every process of its session."""
    titles = {}
    for pid in [leader, *session_processes(leader)]:
        try:
            titles[pid] = Path(f"/proc/{pid}/cmdline").read_text().replace("\0", " ").strip()
        except OSError:
            continue
    return titles


def worker_titles(leader: int) -> dict[int, str]:
    """pid -> process title of the workers of the instance led by `leader`."""
    return {pid: t for pid, t in process_titles(leader).items() if t.startswith("speed-gevent: worker")}


def consumer_count(queue: str) -> int:
    """How many consumers the broker lists on `queue` (rabbitmqctl)."""
    return queue_column("consumers").get(queue, 0)


def worker_pids(path: Path) -> set[int]:
    """The worker processes that handled the recorded messages."""
    return {record["pid"] for record in read_records(path) if "event" not in record}
