#!/usr/bin/env python3
"""Throughput benchmark: speed-gevent next to a reference measured in the same run.

    .venv/bin/python scripts/bench.py [--count 20000] [--workers 2] [--handler noop]

Reference: a raw single-process kombu consumer that acks each message (DESIGN.md's
baseline). Both drain the same number of messages from the same local RabbitMQ; rates
are counted from the first delivery to the last ack (speed-gevent's own summary line).
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT))

from kombu import Connection, Consumer, Queue  # noqa: E402

from speed_gevent.publish import publish_messages  # noqa: E402

BROKER = os.environ.get("SPEED_GEVENT_BROKER", "amqp://guest:guest@localhost:5672//")


def fill(queue: str, count: int) -> None:
    bodies = [b'{"n": %d}' % n for n in range(count)]
    for start in range(0, count, 5000):
        publish_messages(BROKER, queue, bodies[start : start + 5000])


def raw_kombu(queue: str, count: int) -> float:
    seen = 0
    first = last = 0.0

    def on_message(body: object, message: object) -> None:
        nonlocal seen, first, last
        if seen == 0:
            first = time.perf_counter()
        message.ack()  # type: ignore[attr-defined]
        seen += 1
        last = time.perf_counter()

    with (
        Connection(BROKER) as conn,
        Consumer(
            conn, [Queue(queue, durable=True, no_declare=True)], callbacks=[on_message], prefetch_count=100
        ),
    ):
        while seen < count:
            conn.drain_events(timeout=10)
    return count / (last - first)


def speed_gevent(queue: str, count: int, workers: int, handler: str, cache: int | None) -> float:
    args = [
        sys.executable,
        "-m",
        "speed_gevent",
        "run",
        f"examples.handlers:{handler}",
        "-q",
        queue,
        "--min-workers",
        str(workers),
        "--max-workers",
        str(workers),
        "--exit-when-idle",
        "1s",
    ]
    if cache:
        args += ["--max-cache", str(cache)]
    env = {**os.environ, "PYTHONPATH": f"{ROOT}:{ROOT / 'src'}", "SPEED_GEVENT_BROKER": BROKER}
    out = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600).stderr
    match = re.search(r"handled (\d+) .*?; (\d+) msg/s", out)
    if not match or int(match.group(1)) != count:
        raise SystemExit(f"speed-gevent run did not handle {count} messages:\n{out[-2000:]}")
    return float(match.group(2))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--count", type=int, default=20000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--handler", default="noop", choices=("noop", "sleep_10ms"))
    parser.add_argument("--max-cache", type=int, default=None)
    args = parser.parse_args()
    queue = f"bench-{uuid.uuid4().hex[:8]}"
    try:
        fill(queue, args.count)
        reference = raw_kombu(queue, args.count)
        fill(queue, args.count)
        ours = speed_gevent(queue, args.count, args.workers, args.handler, args.max_cache)
    finally:
        with Connection(BROKER) as conn:
            channel = conn.connection.channel()
            channel.queue_delete(queue)
            channel.queue_delete(queue + ".dead")
    print(f"{'raw kombu consumer (1 process, ack each)':<48} {reference:>8.0f} msg/s")
    print(f"{f'speed-gevent, {args.workers} workers, {args.handler}':<48} {ours:>8.0f} msg/s"
          f"   ({ours / reference:.2f}x)")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
