"""The peers' apps for the benchmark: a Celery task and a Dramatiq actor doing what
`bench.handlers` does, each call stamped into a file so the benchmark counts them.

Configured by environment (set by `bench/run.py`): SG_BENCH_QUEUE, SG_BENCH_HANDLER
(`noop` or `sleep_10ms`), SG_BENCH_RECORD, SPEED_GEVENT_BROKER. Imported only by the peers'
own CLIs and by the benchmark when it fills their queues (in their own message formats).
"""

from __future__ import annotations

import os
import time

BROKER = os.environ.get("SPEED_GEVENT_BROKER", "amqp://guest:guest@localhost:5672//")


def pika_url(url: str) -> str:
    """kombu writes the default vhost as a trailing `//`; pika reads that as vhost ''."""
    return url[:-2] + "/%2F" if url.endswith("//") else url


QUEUE = os.environ.get("SG_BENCH_QUEUE", "bench-peer")
SLEEP = 0.01 if os.environ.get("SG_BENCH_HANDLER") == "sleep_10ms" else 0.0
_record_fd: int | None = None


def handle() -> None:
    """The handler: sleep if asked, then stamp the end time (one write, file kept open)."""
    global _record_fd
    if SLEEP:
        time.sleep(SLEEP)
    if _record_fd is None:
        path = os.environ.get("SG_BENCH_RECORD", "/dev/null")
        _record_fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    os.write(_record_fd, b"%.6f\n" % time.time())


def celery_app(queue: str = QUEUE):  # type: ignore[no-untyped-def]
    """Celery with late acks (ack after the task ran, as speed-gevent does)."""
    from celery import Celery

    app = Celery("bench", broker=BROKER)
    app.conf.update(
        task_acks_late=True,
        task_default_queue=queue,
        worker_hijack_root_logger=False,
        broker_connection_retry_on_startup=True,
    )
    app.task(name="bench.handle")(handle)
    return app


def dramatiq_actor(queue: str = QUEUE):  # type: ignore[no-untyped-def]
    """A Dramatiq actor on its RabbitMQ broker, no retries (nothing fails here)."""
    import dramatiq
    from dramatiq.brokers.rabbitmq import RabbitmqBroker

    dramatiq.set_broker(RabbitmqBroker(url=pika_url(BROKER)))
    return dramatiq.actor(handle, actor_name="bench_handle", queue_name=queue, max_retries=0)


# What the peers' CLIs load: `celery -A bench.peer_apps:app`, `dramatiq bench.peer_apps`.
if os.environ.get("SG_BENCH_PEER") == "celery":
    app = celery_app()
elif os.environ.get("SG_BENCH_PEER") == "dramatiq":
    actor = dramatiq_actor()
