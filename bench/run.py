"""speed-gevent's benchmark: every figure beside a reference measured in the same run.

    .venv/bin/python bench/run.py            # the table: 5 interleaved repetitions
    .venv/bin/python bench/run.py --quick    # one short round of each part (CI: it works)

Against the local RabbitMQ (SPEED_GEVENT_BROKER). Each run fills a fresh durable queue
with N persistent messages, drains it, and checks that N were handled and the queue is
empty. Repetitions interleave the consumers, and every ratio is taken to the raw kombu
consumer of the same repetition; the table shows medians with min–max. speed-gevent runs
with default options but `--min-workers` = `--max-workers`. Targets come from DESIGN.md.
Peers (Celery, Dramatiq, pika) are not measured here yet.
"""

from __future__ import annotations

import argparse
import os
import re
import resource
import signal
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "src"), str(ROOT)]

from kombu import Connection, Consumer, Queue  # noqa: E402

from speed_gevent.publish import publish_messages  # noqa: E402

BROKER = os.environ.get("SPEED_GEVENT_BROKER", "amqp://guest:guest@localhost:5672//")
PERSISTENT = {"delivery_mode": 2}
STAMP = struct.Struct("!d")


class BenchError(Exception):
    """A run lost or left messages: the figures of that run mean nothing."""


# -- the broker side ---------------------------------------------------------------------


def fresh_queue(label: str) -> str:
    return f"bench-{label}-{uuid.uuid4().hex[:8]}"


def fill(queue: str, count: int) -> None:
    bodies = [b'{"n": %d}' % n for n in range(count)]
    for start in range(0, count, 5000):
        publish_messages(BROKER, queue, bodies[start : start + 5000], properties=PERSISTENT)


def ready(queue: str) -> int:
    with Connection(BROKER) as conn:
        return int(conn.connection.channel().queue_declare(queue, passive=True).message_count)


def drop(queue: str) -> None:
    with Connection(BROKER) as conn:
        channel = conn.connection.channel()
        for name in (queue, queue + ".dead"):
            try:
                channel.queue_delete(name)
            except Exception:
                channel = conn.connection.channel()


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


# -- the consumers ----------------------------------------------------------------------


def raw_kombu(queue: str, count: int) -> tuple[float, float]:
    """A single-process kombu consumer that acks each message: (msg/s, CPU s per message)."""
    seen = 0
    first = last = 0.0

    def on_message(body: object, message: object) -> None:
        nonlocal seen, first, last
        if seen == 0:
            first = time.perf_counter()
        message.ack()  # type: ignore[attr-defined]
        seen += 1
        last = time.perf_counter()

    cpu = time.process_time()
    with (
        Connection(BROKER) as conn,
        Consumer(
            conn, [Queue(queue, durable=True, no_declare=True)], callbacks=[on_message], prefetch_count=100
        ),
    ):
        while seen < count:
            conn.drain_events(timeout=30)
    cpu = time.process_time() - cpu
    return count / (last - first), cpu / count


def runner(
    handler: str, queue: str, workers: int, *options: str, **env: str
) -> tuple[list[str], dict[str, str]]:
    """argv and environment of `speed-gevent run bench.handlers:<handler>` on this checkout,
    with a fixed pool of `workers` (the benchmark's only non-default options)."""
    argv = [sys.executable, "-m", "speed_gevent", "run", f"bench.handlers:{handler}", "-q", queue,
            "--min-workers", str(workers), "--max-workers", str(workers), *options]  # fmt: skip
    full_env = {**os.environ, "PYTHONPATH": f"{ROOT}:{ROOT / 'src'}", "SPEED_GEVENT_BROKER": BROKER, **env}
    return argv, full_env


def speed_gevent(queue: str, count: int, workers: int, handler: str = "noop") -> tuple[float, float]:
    """`speed-gevent run` until the queue is drained: (msg/s from its summary, tree CPU s
    per message, counted through RUSAGE_CHILDREN: the master reaps the fork server, which
    reaps the workers)."""
    args, env = runner(handler, queue, workers, "--exit-when-idle", "1s")
    cpu = children_cpu()
    out = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900).stderr
    cpu = children_cpu() - cpu
    match = re.search(r"handled (\d+) .*?acked (\d+),.*?; (\d+) msg/s", out)
    if not match or int(match.group(1)) != count or int(match.group(2)) != count:
        raise BenchError(f"speed-gevent did not handle and ack {count} messages:\n{out[-1500:]}")
    return float(match.group(3)), cpu / count


def drained(run, label: str, count: int, *args):  # type: ignore[no-untyped-def]
    queue = fresh_queue(label)
    try:
        fill(queue, count)
        result = run(queue, count, *args)
        if ready(queue):
            raise BenchError(f"{label}: {ready(queue)} messages left in the queue")
        return result
    finally:
        drop(queue)


# -- latency --------------------------------------------------------------------------------


def publish_paced(queue: str, count: int, rate: float) -> None:
    """Publish `count` stamped messages at `rate` per second (no confirms: pacing matters)."""
    from amqp import Message

    with Connection(BROKER) as conn:
        channel = conn.connection.channel()
        start = time.perf_counter()
        for n in range(count):
            delay = start + n / rate - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            channel.basic_publish(Message(STAMP.pack(time.time()), delivery_mode=2), "", queue)


def declare(queue: str) -> None:
    publish_messages(BROKER, queue, [])


def latency_raw(queue: str, count: int, rate: float) -> list[float]:
    samples: list[float] = []

    def on_message(message: object) -> None:  # raw: the body is a binary stamp
        samples.append(time.time() - STAMP.unpack_from(message.body)[0])  # type: ignore[attr-defined]
        message.ack()  # type: ignore[attr-defined]

    declare(queue)
    with (
        Connection(BROKER) as conn,
        Consumer(
            conn, [Queue(queue, durable=True, no_declare=True)], on_message=on_message, prefetch_count=100
        ),
    ):
        publisher = threading.Thread(target=publish_paced, args=(queue, count, rate))
        publisher.start()
        while len(samples) < count:
            conn.drain_events(timeout=30)
        publisher.join()
    return samples


def latency_speed(queue: str, count: int, rate: float, workers: int = 2) -> list[float]:
    declare(queue)
    with tempfile.NamedTemporaryFile(prefix="sg-latency-") as record:
        args, env = runner("latency", queue, workers, SG_BENCH_LATENCY=record.name)
        process = subprocess.Popen(args, cwd=ROOT, env=env, stderr=subprocess.PIPE, text=True)
        try:
            assert process.stderr is not None
            for line in process.stderr:  # wait until it consumes and its workers are up
                if "consuming" in line:
                    break
            time.sleep(1.0)
            publish_paced(queue, count, rate)
            deadline = time.monotonic() + 60
            while Path(record.name).read_text().count("\n") < count:
                if time.monotonic() > deadline:
                    raise BenchError("speed-gevent did not handle every latency message")
                time.sleep(0.05)
        finally:
            process.send_signal(signal.SIGTERM)
            process.communicate(timeout=60)
        return [float(line) for line in Path(record.name).read_text().split()]


def percentile(samples: list[float], share: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(share * len(ordered)))]


# -- memory ------------------------------------------------------------------------------------


def idle_memory(workers: int) -> tuple[float, float]:
    """Summed PSS of master + fork server + `workers` idle workers, and the largest idle
    worker's USS, in MB."""
    import psutil

    queue = fresh_queue("memory")
    declare(queue)
    args, env = runner("noop", queue, workers)
    process = subprocess.Popen(args, cwd=ROOT, env=env, stderr=subprocess.DEVNULL)
    try:
        master = psutil.Process(process.pid)
        deadline = time.monotonic() + 60
        while True:
            tree = [master, *master.children(recursive=True)]
            titles = [" ".join(p.cmdline()) for p in tree]
            if sum("worker" in t and "idle" in t for t in titles) == workers:
                break
            if time.monotonic() > deadline:
                raise BenchError(f"{workers} idle workers did not come up: {titles}")
            time.sleep(0.1)
        time.sleep(1.0)
        infos = [(p, p.memory_full_info()) for p in tree]
        pss = sum(info.pss for _, info in infos) / 1e6
        uss = max(info.uss for p, info in infos if "worker" in " ".join(p.cmdline())) / 1e6
        return pss, uss
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(60)
        drop(queue)


# -- the table -----------------------------------------------------------------------------------


def spread(values: list[float], fmt: str = "{:.0f}") -> str:
    middle = fmt.format(statistics.median(values))
    if len(values) == 1:
        return middle
    return f"{middle} ({fmt.format(min(values))}–{fmt.format(max(values))})"


def verdict(value: float, target: float, at_least: bool) -> str:
    ok = value >= target if at_least else value <= target
    return ("≥" if at_least else "≤") + f" {target:g}  " + ("ok" if ok else "MISSED")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="one short round of each part")
    parser.add_argument("--repetitions", type=int, default=5)
    parser.add_argument("--count", type=int, default=20000, help="messages per throughput run")
    args = parser.parse_args()
    reps = 1 if args.quick else args.repetitions
    count = 2000 if args.quick else args.count
    slow_count = 400 if args.quick else 8000
    lat_count = 200 if args.quick else 2000

    rows: list[str] = []
    raw, ours, ratios, raw_cpu, our_cpu = [], [], [], [], []
    for rep in range(reps):
        rate, cpu = drained(raw_kombu, "raw", count)
        raw.append(rate)
        raw_cpu.append(cpu)
        rate, cpu = drained(speed_gevent, "sg", count, 2)
        ours.append(rate)
        our_cpu.append(cpu)
        ratios.append(ours[-1] / raw[-1])
        print(
            f"round {rep + 1}/{reps}: raw kombu {raw[-1]:.0f} msg/s, speed-gevent {ours[-1]:.0f} msg/s",
            flush=True,
        )
    rows.append(f"{'no-op, raw kombu (1 process, ack each)':<44} {spread(raw):>22} msg/s   1.00")
    median_ratio = statistics.median(ratios)
    rows.append(
        f"{'no-op, speed-gevent, 2 workers':<44} {spread(ours):>22} msg/s   "
        f"{spread(ratios, '{:.2f}')}x   {verdict(median_ratio, 0.8, True)}"
    )
    rows.append(
        f"{'CPU per message (µs), raw kombu / speed-gevent tree':<44} "
        f"{spread([c * 1e6 for c in raw_cpu]):>10} / {spread([c * 1e6 for c in our_cpu])}"
    )

    for workers in (2, 8) if args.quick else (2, 4, 8):
        effs = []
        for _ in range(reps):
            rate, _cpu = drained(speed_gevent, f"sleep{workers}", slow_count, workers, "sleep_10ms")
            effs.append(rate / (workers * 100))
        target = verdict(statistics.median(effs), 0.95, True) if workers == 8 else ""
        rows.append(
            f"{f'10 ms handler, {workers} workers: efficiency':<44} {spread(effs, '{:.3f}'):>22}   {target}"
        )

    p50s, p99s = [], []
    for _ in range(1 if args.quick else 3):
        raw_lat = latency_raw(fresh_queue("lat-raw"), lat_count, 200.0)
        our_lat = latency_speed(fresh_queue("lat-sg"), lat_count, 200.0)
        p50s.append(percentile(our_lat, 0.5) / percentile(raw_lat, 0.5))
        p99s.append(percentile(our_lat, 0.99) / percentile(raw_lat, 0.99))
        rows.append(
            f"{'  latency ms raw p50/p99, ours p50/p99':<44} "
            f"{percentile(raw_lat, 0.5) * 1e3:.2f}/{percentile(raw_lat, 0.99) * 1e3:.2f}, "
            f"{percentile(our_lat, 0.5) * 1e3:.2f}/{percentile(our_lat, 0.99) * 1e3:.2f}"
        )
    rows.append(
        f"{'latency at 200 msg/s vs raw kombu, p50':<44} {spread(p50s, '{:.2f}'):>22}x   "
        f"{verdict(statistics.median(p50s), 1.2, False)}"
    )
    rows.append(
        f"{'latency at 200 msg/s vs raw kombu, p99':<44} {spread(p99s, '{:.2f}'):>22}x   "
        f"{verdict(statistics.median(p99s), 1.4, False)}"
    )

    workers = 2 if args.quick else 8
    pss, uss = idle_memory(workers)
    rows.append(
        f"{f'memory, master + fork server + {workers} idle workers':<44} {pss:>16.1f} MB PSS   "
        f"{verdict(pss, 45, False) if workers == 8 else ''}"
    )
    rows.append(f"{'memory, largest idle worker':<44} {uss:>16.2f} MB USS   {verdict(uss, 2, False)}")

    print()
    print(
        f"speed-gevent benchmark ({'quick' if args.quick else f'{reps} repetitions'}, "
        f"{count} messages per throughput run), broker {BROKER.split('@')[-1]}"
    )
    for row in rows:
        print(row)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except BenchError as exc:
        print(f"bench: {exc}", file=sys.stderr)
        sys.exit(1)
