"""`Master`: the gevent master process. It reads as the script of its lifecycle:
start the fork server, connect, declare, prefork the floor of the pool, consume; on a
stop signal, drain gracefully (or immediately on the second); on a fatal error, stop
and exit 1.

Greenlets (one Group, each linked so a crash is fatal, never silent): consumer (the only
one that touches the AMQP connection), dispatcher (cache → idle workers, scaling up on
backlog), patrol, fork-reports, one reader per worker, control (acts on signal intents)
and idle-watch. The pool's shape is the `Supervisor`'s job; what happens to a finished
attempt is the `Settler`'s, following the pure `policy` module.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable
from enum import Enum
from typing import Any

import gevent
import gevent.event
import gevent.queue
from gevent.pool import Group

from .broker import BrokerSession, ConnectionLost
from .cache import MessageCache
from .config import Settings, load_settings
from .delivery import Delivery
from .dispatcher import Dispatcher
from .errors import ExitCode, FatalError
from .forkclient import ForkClient
from .osproc import set_title
from .patrol import SpawnGuard
from .policy import Failure, FailureKind, describe_exit, failure_from_result
from .pool import Pool, PoolEvents
from .protocol import ResultFrame
from .settle import Settler
from .signals import SIGNAL_INTENTS, Intent, StopKind, StopRequests
from .stats import Counters, summary_line
from .supervisor import Supervisor
from .urls import mask_secrets
from .workerproc import WorkerProc, WorkerState

logger = logging.getLogger(__name__)

#: Seconds workers get to exit after StopFrame before they are killed.
WORKER_STOP_TIMEOUT = 5.0

MASTER_EVENTS = ("error", "worker_exit", "patrolling")


class MasterState(Enum):
    STARTING = "starting"
    RUNNING = "running"
    DRAINING = "draining"
    STOPPING = "stopping"
    STOPPED = "stopped"


class Master(PoolEvents):
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.name = settings.name
        self.counters = Counters()
        self.state = MasterState.STARTING
        self._group = Group()
        self._cache = MessageCache(settings.max_cache)
        self._activity = gevent.event.Event()
        self._immediate = gevent.event.Event()
        self._intents: gevent.queue.Queue[Any] = gevent.queue.Queue()
        self._stops = StopRequests()
        self._done = gevent.event.Event()
        self._exit_code = ExitCode.OK
        self._started_at = time.monotonic()
        self._last_delivery_at = self._started_at
        self._callbacks: dict[str, list[Callable[..., Any]]] = {name: [] for name in MASTER_EVENTS}
        self._signal_callbacks: dict[int, list[Callable[..., Any]]] = {}
        self._fork_restarts = SpawnGuard(limit=3, window=60.0)
        self._fork = self._make_fork_client()
        self._pool = Pool(self._fork, self._group, self)
        self._session = BrokerSession(
            settings.broker, settings.heartbeat, self._on_delivery, settings.connect_timeout
        )
        self._settler = Settler(self._session, self.counters, settings.max_retries)
        self._supervisor = Supervisor(
            settings, self._pool, self._cache, self._settler, self._wait_until, self._fatal
        )
        self._dispatcher = Dispatcher(
            self._cache, self._pool, self._supervisor, lambda: self.state is MasterState.RUNNING
        )

    @classmethod
    def create(cls, target: str, **options: Any) -> Master:
        """Build a master from Python: `Master.create("app:handle", queue=["q"], max_workers=4)`.

        Options are the CLI's long names with underscores, validated the same way; they
        take precedence over SPEED_GEVENT_* variables and the --config file, as on the CLI.
        The caller must have monkey-patched with gevent before importing this module.
        """
        given = {name.replace("_", "-"): value for name, value in options.items()}
        if isinstance(given.get("queue"), str):
            given["queue"] = [given["queue"]]
        return cls(load_settings(target, given, os.environ, os.environ.get("SPEED_GEVENT_CONFIG")))

    def _make_fork_client(self) -> ForkClient:
        s = self.settings
        return ForkClient(
            s.target,
            s.name,
            s.log_level,
            s.log_format,
            on_spawned=self._on_spawned,
            on_exited=self._on_exited,
            on_lost=self._on_fork_lost,
        )

    # -- public API -------------------------------------------------------------------------

    def on(self, event: str, fn: Callable[..., Any]) -> Master:
        """Register `fn` for `error(exc, master)`, `worker_exit(pid, reason, master)` or
        `patrolling(stats, master)`. A callback that raises is logged, never fatal."""
        if event not in self._callbacks:
            raise ValueError(f"unknown master event {event!r}; known: {', '.join(MASTER_EVENTS)}")
        self._callbacks[event].append(fn)
        return self

    def add_signal(self, signum: int, fn: Callable[..., Any]) -> Master:
        """Run `fn(signum, master)` in the master's control greenlet (never in a raw handler)."""
        self._signal_callbacks.setdefault(signum, []).append(fn)
        return self

    def stop(self, graceful: bool = True) -> None:
        self._intents.put(Intent.STOP)
        if not graceful:
            self._intents.put(Intent.STOP)

    def run(self) -> int:
        """Run until stopped; returns the process exit code. Start errors raise (see cli)."""
        try:
            self._start()
            if self._stops.count == 0:
                self._done.wait()
        finally:
            self._fork.stop(timeout=WORKER_STOP_TIMEOUT)
            self._group.kill(block=False)
        return self._exit_code

    # -- start -------------------------------------------------------------------------------

    def _start(self) -> None:
        settings = self.settings
        set_title(f"speed-gevent: master {settings.name} [{','.join(settings.queues)}]")
        self._install_signals()
        self._spawn("control", self._control_loop)
        self._fork.start()
        self._spawn("fork-reports", self._fork.report_loop)
        if not self._connect():
            return
        self._session.declare(settings.queues, settings.queue_type, settings.passive)
        self._supervisor.start_floor()
        self._spawn("dispatcher", self._dispatcher.loop)
        self._spawn("patrol", self._patrol_loop)
        prefetch = settings.prefetch_per_queue()
        # RUNNING before the first basic_consume: deliveries for the first queue can arrive
        # while the next consume waits for its consume-ok, and they must be kept, not requeued.
        self.state = MasterState.RUNNING
        self._session.start_consuming(prefetch)
        self._last_delivery_at = time.monotonic()
        self._spawn("consumer", self._consume_loop)
        if settings.exit_when_idle:
            self._spawn("idle-watch", self._idle_watch_loop)
        logger.info(
            "master %s (pid %s) consuming %s from %s with %d-%d workers, prefetch %s",
            settings.name,
            os.getpid(),
            ", ".join(settings.queues),
            self._session.masked_url,
            settings.min_workers,
            settings.max_workers,
            "+".join(str(n) for n in prefetch.values()),
        )

    def _connect(self) -> bool:
        """Connect, retrying with backoff; False if a stop came first. BrokerError if refused."""
        return self._session.connect_with_retry(
            lambda: self._stops.count > 0, self._immediate.wait, self.settings.connect_timeout
        )

    def _install_signals(self) -> None:
        for signum, intent in SIGNAL_INTENTS.items():
            gevent.signal_handler(signum, self._on_signal, signum, intent)

    def _on_signal(self, signum: int, intent: Intent) -> None:
        self._intents.put(intent)
        for callback in self._signal_callbacks.get(signum, []):
            self._intents.put(_UserSignal(callback, signum))

    def _spawn(self, name: str, fn: Callable[[], None]) -> None:
        greenlet = self._group.spawn(fn)
        greenlet.name = name
        greenlet.link_exception(self._on_greenlet_crash)

    def _on_greenlet_crash(self, greenlet: gevent.Greenlet) -> None:
        exc = greenlet.exception
        logger.error("greenlet %s crashed", greenlet.name, exc_info=(type(exc), exc, exc.__traceback__))
        self._fatal(f"internal error in {greenlet.name}: {type(exc).__name__}: {exc}")

    # -- consumer side -----------------------------------------------------------------------

    def _consume_loop(self) -> None:
        try:
            self._session.run()
        except ConnectionLost as exc:
            why = mask_secrets(str(exc), self.settings.broker)
            self._fatal(
                f"lost the connection to {self._session.masked_url}: {why}; unacked "
                "messages go back to the broker (reconnecting is not implemented yet)"
            )

    def _on_delivery(self, delivery: Delivery) -> None:
        """Called inside the consumer greenlet's drain: must never block."""
        counters = self.counters
        counters.received += 1
        if counters.first_delivery_at is None:
            counters.first_delivery_at = delivery.received_at
        self._last_delivery_at = delivery.received_at
        if self.state is not MasterState.RUNNING:
            self._settler.give_back(delivery)
            return
        if not self._dispatcher.offer(delivery):
            self._settler.give_back(delivery)

    def _patrol_loop(self) -> None:
        while self.state in (MasterState.STARTING, MasterState.RUNNING):
            gevent.sleep(self.settings.patrol_interval)
            if self.state is not MasterState.RUNNING:
                return
            self._supervisor.patrol_once(time.monotonic())
            self._fire("patrolling", self.stat())

    # -- worker side (PoolEvents) --------------------------------------------------------------

    def _on_spawned(self, worker_id: int, pid: int) -> None:
        self._pool.on_spawned(worker_id, pid)

    def _on_exited(self, pid: int, status: int) -> None:
        self._pool.on_exited(pid, status)

    def on_worker_ready(self, proc: WorkerProc) -> None:
        self.counters.spawned += 1
        self._activity.set()
        if self.state in (MasterState.STARTING, MasterState.RUNNING) and proc.is_idle:
            self._dispatcher.worker_idle(proc)
        else:
            self._pool.stop_worker(proc)

    def on_worker_result(self, proc: WorkerProc, frame: ResultFrame) -> None:
        now = time.monotonic()
        self._supervisor.disarm_timeout(proc)
        failure = failure_from_result(frame.outcome, frame.error_type, frame.error_message, frame.traceback)
        delivery = proc.complete(frame.id, now, failure is not None)
        counters = self.counters
        counters.handled += 1
        counters.last_result_at = now
        counters.per_worker[proc.worker_id] = counters.per_worker.get(proc.worker_id, 0) + 1
        if failure is not None:
            counters.failed += 1
        self._settler.settle(delivery, failure)
        self._supervisor.after_result(proc)
        if proc.state is WorkerState.RETIRING or self.state is MasterState.STOPPING:
            self._pool.stop_worker(proc)
        elif proc.is_idle:
            self._dispatcher.worker_idle(proc)
        self._activity.set()

    def on_worker_exit_request(self, proc: WorkerProc, reason: str) -> None:
        logger.info("worker %s (pid %s) asks to exit (%s)", proc.worker_id, proc.pid, reason)
        if proc.state in (WorkerState.STOPPING, WorkerState.DEAD):
            return
        proc.retire(reason)
        if proc.delivery is None:
            self._pool.stop_worker(proc)

    def on_worker_gone(self, proc: WorkerProc, delivery: Delivery | None, status: int | None) -> None:
        how = describe_exit(status) if status is not None else "died with the fork server"
        if proc.kill_reason:
            how += f" ({proc.kill_reason})"
        planned = proc.stop_sent and delivery is None and status == 0
        logger.log(
            logging.INFO if planned else logging.ERROR,
            "worker %s (pid %s) exited: %s%s%s",
            proc.worker_id,
            proc.pid,
            how,
            f", retired: {proc.retire_reason}" if proc.retire_reason else "",
            f" while handling delivery {delivery.id}" if delivery else "",
        )
        self._fire("worker_exit", proc.pid, proc.retire_reason if planned and proc.retire_reason else how)
        self._activity.set()
        if delivery is not None:
            self._lost_delivery(proc, delivery, how)
        if self.state is not MasterState.RUNNING or not self._supervisor.worker_gone(proc, how):
            return
        self._supervisor.refill()
        self._dispatcher.poke()  # a backlog may need a new worker

    def _lost_delivery(self, proc: WorkerProc, delivery: Delivery, how: str) -> None:
        if self.state is MasterState.STOPPING:
            # Killed by our own stop: not a failed attempt; the message goes straight back.
            self._settler.give_back(delivery)
            return
        self.counters.crashes += 1
        self.counters.failed += 1
        if proc.kill_reason == "timeout":
            failure = Failure(
                FailureKind.TIMEOUT,
                "HandlerTimeout",
                f"the handler ran longer than --timeout {self.settings.timeout:g}s",
                exit_status=how,
            )
        else:
            failure = Failure(
                FailureKind.CRASH,
                "WorkerDied",
                f"the worker {how} while handling the message",
                exit_status=how,
            )
        self._settler.settle(delivery, failure)

    def _on_fork_lost(self, reason: str) -> None:
        if self.state is not MasterState.RUNNING:
            self._fatal(reason)
            return
        now = time.monotonic()
        self._fork_restarts.failed(now, reason)
        self._pool.on_server_lost()
        if self._fork_restarts.tripped(now):
            self._fatal(
                f"{reason}; it keeps dying ({self._fork_restarts.limit} times within "
                f"{self._fork_restarts.window:g}s)"
            )
            return
        logger.error("%s; starting a new one (its workers died with it)", reason)
        self._spawn("fork-restart", self._restart_fork_server)

    def _restart_fork_server(self) -> None:
        self._fork = self._make_fork_client()
        self._pool.use_fork_server(self._fork)
        try:
            self._fork.start()
        except Exception as exc:
            self._fatal(f"could not restart the fork server: {exc}")
            return
        self._spawn("fork-reports", self._fork.report_loop)
        self._supervisor.refill()
        self._dispatcher.poke()

    # -- control ------------------------------------------------------------------------------

    def _control_loop(self) -> None:
        while True:
            intent = self._intents.get()
            if isinstance(intent, _UserSignal):
                intent.run(self)
                continue
            handler = getattr(self, f"handle_{intent.name.lower()}")
            handler()

    def handle_stop(self) -> None:
        kind = self._stops.request()
        if kind is StopKind.GRACEFUL and self.state is MasterState.RUNNING:
            self._spawn("stopper", self._graceful_stop)
        elif self.state is MasterState.STARTING:
            self._immediate.set()
            self._finish("stopped during start", ExitCode.OK)
        else:
            logger.info("second stop request: stopping now")
            self._immediate.set()
            self._activity.set()

    def handle_log_stats(self) -> None:
        logger.info("stats %s", json.dumps(self.stat(), default=str))

    def handle_replace_workers(self) -> None:
        if self.state is MasterState.RUNNING:
            self._supervisor.replace_all()

    def handle_more_workers(self) -> None:
        self._supervisor.resize(+1)
        self._dispatcher.poke()

    def handle_fewer_workers(self) -> None:
        self._supervisor.resize(-1)

    def _idle_watch_loop(self) -> None:
        limit = self.settings.exit_when_idle
        assert limit
        while self.state is MasterState.RUNNING:
            gevent.sleep(min(1.0, limit / 4))
            quiet = time.monotonic() - self._last_delivery_at
            if quiet >= limit and not self._cache and not self._busy():
                logger.info("no message for %.1fs (--exit-when-idle): stopping", quiet)
                self._intents.put(Intent.STOP)
                return

    # -- stopping -------------------------------------------------------------------------------

    def _busy(self) -> list[WorkerProc]:
        return [proc for proc in self._pool.live() if proc.delivery is not None]

    def _wait_until(self, done: Callable[[], bool], deadline: float) -> bool:
        """Wait for `done()` until `deadline` or an immediate stop; True if it came true."""
        while not done():
            left = deadline - time.monotonic()
            if left <= 0 or self._immediate.is_set():
                return False
            self._activity.clear()
            if not done():
                self._activity.wait(min(left, 0.5))
        return True

    def _graceful_stop(self) -> None:
        self.state = MasterState.DRAINING
        logger.info(
            "stopping: cancelling consumers, returning %d cached messages, giving %d "
            "in-flight handlers up to %.0fs",
            len(self._cache),
            len(self._busy()),
            self.settings.graceful_timeout,
        )
        cancelled = gevent.event.Event()
        self._session.cancel(cancelled.set)
        gevent.wait([cancelled, self._immediate], count=1, timeout=WORKER_STOP_TIMEOUT)
        for delivery in self._cache.drain():
            self._settler.give_back(delivery)
        self._wait_until(lambda: not self._busy(), time.monotonic() + self.settings.graceful_timeout)
        how = "immediate" if self._immediate.is_set() else "graceful"
        self._stop_workers()
        self._session.close(timeout=1.0 if self._immediate.is_set() else WORKER_STOP_TIMEOUT)
        self._session.closed.wait(WORKER_STOP_TIMEOUT + 1)
        self._wait_until(lambda: not self._pool.live(), time.monotonic() + WORKER_STOP_TIMEOUT)
        self._finish(how, ExitCode.OK)

    def _stop_workers(self) -> None:
        self.state = MasterState.STOPPING
        for proc in self._pool.live():
            if proc.delivery is not None or proc.state is WorkerState.BOOTING:
                self._pool.kill(proc)
            else:
                self._pool.stop_worker(proc)

    def _fatal(self, reason: str) -> None:
        if self.state in (MasterState.STOPPING, MasterState.STOPPED):
            return
        logger.error("fatal: %s", reason)
        self._fire("error", FatalError(reason))
        self.state = MasterState.STOPPING
        for proc in self._pool.live():
            self._pool.kill(proc)
        self._session.abort()
        self._finish("fatal error", ExitCode.FATAL)

    def _finish(self, how: str, code: ExitCode) -> None:
        self.state = MasterState.STOPPED
        self._fork.stop(timeout=WORKER_STOP_TIMEOUT)
        logger.info("%s", summary_line(self.counters, time.monotonic() - self._started_at, how))
        self._exit_code = code
        self._done.set()

    # -- events and stats -------------------------------------------------------------------------

    def _fire(self, event: str, *args: Any) -> None:
        for callback in self._callbacks[event]:
            try:
                callback(*args, self)
            except Exception:
                logger.exception("master event %r callback %r raised", event, callback)

    def stat(self) -> dict[str, Any]:
        """A snapshot for USR1, the `patrolling` event and monitoring (no secrets in it)."""
        now = time.monotonic()
        return {
            "pid": os.getpid(),
            "name": self.name,
            "state": self.state.value,
            "uptime": round(now - self._started_at, 3),
            "broker": self._session.masked_url,
            "connected": self._session.connected,
            "queues": list(self.settings.queues),
            "cache": {"size": len(self._cache), "capacity": self._cache.capacity},
            "pool": self._supervisor.snapshot(),
            "workers": [_worker_stat(proc, now) for proc in self._pool.live()],
            "totals": {
                k: v
                for k, v in self.counters.as_dict().items()
                if k not in ("per_worker", "first_delivery_at", "last_result_at")
            },
        }


def _worker_stat(proc: WorkerProc, now: float) -> dict[str, Any]:
    return {
        "id": proc.worker_id,
        "pid": proc.pid,
        "state": proc.state.value,
        "handled": proc.handled,
        "failed": proc.failed,
        "memory_bytes": proc.memory_bytes,
        "message_age": round(now - proc.busy_since, 3) if proc.busy_since is not None else None,
        "idle_seconds": round(now - proc.last_busy_at, 3) if proc.delivery is None else 0.0,
    }


class _UserSignal:
    """A user's master signal handler, queued so it runs in the control greenlet."""

    def __init__(self, callback: Callable[..., Any], signum: int) -> None:
        self.callback = callback
        self.signum = signum

    def run(self, master: Master) -> None:
        try:
            self.callback(self.signum, master)
        except Exception:
            logger.exception("master signal handler %r raised", self.callback)
