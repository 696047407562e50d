"""speed-gevent's benchmark: every figure beside a reference measured in the same run.

    .venv/bin/pip install -e '.[bench]'      # the peers: pika, Celery, Dramatiq
    .venv/bin/python bench/run.py            # the table: 5 interleaved repetitions
    .venv/bin/python bench/run.py --quick    # one short round of each part (CI: it works)

Against the local RabbitMQ (SPEED_GEVENT_BROKER). Each run fills a fresh durable queue
with N persistent messages, drains it, and checks that N were handled and the queue is
empty. Repetitions interleave the consumers, and every ratio is taken to the raw kombu
consumer of the same repetition; the table shows medians with min–max. speed-gevent runs
with default options but `--min-workers` = `--max-workers`. Targets come from DESIGN.md.
The peers (raw pika, Celery, Dramatiq) come from the optional `bench` dependency group and
run only in the full benchmark; `--quick` measures speed-gevent and raw kombu alone.
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
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "src"), str(ROOT)]

from kombu import Connection, Consumer, Queue  # noqa: E402

from speed_gevent.backoff import delay_queue, ladder  # noqa: E402
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
        try:
            channel.exchange_delete(queue)  # Celery declares a direct exchange per queue
        except Exception:
            channel = conn.connection.channel()
        delays = [delay_queue(queue, step) for step in ladder(1.0, 3600.0)]  # ours, default steps
        for name in (queue, queue + ".dead", *delays, queue + ".DQ", queue + ".XQ"):  # Dramatiq's last
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


def raw_pika(queue: str, count: int) -> tuple[float, float]:
    """The same consumer on pika's BlockingConnection: (msg/s, CPU s per message)."""
    import pika

    from bench.peer_apps import pika_url

    seen = 0
    first = last = 0.0

    def on_message(channel, method, properties, body) -> None:  # type: ignore[no-untyped-def]
        nonlocal seen, first, last
        if seen == 0:
            first = time.perf_counter()
        channel.basic_ack(method.delivery_tag)
        seen += 1
        last = time.perf_counter()
        if seen >= count:
            channel.stop_consuming()

    cpu = time.process_time()
    connection = pika.BlockingConnection(pika.URLParameters(pika_url(BROKER)))
    try:
        channel = connection.channel()
        channel.basic_qos(prefetch_count=100)
        channel.basic_consume(queue, on_message)
        channel.start_consuming()
    finally:
        connection.close()
    cpu = time.process_time() - cpu
    return count / (last - first), cpu / count


# -- the peers: their own CLIs, their own message formats, each call stamped into a file ------


def peer_env(peer: str, queue: str, handler: str, record: str) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": f"{ROOT}:{ROOT / 'src'}", "SPEED_GEVENT_BROKER": BROKER,
            "SG_BENCH_PEER": peer, "SG_BENCH_QUEUE": queue, "SG_BENCH_HANDLER": handler,
            "SG_BENCH_RECORD": record}  # fmt: skip


def fill_peer(peer: str, queue: str, count: int) -> None:
    """Fill `queue` with `count` persistent messages in the peer's own format, the peer's
    own way (so its queue is declared with the arguments it expects)."""
    from bench import peer_apps

    if peer == "celery":
        app = peer_apps.celery_app(queue)
        task = app.tasks["bench.handle"]
        with app.producer_or_acquire() as producer:
            for _ in range(count):
                task.apply_async(producer=producer)
        app.close()
    else:
        actor = peer_apps.dramatiq_actor(queue)
        for _ in range(count):
            actor.send()
        actor.broker.close()


def peer_command(peer: str, queue: str, workers: int) -> list[str]:
    if peer == "celery":  # prefork, late acks (peer_apps), default prefetch
        return [sys.executable, "-m", "celery", "-A", "bench.peer_apps:app", "worker", "-P", "prefork",
                "-c", str(workers), "-Q", queue, "--without-gossip", "--without-mingle",
                "--without-heartbeat", "-l", "WARNING"]  # fmt: skip
    return [sys.executable, "-m", "dramatiq", "bench.peer_apps", "-p", str(workers), "-t", "1", "-Q", queue]


def run_peer(peer: str, queue: str, count: int, workers: int, handler: str = "noop") -> tuple[float, float]:
    """Run the peer's worker until `count` handler calls are stamped, then stop it with
    TERM: (msg/s from the first stamp to the last, tree CPU s per message). More stamps
    than messages (a redelivery) fail the run, as fewer do."""
    with tempfile.NamedTemporaryFile(prefix=f"sg-{peer}-") as record, tempfile.TemporaryFile() as log:
        path = Path(record.name)
        cpu = children_cpu()
        process = subprocess.Popen(
            peer_command(peer, queue, workers), cwd=ROOT, env=peer_env(peer, queue, handler, record.name),
            stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
        try:
            deadline = time.monotonic() + 900
            while path.read_bytes().count(b"\n") < count:
                if process.poll() is not None or time.monotonic() > deadline:
                    log.seek(0)
                    tail = log.read().decode(errors="replace")[-1500:]
                    raise BenchError(f"{peer} stopped before handling {count} messages:\n{tail}")
                time.sleep(0.1)
            time.sleep(0.5)  # let the last acks leave before the stop
        finally:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(120)
            except subprocess.TimeoutExpired:  # never leave a peer running into the next round
                process.kill()
                process.wait()
        cpu = children_cpu() - cpu
        stamps = [float(line) for line in path.read_text().split()]
    if len(stamps) != count:
        raise BenchError(f"{peer} handled {len(stamps)} messages, not {count}")
    return (count - 1) / (max(stamps) - min(stamps)), cpu / count  # stamps mark each end


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


def drained(run, label: str, count: int, *args, peer: str = ""):  # type: ignore[no-untyped-def]
    """Fill a fresh queue, drain it with `run`, check that it is empty, delete it."""
    queue = fresh_queue(label)
    try:
        if peer:
            fill_peer(peer, queue, count)
            result = run(peer, queue, count, *args)
        else:
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


def peers_installed() -> bool:
    import importlib.util

    return all(importlib.util.find_spec(name) for name in ("celery", "dramatiq", "pika"))


LABELS = {"raw kombu": "raw kombu, 1 process, ack each", "raw pika": "raw pika, 1 process, ack each",
          "celery": "Celery prefork, acks_late", "dramatiq": "Dramatiq processes x 1 thread",
          "speed-gevent": "speed-gevent"}  # fmt: skip


def consume(name: str, count: int, workers: int = 2, handler: str = "noop") -> tuple[float, float]:
    """One drained run of consumer `name`: (msg/s, tree CPU s per message)."""
    label = f"{name.split()[-1]}{workers}"
    if name == "raw kombu":
        return drained(raw_kombu, label, count)
    if name == "raw pika":
        return drained(raw_pika, label, count)
    if name == "speed-gevent":
        return drained(speed_gevent, label, count, workers, handler)
    return drained(run_peer, label, count, workers, handler, peer=name)


def throughput_rows(names: list[str], reps: int, count: int) -> list[str]:
    """No-op throughput: every consumer once per round, ratios to that round's raw kombu."""
    rates: dict[str, list[float]] = {name: [] for name in names}
    cpus: dict[str, list[float]] = {name: [] for name in names}
    ratios: dict[str, list[float]] = {name: [] for name in names}
    for rep in range(reps):
        for name in names:
            rate, cpu = consume(name, count)
            rates[name].append(rate)
            cpus[name].append(cpu)
        for name in names:
            ratios[name].append(rates[name][-1] / rates["raw kombu"][-1])
        done = ", ".join(f"{name} {rates[name][-1]:.0f}" for name in names)
        print(f"round {rep + 1}/{reps}: {done} msg/s", flush=True)
    rows = [f"{'no-op, 2 processes':<36} {'msg/s':>22}   {'vs raw kombu':<18} {'tree CPU µs/msg':>15}"]
    for name in names:
        target = verdict(statistics.median(ratios[name]), 0.8, True) if name == "speed-gevent" else ""
        rows.append(
            f"{LABELS[name]:<36} {spread(rates[name]):>22}   {spread(ratios[name], '{:.2f}') + 'x':<18} "
            f"{spread([c * 1e6 for c in cpus[name]]):>15}   {target}"
        )
    rows.append("  (CPU: the raw consumers' consume loop only; the others' whole process tree from start to")
    rows.append("   stop, start-up included: speed-gevent's is about 0.7 s, 35 µs/msg at 20,000 messages)")
    return rows


def efficiency_rows(names: list[str], reps: int, count: int, pools: tuple[int, ...]) -> list[str]:
    """A 10 ms handler: handled/s over workers x 100 (the ideal), each consumer once per round."""
    short = {"celery": "Celery", "dramatiq": "Dramatiq", "speed-gevent": "speed-gevent"}
    rows = [f"{'10 ms handler, efficiency':<36} " + "".join(f"{short[n]:>24}" for n in names)]
    for workers in pools:
        effs: dict[str, list[float]] = {name: [] for name in names}
        for _ in range(reps):
            for name in names:
                rate, _cpu = consume(name, count, workers, "sleep_10ms")
                effs[name].append(rate / (workers * 100))
        target = verdict(statistics.median(effs["speed-gevent"]), 0.95, True) if workers == 8 else ""
        cells = "".join(f"{spread(e, '{:.3f}'):>24}" for e in effs.values())
        rows.append(f"{f'  {workers} workers':<36} {cells}   {target}")
        medians = ", ".join(f"{name} {statistics.median(e):.3f}" for name, e in effs.items())
        print(f"10 ms, {workers} workers: {medians}", flush=True)
    return rows


@contextmanager
def cpus_kept_awake() -> Iterator[None]:
    """One busy loop per CPU under SCHED_IDLE (it runs only when nothing else wants the
    CPU, and any waking process preempts it at once), so no CPU sleeps between messages.
    A diagnostic: it shows what waking idle (virtual) CPUs costs each extra process hop."""
    spin = "import os; os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))\nwhile True: pass"
    spinners = [subprocess.Popen([sys.executable, "-c", spin]) for _ in range(os.cpu_count() or 1)]
    try:
        yield
    finally:
        for spinner in spinners:
            spinner.kill()
            spinner.wait()


def latency_rows(rounds: int, count: int, awake: bool = False) -> list[str]:
    """Publish to handler start at 200 msg/s, raw kombu and speed-gevent interleaved.
    With `awake`, a second set of rounds with the CPUs kept awake (a diagnostic row)."""
    rows = []
    for kept_awake in (False, True) if awake else (False,):
        p50s, p99s = [], []
        for _ in range(rounds):
            with cpus_kept_awake() if kept_awake else nullcontext():
                raw_lat = latency_raw(fresh_queue("lat-raw"), count, 200.0)
                our_lat = latency_speed(fresh_queue("lat-sg"), count, 200.0)
            p50s.append(percentile(our_lat, 0.5) / percentile(raw_lat, 0.5))
            p99s.append(percentile(our_lat, 0.99) / percentile(raw_lat, 0.99))
            rows.append(
                f"{'  latency ms raw p50/p99, ours p50/p99':<36} "
                f"{percentile(raw_lat, 0.5) * 1e3:.2f}/{percentile(raw_lat, 0.99) * 1e3:.2f}, "
                f"{percentile(our_lat, 0.5) * 1e3:.2f}/{percentile(our_lat, 0.99) * 1e3:.2f}"
                + ("  (CPUs kept awake)" if kept_awake else "")
            )
        for share, values, target in (("p50", p50s, 1.2), ("p99", p99s, 1.4)):
            label = f"latency, 200 msg/s, {share} vs raw kombu"
            if kept_awake:
                label = f"  {share}, CPUs kept awake"
            check = "(diagnostic)" if kept_awake else verdict(statistics.median(values), target, False)
            rows.append(f"{label:<36} {spread(values, '{:.2f}'):>22}x   {check}")
    return rows


def memory_rows(workers: int) -> list[str]:
    pss, uss = idle_memory(workers)
    return [
        f"{f'memory, master + fork server + {workers} idle':<36} {pss:>16.1f} MB PSS   "
        f"{verdict(pss, 45, False) if workers == 8 else ''}",
        f"{'memory, largest idle worker':<36} {uss:>16.2f} MB USS   {verdict(uss, 2, False)}",
    ]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="one short round; speed-gevent, raw kombu")
    parser.add_argument("--repetitions", type=int, default=5)
    parser.add_argument("--count", type=int, default=20000, help="messages per no-op run")
    args = parser.parse_args()
    quick = args.quick
    reps = 1 if quick else args.repetitions
    peers = [] if quick else ["celery", "dramatiq"]
    if peers and not peers_installed():
        print("bench: the peers are missing: pip install -e '.[bench]' (or run --quick)", file=sys.stderr)
        return 2
    names = ["raw kombu", "speed-gevent"] if quick else ["raw kombu", "raw pika", *peers, "speed-gevent"]
    rows = throughput_rows(names, reps, 2000 if quick else args.count)
    rows += [""] + efficiency_rows([*peers, "speed-gevent"], reps, 400 if quick else 8000,
                                   (2, 8) if quick else (2, 4, 8))  # fmt: skip
    rows += [""] + latency_rows(1 if quick else 5, 200 if quick else 2000, awake=not quick)
    rows += [""] + memory_rows(2 if quick else 8)
    print()
    print(
        f"speed-gevent benchmark ({'quick' if quick else f'{reps} repetitions'}, "
        f"{2000 if quick else args.count} messages per no-op run), broker {BROKER.split('@')[-1]}"
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
