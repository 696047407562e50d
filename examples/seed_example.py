"""The seed package's (PHP "Lan\\Speed") README example, ported to speed-gevent's Python API.

    python examples/seed_example.py        # from the repository root, RabbitMQ on localhost

Worker side: an `App` with the handler (the seed's `message` event) and the `start`,
`end`, `disconnect` and `error` events plus a worker signal handler. Master side:
`Master.create` with a name, cache size and pool ceiling, master events and signals.
SIGINT/SIGTERM already stop the master gracefully (the seed wired them by hand).
Options can also come from SPEED_GEVENT_* variables, e.g. SPEED_GEVENT_EXIT_WHEN_IDLE=5s.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time

from speed_gevent import App

app = App()


@app.on("start")
def start(worker) -> None:
    print(f"worker {worker.id} (pid {worker.pid}) started", flush=True)


@app.handler
def handle(message) -> None:
    time.sleep(0.1)
    body = message.json()
    body["time"] = int(time.time() * 1000)
    body["pid"] = os.getpid()


@app.on("end")
def end(worker) -> None:
    print(f"worker {worker.pid} handled {worker.handled} messages", flush=True)


@app.on("disconnect")
def disconnect(worker) -> None:
    print(f"worker {worker.pid} disconnect!", flush=True)


@app.on("error")
def error(exc, worker) -> None:
    print(f"worker {worker.pid}: {type(exc).__name__}: {exc}", flush=True)


app.add_signal(signal.SIGUSR2, lambda signum, worker: print(f"worker {worker.pid} got SIGUSR2"))


def main() -> int:
    from gevent import monkey

    monkey.patch_all()  # the master is a gevent process: patch before amqp is imported
    from speed_gevent.logsetup import setup_logging
    from speed_gevent.master import Master

    setup_logging("info", "text")
    queues = os.environ.get("SPEED_GEVENT_QUEUE", "hello,world,fanout").split(",")
    master = Master.create("examples.seed_example:app", queue=queues, name="master-dispatcher",
                           max_cache=2000, max_workers=5)  # fmt: skip
    master.add_signal(signal.SIGUSR1, lambda signum, m: print(json.dumps(m.stat()), flush=True))
    master.on("error", lambda exc, m: print(f"master error: {exc}", flush=True))
    master.on("worker_exit", lambda pid, reason, m: print(f"worker {pid} exit!!! ({reason})", flush=True))
    master.on(
        "patrolling", lambda stats, m: print("patrolling", len(stats["workers"]), "workers", flush=True)
    )
    return master.run()


if __name__ == "__main__":
    sys.exit(main())
