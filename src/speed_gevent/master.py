"""`Master`: the gevent master process. It reads as the script of its lifecycle:
start the fork server, connect, declare, prefork the pool, consume; on a stop signal,
drain gracefully (or immediately on the second); on a fatal error, stop and exit 1.

Greenlets (one Group, each linked so a crash is fatal, never silent): consumer (the only
one that touches the AMQP connection), dispatcher (cache → idle workers), fork-reports,
one reader per worker, control (acts on signal intents), and idle-watch. Worker results
become acks, retries or dead letters through the pure `policy` module.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import time
from collections import deque
from collections.abc import Callable
from enum import Enum
from typing import Any

import gevent
import gevent.event
import gevent.queue
from gevent.pool import Group

from .broker import BrokerSession, ConnectionLost
from .cache import CacheFull, MessageCache
from .config import Settings
from .delivery import Delivery
from .errors import BrokerError, ExitCode, FatalError, WorkerExit
from .forkclient import ForkClient
from .osproc import set_title
from .policy import (
    Action,
    Decision,
    Failure,
    FailureKind,
    dead_letter_headers,
    dead_letter_queue,
    decide,
    describe_exit,
    failure_from_result,
    retry_headers,
)
from .pool import Pool, PoolEvents
from .protocol import ResultFrame
from .signals import SIGNAL_INTENTS, Intent, StopKind, StopRequests
from .stats import Counters, summary_line
from .urls import mask_secrets
from .workerproc import WorkerProc, WorkerState

logger = logging.getLogger(__name__)

#: Longest wait between connection attempts at start, in seconds.
MAX_CONNECT_BACKOFF = 30.0
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
        self._idle: deque[WorkerProc] = deque()
        self._dispatch_wake = gevent.event.Event()
        self._activity = gevent.event.Event()
        self._immediate = gevent.event.Event()
        self._intents: gevent.queue.Queue[Intent] = gevent.queue.Queue()
        self._stops = StopRequests()
        self._done = gevent.event.Event()
        self._exit_code = ExitCode.OK
        self._started_at = time.monotonic()
        self._last_delivery_at = self._started_at
        self._callbacks: dict[str, list[Callable[..., Any]]] = {name: [] for name in MASTER_EVENTS}
        self._signal_callbacks: dict[int, list[Callable[..., Any]]] = {}
        self._fork = ForkClient(
            settings.target, settings.name, settings.log_level, settings.log_format,
            on_spawned=self._on_spawned, on_exited=self._on_exited, on_lost=self._fatal,
        )  # fmt: skip
        self._pool = Pool(self._fork, self._group, self)
        self._session = BrokerSession(
            settings.broker, settings.heartbeat, self._on_delivery, settings.connect_timeout
        )

    # -- public API -------------------------------------------------------------------------

    def on(self, event: str, fn: Callable[..., Any]) -> Master:
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
        for _ in range(settings.max_workers):
            self._pool.spawn()
        self._spawn("dispatcher", self._dispatch_loop)
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
            "master %s (pid %s) consuming %s from %s with %d workers, prefetch %s",
            settings.name,
            os.getpid(),
            ", ".join(settings.queues),
            self._session.masked_url,
            settings.max_workers,
            "+".join(str(n) for n in prefetch.values()),
        )

    def _connect(self) -> bool:
        """Connect, retrying with backoff; False if a stop came first. BrokerError if refused."""
        delay = 1.0
        timeout = self.settings.connect_timeout
        give_up = time.monotonic() + timeout if timeout else None
        while self._stops.count == 0:
            try:
                self._session.connect()
                return True
            except BrokerError:
                raise
            except Exception as exc:
                if self._stops.count:
                    break
                why = mask_secrets(f"{type(exc).__name__}: {exc}", self.settings.broker)
                if give_up is not None and time.monotonic() + delay > give_up:
                    raise BrokerError(
                        f"cannot reach the broker {self._session.masked_url} within {timeout:g}s: {why}"
                    ) from None
                logger.warning(
                    "cannot reach the broker %s: %s; retrying in %.0fs", self._session.masked_url, why, delay
                )
                self._immediate.wait(delay)
                delay = min(delay * 2, MAX_CONNECT_BACKOFF)
        return False

    def _install_signals(self) -> None:
        for signum, intent in SIGNAL_INTENTS.items():
            gevent.signal_handler(signum, self._on_signal, signum, intent)

    def _on_signal(self, signum: int, intent: Intent) -> None:
        self._intents.put(intent)
        for callback in self._signal_callbacks.get(signum, []):
            self._intents.put(_UserSignal(callback, signum))  # type: ignore[arg-type]

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
            self._session.reject(delivery, requeue=True)
            counters.requeued += 1
            return
        try:
            self._cache.put(delivery)
        except CacheFull as exc:
            logger.error("%s; giving it back to the broker", exc)
            self._session.reject(delivery, requeue=True)
            counters.requeued += 1
            return
        self._dispatch_wake.set()

    def _dispatch_loop(self) -> None:
        cache, idle, pool = self._cache, self._idle, self._pool
        while True:
            self._dispatch_wake.wait()
            self._dispatch_wake.clear()
            while cache and idle and self.state is MasterState.RUNNING:
                proc = idle.popleft()
                if not proc.is_idle:
                    continue  # retired or gone since it was queued
                delivery = cache.take()
                assert delivery is not None
                if not pool.send_message(proc, delivery):
                    cache.put_front(delivery)

    # -- worker side (PoolEvents) --------------------------------------------------------------

    def _on_spawned(self, worker_id: int, pid: int) -> None:
        self._pool.on_spawned(worker_id, pid)

    def _on_exited(self, pid: int, status: int) -> None:
        self._pool.on_exited(pid, status)

    def on_worker_ready(self, proc: WorkerProc) -> None:
        self.counters.spawned += 1
        if self.state in (MasterState.STARTING, MasterState.RUNNING):
            self._idle.append(proc)
            self._dispatch_wake.set()
        else:
            self._pool.stop_worker(proc)

    def on_worker_result(self, proc: WorkerProc, frame: ResultFrame) -> None:
        now = time.monotonic()
        failure = failure_from_result(frame.outcome, frame.error_type, frame.error_message, frame.traceback)
        delivery = proc.complete(frame.id, now, failure is not None)
        counters = self.counters
        counters.handled += 1
        counters.last_result_at = now
        counters.per_worker[proc.worker_id] = counters.per_worker.get(proc.worker_id, 0) + 1
        if failure is not None:
            counters.failed += 1
        self._settle(delivery, decide(failure, delivery.attempt, self.settings.max_retries))
        if proc.state is WorkerState.RETIRING or self.state is MasterState.STOPPING:
            self._pool.stop_worker(proc)
        elif proc.is_idle:
            self._idle.append(proc)
            self._dispatch_wake.set()
        self._activity.set()

    def on_worker_exit_request(self, proc: WorkerProc, reason: str) -> None:
        logger.info("worker %s (pid %s) asks to exit (%s)", proc.worker_id, proc.pid, reason)
        if proc.state in (WorkerState.STOPPING, WorkerState.DEAD):
            return
        proc.retire()
        if proc.delivery is None:
            self._pool.stop_worker(proc)

    def on_worker_gone(self, proc: WorkerProc, delivery: Delivery | None, status: int | None) -> None:
        how = describe_exit(status) if status is not None else "lost"
        level = logging.INFO if proc.state is WorkerState.STOPPING or status == 0 else logging.ERROR
        level = logging.ERROR if delivery is not None else level
        logger.log(
            level,
            "worker %s (pid %s) exited: %s%s",
            proc.worker_id,
            proc.pid,
            how,
            f" while handling delivery {delivery.id}" if delivery else "",
        )
        self._fire("worker_exit", proc.pid, how)
        self._activity.set()
        if delivery is not None:
            self._lost_delivery(delivery, how)
        if self.state is not MasterState.RUNNING:
            return
        if status is not None and os.WIFEXITED(status) and os.WEXITSTATUS(status) == WorkerExit.BOOT_FAILED:
            self._fatal(
                f"worker {proc.worker_id} could not boot ({how}): its start event raised (see the log above)"
            )
            return
        while len(self._pool) < self.settings.max_workers:
            self._pool.spawn()

    def _lost_delivery(self, delivery: Delivery, how: str) -> None:
        if self.state is MasterState.STOPPING:
            # Killed by our own stop: not a failed attempt; the message goes straight back.
            self._session.reject(delivery, requeue=True)
            self.counters.requeued += 1
            return
        self.counters.crashes += 1
        self.counters.failed += 1
        failure = Failure(
            FailureKind.CRASH, "WorkerDied", f"the worker {how} while handling the message", exit_status=how
        )
        self._settle(delivery, decide(failure, delivery.attempt, self.settings.max_retries))

    # -- settling deliveries -------------------------------------------------------------------

    def _settle(self, delivery: Delivery, decision: Decision) -> None:
        if decision.action is Action.ACK:
            self._session.ack(delivery)
            self.counters.acked += 1
            return
        failure = decision.failure
        assert failure is not None
        properties = dict(delivery.properties)
        properties.setdefault("delivery_mode", 2)
        if decision.action is Action.RETRY:
            target = delivery.queue
            properties["application_headers"] = retry_headers(delivery.headers, delivery.attempt)
        else:
            target = dead_letter_queue(delivery.queue)
            properties["application_headers"] = dead_letter_headers(
                delivery.headers,
                failure,
                delivery.attempt,
                delivery.queue,
                delivery.exchange,
                delivery.routing_key,
                dt.datetime.now(dt.UTC),
            )
        self._session.publish(
            target,
            delivery.body,
            properties,
            lambda ok, why: self._on_republished(delivery, decision, target, ok, why),
        )

    def _on_republished(
        self, delivery: Delivery, decision: Decision, target: str, ok: bool, why: str
    ) -> None:
        failure = decision.failure
        assert failure is not None
        if not ok:
            logger.error(
                "could not republish delivery %s to %r (%s); the original goes back to %r",
                delivery.id,
                target,
                why,
                delivery.queue,
            )
            self._session.reject(delivery, requeue=True)
            self.counters.requeued += 1
            return
        self._session.ack(delivery)
        self.counters.acked += 1
        if decision.action is Action.RETRY:
            self.counters.retried += 1
            logger.warning(
                "delivery %s from %r failed attempt %d (%s: %s); retrying",
                delivery.id,
                delivery.queue,
                delivery.attempt,
                failure.error_type,
                failure.message,
            )
        else:
            self.counters.dead_lettered += 1
            logger.warning(
                "delivery %s from %r dead-lettered to %r after attempt %d: %s: %s",
                delivery.id,
                delivery.queue,
                target,
                delivery.attempt,
                failure.error_type,
                failure.message,
            )

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

    def _not_yet(self) -> None:
        logger.warning("this signal is not supported by this version yet; ignored")

    handle_replace_workers = handle_more_workers = handle_fewer_workers = _not_yet

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
        busy = len(self._busy())
        logger.info(
            "stopping: cancelling consumers, returning %d cached messages, giving %d "
            "in-flight handlers up to %.0fs",
            len(self._cache),
            busy,
            self.settings.graceful_timeout,
        )
        cancelled = gevent.event.Event()
        self._session.cancel(cancelled.set)
        gevent.wait([cancelled, self._immediate], count=1, timeout=WORKER_STOP_TIMEOUT)
        for delivery in self._cache.drain():
            self._session.reject(delivery, requeue=True)
            self.counters.requeued += 1
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
            "workers": [
                {
                    "id": p.worker_id,
                    "pid": p.pid,
                    "state": p.state.value,
                    "handled": p.handled,
                    "failed": p.failed,
                    "busy_for": round(now - p.busy_since, 3) if p.busy_since is not None else None,
                }
                for p in self._pool.live()
            ],
            "totals": {k: v for k, v in self.counters.as_dict().items() if k != "per_worker"},
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
