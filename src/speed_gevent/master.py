"""`Master`: the gevent master process, as the script of its lifecycle.

Start the fork server, connect, declare, start the router (which preforks the floor),
consume; on a stop signal the router drains and says when it is done; on a fatal error,
stop and exit 1. Every decision about a message or a worker is the `Router`'s: the
master turns sockets, timers and signals into router events and carries out the actions
it returns (`_apply`), none of which ever yields, so the order the router chose is the
order things happen in.

Greenlets (each linked: one that dies unexpectedly stops the master with exit 1 and one
line): control (acts on signal intents, runs user callbacks), fork-reports, spawner,
consumer (the only one that touches the AMQP connection), timer (the router's one
timer), patrol, and per worker a reader and, while a write waits, a writer.
"""

from __future__ import annotations

import gc
import json
import logging
import os
import random
import time
from collections import deque
from collections.abc import Callable
from functools import partial
from typing import Any

import gevent
import gevent.event
import gevent.queue
from gevent.pool import Group

from . import actions as act
from . import earlystop
from .backoff import ladder
from .broker import BrokerSession, ConnectionLost
from .config import Settings, load_settings
from .delivery import Delivery
from .errors import BrokerError, ConfigError, ExitCode, FatalError, QueueMissingError
from .forkclient import ForkClient
from .links import WorkerLinks
from .osproc import release_free_memory, sample_memory, set_title
from .patrol import SpawnGuard
from .policy import failure_from_result
from .protocol import OkFrame, ResultFrame
from .router import Phase, Router, RouterSettings
from .signals import SIGNAL_INTENTS, Intent, uncatchable
from .stats import summary_line
from .urls import mask_secrets

logger = logging.getLogger(__name__)

#: Seconds the fork server and the connection get to close at the end.
CLOSE_TIMEOUT = 5.0
#: Longest wait for the --min-workers floor to boot before consuming starts anyway.
FLOOR_BOOT_WAIT = 10.0
#: Longest pause between recoveries that each broke again before consuming resumed.
MAX_RECOVERY_PAUSE = 30.0
#: Seconds a recovered connection must run before the next outage starts the pauses afresh.
RECOVERY_HOLDS = 10.0

MASTER_EVENTS = ("error", "worker_exit", "patrolling")


class Master:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.name = settings.name
        self._started_at = time.monotonic()
        self._router = Router(RouterSettings.of(settings), self._started_at)
        self._group = Group()
        self._intents: gevent.queue.Queue[Any] = gevent.queue.Queue()
        self._pending: deque[act.Action] = deque()
        self._applying = False
        self._timer_at: float | None = None
        self._timer_moved = gevent.event.Event()
        self._stop_asked = gevent.event.Event()
        self._floor_ready = gevent.event.Event()
        self._done = gevent.event.Event()
        self._finishing = False
        self._failing = False
        self._started = False
        self._drained_early: str | None = None  # a Drained that came while _start ran
        self._consume_sent = False  # _start queued the first basic_consume
        self._exit_code = ExitCode.OK
        self._callbacks: dict[str, list[Callable[..., Any]]] = {name: [] for name in MASTER_EVENTS}
        self._signal_callbacks: dict[int, list[Callable[..., Any]]] = {}
        self._signals_installed = False
        self._fork_restarts = SpawnGuard(limit=3, window=60.0)
        self._http: Any = None
        self._fork = self._make_fork_client()
        self._links = WorkerLinks(self._fork, self._spawn, _LinkEvents(self))
        self._session = BrokerSession(
            settings.broker,
            settings.heartbeat,
            self._on_delivery,
            settings.connect_timeout,
            take_acks=self._router.take_acks,
            retry_steps=ladder(settings.retry_delay, settings.retry_delay_max),
            dead_letter=settings.dead_letter_queue,
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
            on_spawned=lambda wid, pid: self._links.on_spawned(wid, pid),
            on_exited=lambda pid, status: self._links.on_exited(pid, status),
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
        """Run `fn(signum, master)` in the master's control greenlet (never in a raw handler)
        on any signal the master can catch; a built-in one keeps its own meaning too.
        SIGKILL and SIGSTOP cannot be caught, and SIGCHLD belongs to gevent's child watcher."""
        why = uncatchable(signum)
        if why:
            raise ValueError(f"add_signal: {why}")
        first = signum not in self._signal_callbacks
        self._signal_callbacks.setdefault(signum, []).append(fn)
        if first and self._signals_installed and signum not in SIGNAL_INTENTS:
            gevent.signal_handler(signum, self._on_signal, signum, None)
        return self

    def stop(self, graceful: bool = True) -> None:
        self._intents.put(Intent.STOP)
        if not graceful:
            self._intents.put(Intent.STOP)

    def run(self) -> int:
        """Run until stopped; returns the process exit code. Start errors raise (see cli)."""
        try:
            self._start()
            self._started = True
            if self._drained_early is not None:
                self._close(self._drained_early)  # the router drained before start was over
            self._done.wait()
        finally:
            self._fork.stop(timeout=CLOSE_TIMEOUT)
            self._group.kill(block=False)
            if self._http is not None:
                self._http.stop(timeout=1)
        return self._exit_code

    # -- start -------------------------------------------------------------------------------

    def _start(self) -> None:
        settings = self.settings
        set_title(f"speed-gevent: master {settings.name} [{','.join(settings.queues)}]")
        self._install_signals()
        self._serve_http()
        self._spawn("control", self._control_loop)
        self._fork.start()
        self._spawn("fork-reports", self._fork.report_loop)
        self._spawn("spawner", self._links.spawner_loop)
        declare = partial(self._session.declare, settings.queues, settings.queue_type, settings.passive)
        connected = self._session.connect_with_retry(
            self._stop_asked.is_set, self._stop_asked.wait, settings.connect_timeout, then=declare
        )
        if not connected or self._done.is_set():
            return
        if self._stop_asked.is_set():
            return  # stopped while declaring
        self._apply(self._router.channel_opened(self._session.generation))
        self._apply(self._router.start(time.monotonic()))
        self._spawn("timer", self._timer_loop)
        self._spawn("patrol", self._patrol_loop)
        # The consumer greenlet runs from here on, so heartbeats flow while the floor boots.
        self._spawn("consumer", self._consume_loop)
        # The floor boots before the first basic_consume, so no delivery waits unacked for
        # a worker that is still forking (bounded: a slow `start` event delays nothing long).
        if settings.min_workers == 0:
            self._floor_ready.set()
        gevent.wait([self._floor_ready, self._stop_asked], count=1, timeout=FLOOR_BOOT_WAIT)
        if self._stop_asked.is_set():
            return
        prefetch = settings.prefetch_per_queue()
        # The router runs before the first basic_consume: deliveries for the first queue
        # can arrive while the next consume waits for its consume-ok, and they are kept.
        self._consume_sent = True
        self._session.consume(prefetch, lambda: self._consuming(prefetch))

    def _serve_http(self) -> None:
        """--http: answers from the start, so /livez is 200 while the broker is still away."""
        if self.settings.http is None:
            return
        from .httpserver import StatusApp, serve

        host, port = self.settings.http
        try:
            self._http = serve((host, port), StatusApp(self.stat, self.ready))
        except OSError as exc:
            why = os.strerror(exc.errno) if exc.errno else str(exc)
            raise ConfigError(f"--http: cannot listen on {host}:{port}: {why}") from None
        logger.info("serving /livez, /readyz, /stats and /metrics on http://%s:%d", host, port)

    def ready(self) -> tuple[bool, str]:
        """For /readyz: connected and consuming; else why not."""
        router = self._router
        if router.phase is not Phase.RUNNING:
            return False, router.phase.value
        if not self._session.connected:
            return False, "broker not connected"
        if not router.is_consuming:
            return False, "not consuming"
        return True, "consuming"

    def _consuming(self, prefetch: dict[str, int]) -> None:
        """Every consume-ok is in (called in the consumer greenlet; never yields)."""
        settings = self.settings
        self._apply(self._router.consuming(time.monotonic()))
        # What start built lives as long as the master: out of the collector's way, a
        # full collection (7 ms over the imports' objects here) no longer stalls messages.
        gc.collect()
        gc.freeze()
        release_free_memory()
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

    def _install_signals(self) -> None:
        for signum, intent in SIGNAL_INTENTS.items():
            gevent.signal_handler(signum, self._on_signal, signum, intent)
        for signum in self._signal_callbacks.keys() - SIGNAL_INTENTS.keys():
            gevent.signal_handler(signum, self._on_signal, signum, None)
        self._signals_installed = True
        for signum in earlystop.received():  # a stop while the master was being built
            self._on_signal(signum, SIGNAL_INTENTS[signum])

    def _on_signal(self, signum: int, intent: Intent | None) -> None:
        if intent is not None:
            self._intents.put(intent)
        for callback in self._signal_callbacks.get(signum, []):
            self._intents.put(_Call(callback, (signum, self), "master signal handler"))

    def _spawn(self, name: str, fn: Callable[..., None], *args: Any) -> gevent.Greenlet:
        greenlet = self._group.spawn(fn, *args)
        greenlet.name = name
        greenlet.link_exception(self._on_greenlet_crash)
        return greenlet

    def _on_greenlet_crash(self, greenlet: gevent.Greenlet) -> None:
        exc = greenlet.exception
        logger.error("greenlet %s crashed", greenlet.name, exc_info=(type(exc), exc, exc.__traceback__))
        self._fatal(f"internal error in {greenlet.name}: {type(exc).__name__}: {exc}")

    # -- carrying out the router's actions ----------------------------------------------------

    def _apply(self, actions: list[act.Action]) -> None:
        """Carry out actions in order. Nothing here yields; an action that leads to another
        router event (a failed write) queues that event's actions behind the current ones."""
        self._pending.extend(actions)
        if self._applying:
            return
        self._applying = True
        try:
            while self._pending:
                while self._pending:
                    self._do(self._pending.popleft())
                self._links.flush()  # one write per worker; a failed one queues more actions
        finally:
            self._applying = False

    def _do(self, action: act.Action) -> None:  # noqa: C901 - one branch per action type
        if isinstance(action, act.SendMessage):
            self._links.send_message(action.worker_id, action.delivery)
        elif isinstance(action, act.AcksReady):
            if action.urgent:
                self._session.wake()
            else:
                self._session.wake_soon()
        elif isinstance(action, act.Spawn):
            self._links.spawn(action.worker_id)
        elif isinstance(action, act.StopWorker):
            self._links.send_stop(action.worker_id)
        elif isinstance(action, act.KillWorker):
            self._links.kill(action.worker_id)
        elif isinstance(action, act.TermWorker):
            self._links.term(action.worker_id)
        elif isinstance(action, act.Reject):
            self._session.reject(action.delivery, requeue=action.requeue)
        elif isinstance(action, act.Publish):
            self._session.publish(
                action.routing_key, action.body, action.properties, self._confirm_handler(action.publish_id)
            )
        elif isinstance(action, act.SetTimer):
            self._timer_at = action.at
            self._timer_moved.set()
        elif isinstance(action, act.CancelConsumers | act.PauseConsuming):
            self._session.cancel(lambda: None)
        elif isinstance(action, act.ResumeConsuming):
            self._session.consume(self.settings.prefetch_per_queue(), lambda: None, again=True)
        elif isinstance(action, act.WorkerExited):
            self._intents.put(_Call(self._fire, ("worker_exit", action.pid, action.reason), "worker_exit"))
        elif isinstance(action, act.Drained):
            if self._started:
                self._spawn("closer", self._close, action.how)
            else:  # _start is still running: it stops at the next step, and run() closes up
                self._drained_early = action.how
                self._stop_asked.set()
        elif isinstance(action, act.Fatal):
            self._fatal(action.reason)

    def _confirm_handler(self, publish_id: int) -> Callable[[bool, str], None]:
        return lambda ok, why: self._apply(self._router.publish_done(publish_id, ok, why, time.monotonic()))

    # -- greenlets -----------------------------------------------------------------------------

    def _on_delivery(self, delivery: Delivery) -> None:
        """Called inside the consumer greenlet's drain: must never block."""
        self._apply(self._router.delivery_arrived(delivery, delivery.received_at))

    def _consume_loop(self) -> None:
        """The consumer greenlet: run the session; after an outage, recover and run again.
        Workers keep running through it; what was unacked comes back from the broker, and
        results for it are never acked on the new channel (the router's generations)."""
        with self._session.owned():
            self._consume_and_recover()

    def _consume_and_recover(self) -> None:
        lost: ConnectionLost | None = None
        failures = 0  # outages in a row that came before the last recovery held a while
        while True:
            try:
                if lost is not None:
                    if failures > 1:  # it keeps breaking: back off before trying again
                        pause = min(MAX_RECOVERY_PAUSE, 2.0 ** (failures - 2))
                        if self._stop_asked.wait(pause * random.uniform(0.75, 1.25)):
                            return
                    if not self._recover(lost):
                        return
                lost = None
                began = time.monotonic()
                self._session.run()
                return
            except ConnectionLost as exc:
                # Whatever comes next, the router learns at once that the channel is gone:
                # its republishes will never be confirmed, its deliveries come back.
                self._apply(self._router.channel_lost(time.monotonic()))
                self._session.forget_channel()
                if self._stop_asked.is_set() or self._failing or self._router.phase is not Phase.RUNNING:
                    self._session.abort()  # a close waiting on it ends now, not at its timeout
                    return  # stopping anyway: what was unacked is the broker's again
                held = lost is None and time.monotonic() - began >= RECOVERY_HOLDS
                failures = 1 if held else failures + 1
                lost = exc
            except (BrokerError, ConfigError, QueueMissingError) as exc:
                self._fatal(mask_secrets(str(exc), self.settings.broker))
                return

    def _recover(self, lost: ConnectionLost) -> bool:
        """Reconnect (or reopen the channel), declare, consume again. Runs in the consumer
        greenlet outside `session.run()`, so py-amqp's synchronous waits here re-enter
        nothing. False if a stop came first; ConnectionLost if it broke again meanwhile."""
        settings = self.settings
        what = "channel" if lost.channel_only else "connection"
        logger.warning(
            "lost the %s to %s: %s; recovering (workers keep running, unacked messages come back "
            "from the broker)", what, self._session.masked_url, mask_secrets(str(lost), settings.broker),
        )  # fmt: skip
        if not self._session.recover(lost, self._stop_asked.is_set, self._stop_asked.wait):
            return False
        # Before `_start` sent the first basic_consume (the floor still boots), it sends it.
        running = self._router.phase is Phase.RUNNING and self._consume_sent
        prefetch = settings.prefetch_per_queue() if running else {}
        opened = lambda: self._apply(self._router.channel_opened(self._session.generation))  # noqa: E731
        self._session.resume(settings.queues, settings.queue_type, settings.passive, prefetch, opened)
        if running:
            self._apply(self._router.consuming(time.monotonic()))
            logger.info("recovered the %s to %s: consuming %s again", what, self._session.masked_url,
                        ", ".join(settings.queues))  # fmt: skip
        return True

    def _timer_loop(self) -> None:
        """The router's one timer: sleep until the time it asked for, then `tick`."""
        while True:
            self._timer_moved.clear()
            at = self._timer_at
            delay = None if at is None else at - time.monotonic()
            if delay is None or delay > 0:
                self._timer_moved.wait(delay)
                continue
            self._timer_at = None
            self._apply(self._router.tick(time.monotonic()))
            gevent.sleep(0)  # even a timer set in the past never starves the other greenlets

    def _patrol_loop(self) -> None:
        while True:
            gevent.sleep(self.settings.patrol_interval)
            if self._router.phase is not Phase.RUNNING:
                return
            self._links.reap_missing()
            memory: dict[int, int] = {}
            if self.settings.max_worker_memory:
                pids = self._links.pids()
                sizes = sample_memory(pids.values())
                memory = {wid: sizes[pid] for wid, pid in pids.items() if pid in sizes}
            self._apply(self._router.patrol(time.monotonic(), memory))
            self._fire("patrolling", self.stat())

    def _control_loop(self) -> None:
        while True:
            intent = self._intents.get()
            if isinstance(intent, _Call):
                intent.run()
                continue
            now = time.monotonic()
            if intent is Intent.STOP:
                self._stop_asked.set()
                self._apply(self._router.stop(now))
            elif intent is Intent.LOG_STATS:
                logger.info("stats %s", json.dumps(self.stat(), default=str))
            elif intent is Intent.REPLACE_WORKERS:
                self._apply(self._router.replace_all(now))
            elif intent is Intent.MORE_WORKERS:
                self._apply(self._router.resize(+1, now))
            elif intent is Intent.FEWER_WORKERS:
                self._apply(self._router.resize(-1, now))

    # -- the fork server -----------------------------------------------------------------------

    def _on_fork_lost(self, reason: str) -> None:
        if self._router.phase is not Phase.RUNNING:
            self._links.on_server_lost()
            if self._router.phase is Phase.STARTING:
                self._fatal(reason)
            return
        now = time.monotonic()
        self._fork_restarts.failed(now, reason)
        self._links.on_server_lost()
        if self._fork_restarts.tripped(now):
            limit, window = self._fork_restarts.limit, self._fork_restarts.window
            self._fatal(f"{reason}; it keeps dying ({limit} times within {window:g}s)")
            return
        logger.error("%s; starting a new one (its workers died with it)", reason)
        self._spawn("fork-restart", self._restart_fork_server)

    def _restart_fork_server(self) -> None:
        self._fork = self._make_fork_client()
        self._links.use_fork_server(self._fork)
        try:
            self._fork.start()
        except Exception as exc:
            self._fatal(f"could not restart the fork server: {exc}")
            return
        self._spawn("fork-reports", self._fork.report_loop)
        self._apply(self._router.fork_server_ready(time.monotonic()))

    # -- stopping -------------------------------------------------------------------------------

    def _close(self, how: str) -> None:
        """The router drained: flush what is queued for the broker, close, finish."""
        if self._session.connected:
            self._session.close(timeout=1.0 if how == "immediate" else CLOSE_TIMEOUT)
            self._session.closed.wait(CLOSE_TIMEOUT + 1)
        else:
            self._session.abort()
        self._finish(how, ExitCode.OK)

    def _fatal(self, reason: str) -> None:
        """Stop everything at once: drop the connection (nothing more is acked), kill the
        workers; the user's `error` callbacks run afterwards in their own greenlet, since
        they may yield and this may run inside `_apply` or in a hub callback."""
        if self._finishing or self._failing:
            return
        self._failing = True
        logger.error("fatal: %s", reason)
        self._session.abort()
        for wid in list(self._links.pids()):
            self._links.kill(wid)
        self._spawn("fatal", self._fatal_end, reason)

    def _fatal_end(self, reason: str) -> None:
        self._fire("error", FatalError(reason))
        self._finish("fatal error", ExitCode.FATAL)

    def _finish(self, how: str, code: ExitCode) -> None:
        if self._finishing or (self._failing and code is ExitCode.OK):
            return  # a fatal error finishes with its own exit code
        self._finishing = True
        self._fork.stop(timeout=CLOSE_TIMEOUT)
        logger.info("%s", summary_line(self._router.counters, time.monotonic() - self._started_at, how))
        self._exit_code = code
        self._done.set()
        self._stop_asked.set()

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
        router = self._router
        return {
            "pid": os.getpid(),
            "name": self.name,
            "state": router.phase.value,
            "uptime": round(now - self._started_at, 3),
            "broker": self._session.masked_url,
            "connected": self._session.connected,
            "recoveries": max(0, self._session.generation - 1),
            "unsettled": router.unsettled,
            "queues": list(self.settings.queues),
            **router.snapshot(now),
            "totals": {
                k: v
                for k, v in router.counters.as_dict().items()
                if k not in ("per_worker", "first_delivery_at", "last_result_at")
            },
        }


class _LinkEvents:
    """What the worker links report, turned into router events."""

    def __init__(self, master: Master) -> None:
        self._apply = master._apply
        self._router = master._router
        self._floor_ready = master._floor_ready
        self._min_workers = master.settings.min_workers

    def spawn_failed(self, worker_id: int) -> None:
        self._apply(self._router.spawn_failed(worker_id, time.monotonic()))

    def spawned(self, worker_id: int, pid: int) -> None:
        self._apply(self._router.worker_spawned(worker_id, pid))

    def ready(self, worker_id: int) -> None:
        self._apply(self._router.worker_ready(worker_id, time.monotonic()))
        if not self._floor_ready.is_set() and self._router.booted() >= self._min_workers:
            self._floor_ready.set()

    def ok(self, worker_id: int, frame: OkFrame) -> None:
        now = time.monotonic()
        self._apply(
            self._router.worker_result(worker_id, frame.id, None, now, frame.started_at, frame.finished_at)
        )

    def result(self, worker_id: int, frame: ResultFrame) -> None:
        failure = failure_from_result(
            frame.outcome, frame.error_type, frame.error_message, frame.traceback, frame.retry_delay
        )
        now = time.monotonic()
        self._apply(
            self._router.worker_result(worker_id, frame.id, failure, now, frame.started_at, frame.finished_at)
        )

    def exit_request(self, worker_id: int, reason: str) -> None:
        self._apply(self._router.exit_requested(worker_id, reason, time.monotonic()))

    def broken(self, worker_id: int, why: str) -> None:
        self._apply(self._router.worker_broken(worker_id, why, time.monotonic()))

    def write_failed(self, worker_id: int, undelivered: list[int]) -> None:
        self._apply(self._router.write_failed(worker_id, undelivered, time.monotonic()))

    def gone(self, worker_id: int, status: int | None) -> None:
        self._apply(self._router.worker_gone(worker_id, status, time.monotonic()))


class _Call:
    """A user callback, queued so it runs in the control greenlet (never inside the
    router's action loop, never in a raw signal handler)."""

    def __init__(self, callback: Callable[..., Any], args: tuple[Any, ...], what: str) -> None:
        self.callback = callback
        self.args = args
        self.what = what

    def run(self) -> None:
        try:
            self.callback(*self.args)
        except Exception:
            logger.exception("%s %r raised", self.what, self.callback)
