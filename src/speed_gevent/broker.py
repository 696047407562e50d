"""`BrokerSession`: the master's one AMQP connection and channel, run by one greenlet.

The consumer greenlet is the only code that touches the connection. Other greenlets
queue rejects, publishes and cancels on the outbox, and the router keeps finished tags
until this greenlet takes them (`take_acks`); the loop wakes when the socket is readable
or the outbox is non-empty (never on a fixed drain timeout: with a full prefetch window
nothing arrives until acks leave), drains with `timeout=0`, writes the outbox, then the
acks, and services heartbeats about once a second. The order matters: a multiple-ack may
pass over rejected tags only once those rejects are written, so acks are taken right
after the outbox ran empty, with no yield in between.

Delivery tags belong to a channel: each connection gets a new `generation`, and a
settlement for a delivery of another generation is dropped (the broker redelivers it).
Republishes go through a confirm-mode channel whose acks are tracked asynchronously.
Bodies stay the broker's bytes: py-amqp's `auto_decode` (which turns a body with a
`content_encoding` into `str`) is off, and a delivery whose metadata cannot be framed for
a worker is marked with its problem for the router to dead-letter.
"""

from __future__ import annotations

import logging
import os
import random
import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial
from typing import Any

import gevent
import gevent.event
from amqp import Connection as AmqpConnection
from amqp import Message as AmqpMessage
from amqp.exceptions import ChannelError
from amqp.serialization import decode_properties_basic
from amqp.transport import TCPTransport

from .actions import Ack
from .amqpconn import close_channel, drop_connection, open_connection
from .amqpframes import METHOD, PROPERTIES_OFFSET, DeliverArgs, TakenDelivery, split_frames, take_delivery
from .confirms import Confirm, Confirms
from .delivery import Delivery
from .doorbell import Doorbell
from .errors import BrokerError, ConfigError, SpeedGeventError
from .protocol import MAX_META_SIZE, encode_meta
from .silence import SilenceWatchdog
from .topology import ensure_queues
from .urls import mask_secrets, mask_url

logger = logging.getLogger(__name__)

#: Longest wait between connection attempts at start, in seconds.
MAX_CONNECT_BACKOFF = 30.0
#: Seconds finished acks may wait for company before they are written.
ACK_DELAY = 0.002
#: Methods drained before the outbox gets a turn (TLS connections, read by py-amqp).
DRAIN_BATCH = 64
#: Bytes asked of the socket per read, and reads per drain before the outbox gets a turn.
READ_SIZE = 256 * 1024
READS_PER_DRAIN = 4
#: Seconds between heartbeat checks (py-amqp asks for about one a second).
HEARTBEAT_TICK = 1.0
#: Heartbeat intervals of silence during a synchronous method (channel open, declare,
#: qos, consume, cancel) after which the connection counts as lost, as py-amqp judges
#: missed heartbeats between them.
ANSWER_INTERVALS = 2.0
#: Seconds of silence tolerated during a synchronous method with heartbeats off.
ANSWER_TIMEOUT_NO_HEARTBEAT = 60.0
#: A channel.close from the broker: py-amqp answers and reopens the channel, waiting.
CHANNEL_CLOSE = b"\x00\x14\x00\x28"


#: Longest one connect and handshake may take, in seconds (at most --connect-timeout).
ATTEMPT_TIMEOUT = 10.0
MIN_ATTEMPT_TIMEOUT = 1.0


class ConnectionLost(Exception):
    """The connection or channel broke while running (`channel_only`: the connection is
    still up, the broker closed our channel or cancelled a consumer)."""

    def __init__(self, why: str, channel_only: bool = False, reply_code: int = 0) -> None:
        super().__init__(why)
        self.channel_only = channel_only
        self.reply_code = reply_code  #: the broker's code when it closed the channel


#: Channel refusals that no retry will change (access refused, resource locked,
#: precondition failed): at start, a configuration error.
PERMANENT_REFUSALS = frozenset({403, 405, 406})


class BrokerSession:
    def __init__(
        self,
        url: str,
        heartbeat: float,
        on_delivery: Callable[[Delivery], None],
        connect_timeout: float | None = None,
        take_acks: Callable[[], list[Ack]] = list,
        retry_steps: tuple[int, ...] = (),
        dead_letter: str | None = None,
    ) -> None:
        self.url = url
        self.masked_url = mask_url(url)
        self._heartbeat = heartbeat
        self._connect_timeout = connect_timeout
        self._on_delivery = on_delivery
        self._take_acks = take_acks
        self._retry_steps = retry_steps  #: the delay queues each source queue gets (ms)
        self._dead_letter = dead_letter  #: one shared dead-letter queue (None: <queue>.dead)
        self._ladders_made: set[str] = set()  #: source queues whose delay queues all exist
        self._ack_timer: Any = None
        self._conn: AmqpConnection | None = None
        self._channel: Any = None
        self.generation = 0
        self._next_id = 0
        self._queue_of: dict[str, str] = {}
        self._outbox: deque[tuple[Any, ...]] = deque()
        self._wake = Doorbell()
        self._confirms = Confirms()
        self._closing = False
        self._aborting = False
        self._cancelled: list[str] = []  # queues whose consumer the broker cancelled
        self._running = False
        self._owned = False  # a consumer greenlet lives (running, or recovering)
        self._close_deadline = 0.0
        self._give_up: float | None = None  # when start-up stops trying (--connect-timeout)
        self.closed = gevent.event.Event()
        self.connected = False

    # -- set-up, in the master's start sequence ----------------------------------------

    def connect(self) -> None:
        """Open the connection and channel (BrokerError if refused, OSError if unreachable)."""
        conn = open_connection(self.url, self._heartbeat, self._attempt_timeout(), self.masked_url)
        self._conn = conn
        self._ladders_made.clear()  # a broker that came back empty needs its delay queues again
        self.generation += 1
        try:
            with self._answered("channel.open"):
                self._channel = self._open_channel()
        except BaseException:
            drop_connection(conn)  # never left open behind a retry
            self._conn = None
            raise
        self.connected = True

    def _attempt_timeout(self) -> float:
        """How long one TCP connect and AMQP handshake may take: --connect-timeout bounds
        start-up as a whole, and a long one must not let a reconnect hang on one stalled
        handshake for as long."""
        limit = min(ATTEMPT_TIMEOUT, self._connect_timeout or ATTEMPT_TIMEOUT)
        if self._give_up is not None:
            limit = min(limit, self._give_up - time.monotonic())
        return max(MIN_ATTEMPT_TIMEOUT, limit)

    def connect_with_retry(
        self,
        stop_requested: Callable[[], bool],
        wait: Callable[[float], Any],
        timeout: float | None,
        retry_refused: bool = False,
        then: Callable[[], None] | None = None,
    ) -> bool:
        """Connect and run `then()` (the declares, at start), retrying both with doubling,
        jittered delays (logged with the password masked) when the broker is away.

        False if `stop_requested()` came true first; BrokerError if the broker refused us
        (unless `retry_refused`: a reconnect during a run keeps trying), or did not answer
        within `timeout` seconds (None: retry forever). Other errors of ours (a missing
        queue under --passive, a conflicting declare) are not retried.
        """
        delay = 1.0
        give_up = self._give_up = time.monotonic() + timeout if timeout else None
        try:
            while not stop_requested():
                failure = self._attempt(retry_refused, then)
                if failure is None:
                    return True
                if stop_requested():
                    break
                why = mask_secrets(f"{type(failure).__name__}: {failure}", self.url)
                pause = delay * random.uniform(0.75, 1.25)  # instances cut off together spread out
                if give_up is not None and time.monotonic() + pause > give_up:
                    raise BrokerError(f"cannot reach the broker {self.masked_url} within {timeout:g}s: {why}")
                logger.warning("cannot reach the broker %s: %s; retrying in %.1fs", self.masked_url, why,
                               pause)  # fmt: skip
                wait(pause)
                delay = min(delay * 2, MAX_CONNECT_BACKOFF)
            return False
        finally:
            self._give_up = None

    def _attempt(self, retry_refused: bool, then: Callable[[], None] | None) -> Exception | None:
        """One connect (and `then()`): None if it worked, the failure if worth retrying."""
        try:
            self.connect()
            if then is not None:
                with self._outage_as_lost():
                    then()
            return None
        except BrokerError as exc:
            if not retry_refused:
                raise
            failure: Exception = exc
        except ConnectionLost as exc:
            if exc.channel_only and exc.reply_code in PERMANENT_REFUSALS:
                raise ConfigError(f"the broker refused to set up the queues: {exc}") from None
            failure = exc  # also a channel closed for a passing reason (a home node down)
        except SpeedGeventError:
            raise
        except Exception as exc:
            failure = exc
        if self._conn is not None:  # `then()` failed on an open connection
            self.forget_channel()
            drop_connection(self._conn)
            self._conn = None
        return failure

    def recover(
        self, lost: ConnectionLost, stop_requested: Callable[[], bool], wait: Callable[[float], Any]
    ) -> bool:
        """After `run()` raised: a fresh channel on the same connection if only the channel
        broke, else a new connection (retried until it works or a stop comes: False).
        Either way a new generation, so no tag of the old channel is ever settled on it."""
        self.forget_channel()
        if lost.channel_only and self._conn is not None and self._conn.connected:
            try:
                with self._answered("channel.open"):
                    close_channel(self._channel)
                    self.generation += 1
                    self._channel = self._open_channel()
                self.connected = True
                return True
            except Exception as exc:  # the connection went too: connect again
                logger.warning("could not open a new channel (%s: %s); reconnecting", type(exc).__name__, exc)
        if self._conn is not None:
            drop_connection(self._conn)
            self._conn = None
        return self.connect_with_retry(stop_requested, wait, None, retry_refused=True)

    def resume(
        self,
        queues: tuple[str, ...],
        queue_type: str,
        passive: bool,
        prefetch: dict[str, int],
        on_channel: Callable[[], None],
    ) -> None:
        """After `recover()`: declare again, call `on_channel()` (the new generation is
        ready for deliveries), then consume (nothing, with an empty `prefetch`). An outage
        meanwhile raises ConnectionLost, so the caller recovers again."""
        with self._outage_as_lost():
            self.declare(queues, queue_type, passive)
            on_channel()
            if prefetch:
                with self._answered("basic.consume"):
                    self.start_consuming(prefetch)

    @contextmanager
    def _answered(self, what: str) -> Iterator[None]:
        """Wait on py-amqp's synchronous methods only while the connection still speaks
        (`silence.py`): silent as long as heartbeats would tolerate means lost."""
        beat = getattr(self._conn, "heartbeat", 0) or 0  # as negotiated with the broker
        grace = ANSWER_INTERVALS * beat if beat else ANSWER_TIMEOUT_NO_HEARTBEAT
        watchdog = SilenceWatchdog(self._conn, grace, self._give_up)
        with watchdog:
            try:
                yield
            except Exception:
                if not watchdog.fired:
                    raise
        if watchdog.fired:  # also when the failure was swallowed on the way (a close)
            raise ConnectionLost(f"no answer to {what}: {watchdog.why}")

    @contextmanager
    def _outage_as_lost(self) -> Iterator[None]:
        """An exception that means an outage (see `_as_lost`) leaves as ConnectionLost."""
        try:
            yield
        except Exception as exc:
            lost = _as_lost(exc)
            if lost is None:
                raise
            self.connected = False
            raise lost from exc

    def forget_channel(self) -> None:
        """What was queued for or awaited from the lost channel is dropped: its tags mean
        nothing elsewhere, and the router has already given up its republishes."""
        self.connected = False
        self._cancelled.clear()
        self._outbox.clear()
        self._confirms.clear()
        self._queue_of.clear()

    def _open_channel(self) -> Any:
        assert self._conn is not None
        channel = self._conn.channel()
        channel.auto_decode = False  # bodies are bytes, whatever their content_encoding
        channel.confirm_select()
        channel.events["basic_ack"].add(self._on_confirm_ack)
        channel.events["basic_nack"].add(self._on_confirm_nack)
        channel.events["basic_return"].add(self._on_return)
        self._confirms.clear()
        return channel

    def declare(self, queues: tuple[str, ...], queue_type: str, passive: bool) -> None:
        """Look at each queue and declare what is missing, each on a channel of its own,
        with its dead-letter and delay queues."""
        for queue in queues:
            steps = () if queue in self._ladders_made else self._retry_steps
            with self._answered(f"the declare of {queue!r}"):
                if ensure_queues(
                    self._conn,
                    (queue,),
                    queue_type,
                    passive,
                    retry_steps=steps,
                    dead_letter=self._dead_letter,
                ):
                    self._ladders_made.add(queue)  # not again at each recovery: 13 queues each

    def start_consuming(self, prefetch: dict[str, int]) -> None:
        """Per-consumer prefetch (quorum queues refuse global QoS): basic_qos before each
        consume. A queue this channel consumes already is skipped: the first consume can be
        queued while a recovery consumes (an outage while the floor boots), and a second
        consumer would double what the broker lets us hold."""
        channel = self._channel
        consumed = set(self._queue_of.values())
        for queue, count in prefetch.items():
            if queue in consumed:
                continue
            channel.basic_qos(0, count, False)
            tag = channel.basic_consume(
                queue=queue,
                callback=partial(self._on_message, self.generation),  # its own channel's, always
                no_ack=False,
                on_cancel=self._on_cancelled,
            )
            self._queue_of[tag] = queue

    def _on_cancelled(self, consumer_tag: str) -> None:
        """The broker cancelled a consumer (its queue was deleted, say): the channel is
        recovered as a whole, and consuming starts again once the queue is declared."""
        queue = self._queue_of.get(consumer_tag, consumer_tag)
        self._cancelled.append(queue)
        self._wake.ring()

    def _consume(self, prefetch: dict[str, int], again: bool) -> None:
        try:
            with self._answered("basic.consume"):
                self.start_consuming(prefetch)
        except ChannelError as exc:  # an exclusive consumer elsewhere, a queue deleted meanwhile
            if again:  # after a pause: the queue may have been deleted meanwhile, unseen
                raise ConnectionLost(f"cannot consume again from {', '.join(prefetch)}: {exc}",
                                     channel_only=True) from None  # fmt: skip
            raise BrokerError(f"cannot consume from {', '.join(prefetch)}: {exc}") from None

    def _on_message(self, generation: int, msg: AmqpMessage) -> None:
        """py-amqp's consumer callback: a delivery whose content came over several reads,
        or one read by py-amqp's own synchronous waits."""
        info = msg.delivery_info
        body, problem = _as_bytes(msg.body, msg.properties.get("content_encoding"))
        args = DeliverArgs(info["consumer_tag"], info["delivery_tag"], bool(info.get("redelivered")),
                           info.get("exchange") or "", info.get("routing_key") or "")  # fmt: skip
        self._deliver(generation, args, msg.properties, body, problem)

    def _on_taken(self, taken: TakenDelivery) -> None:
        """A delivery `_drain` took whole from one read."""
        try:
            properties, problem = decode_properties_basic(taken.header, PROPERTIES_OFFSET)[0], None
        except Exception as exc:  # nothing in a message may take the master down
            properties, problem = {}, f"its properties cannot be read ({type(exc).__name__}: {exc})"
        self._deliver(self.generation, taken.args, properties, taken.body, problem)

    def _deliver(
        self, generation: int, args: DeliverArgs, properties: dict[str, Any], body: bytes, problem: str | None
    ) -> None:
        self._next_id += 1
        queue = self._queue_of.get(args.consumer_tag, "")
        fields = (self._next_id, generation, args.delivery_tag, queue, args.exchange, args.routing_key,
                  args.redelivered, body)  # fmt: skip
        try:
            delivery = Delivery(*fields, properties, time.monotonic(), problem)
        except Exception as exc:  # nothing in a message may take the master down
            why = f"its properties cannot be read ({type(exc).__name__}: {exc})"
            delivery = Delivery(*fields, {}, time.monotonic(), why)
        if delivery.problem is None:
            delivery.problem = _frame_meta(delivery)
        self._on_delivery(delivery)

    # -- the outbox: safe to call from any greenlet --------------------------------------

    def wake(self) -> None:
        """Acks wait in the router: take and write them now."""
        self._wake.ring()

    def wake_soon(self) -> None:
        """Acks wait in the router: take them within ACK_DELAY, so that several results
        finished meanwhile leave as one multiple-ack (any earlier turn takes them too)."""
        timer = self._ack_timer
        if timer is None:
            self._wake.ring()
        elif not timer.active:
            timer.start(self._wake.ring)

    def reject(self, delivery: Delivery, requeue: bool = True) -> None:
        self._put(("reject", delivery, requeue))

    def publish(self, routing_key: str, body: bytes, properties: dict[str, Any], on_confirm: Confirm) -> None:
        """Publish to the default exchange, mandatory; `on_confirm(ok, why)` runs once confirmed."""
        self._put(("publish", routing_key, body, properties, on_confirm))

    def consume(self, prefetch: dict[str, int], on_done: Callable[[], None], again: bool = False) -> None:
        """Start consuming from the consumer greenlet (which already services heartbeats
        while the floor boots); `on_done()` runs there once every consume-ok is in."""
        self._put(("consume", prefetch, on_done, again))

    def cancel(self, on_done: Callable[[], None]) -> None:
        """Stop consuming every queue (basic.cancel); cached deliveries stay ours to settle."""
        self._put(("cancel", on_done))

    def close(self, timeout: float = 5.0) -> None:
        """Flush the outbox and wait for outstanding confirms (up to `timeout`), then close."""
        self._closing = True
        self._close_deadline = time.monotonic() + timeout
        if self._running or self._owned:
            self._wake.ring()  # its consumer greenlet closes, once out of any wait of its own
        elif not self.closed.is_set():
            self._shutdown()  # the consumer greenlet never ran (a stop during start)

    @contextmanager
    def owned(self) -> Iterator[None]:
        """The consumer greenlet's whole life, its recoveries included: a close() meanwhile
        is left to it, so no other greenlet waits on the connection beside one of its
        synchronous waits (a declare during recovery, say)."""
        self._owned = True
        try:
            yield
        finally:
            self._owned = False
            if self._closing and not self._aborting and not self.closed.is_set():
                self._shutdown()

    def _put(self, op: tuple[Any, ...]) -> None:
        self._outbox.append(op)
        self._wake.ring()

    # -- the consumer greenlet ------------------------------------------------------------

    def run(self) -> None:
        """Consumer greenlet body. Returns after `close()`; raises ConnectionLost when the
        connection or the channel broke (then `recover()`, and `run()` again)."""
        if self.closed.is_set():
            return
        assert self._conn is not None
        amqp_conn = self._conn
        loop = gevent.get_hub().loop
        io = loop.io(amqp_conn.sock.fileno(), 1)
        self._ack_timer = loop.timer(ACK_DELAY)
        self._running = True
        try:
            with self._outage_as_lost():
                self._loop(amqp_conn, io)
        finally:
            self._running = False
            io.close()
            self._ack_timer.close()
            self._ack_timer = None
        if self._aborting:
            self._collect()
        else:
            self._shutdown()

    def _loop(self, amqp_conn: AmqpConnection, io: Any) -> None:
        next_heartbeat = time.monotonic() + HEARTBEAT_TICK
        while not self._aborting:
            self._wake.clear()
            self._drain(amqp_conn)
            if self._cancelled and not self._closing:
                queues, self._cancelled = ", ".join(self._cancelled), []
                raise ConnectionLost(f"the broker cancelled our consumer on {queues}", channel_only=True)
            self._run_outbox()
            now = time.monotonic()
            if now >= next_heartbeat:
                amqp_conn.heartbeat_tick(rate=2)
                next_heartbeat = now + HEARTBEAT_TICK
            if self._closing and self._ready_to_close(now):
                return
            if self._outbox or self._wake.is_rung():
                continue
            io.start(self._wake.ring)
            try:
                self._wake.wait(max(0.0, next_heartbeat - now))
            finally:
                io.stop()

    def _drain(self, amqp_conn: Any) -> None:
        """Hand every frame that has arrived to py-amqp, without ever waiting or spinning.

        Plain TCP: read what the socket holds (a few large non-blocking reads at most, so
        the outbox gets its turn), split it into frames, keep a partial frame in py-amqp's
        own buffer (py-amqp's synchronous waits, at close, read from there). Nothing a
        drained frame calls may wait on the connection. TLS falls back to py-amqp's reads.
        """
        transport = amqp_conn.transport
        if not isinstance(transport, TCPTransport):
            self._drain_slowly(amqp_conn)
            return
        fd = transport.sock.fileno()
        chunks = [transport._read_buffer] if transport._read_buffer else []
        try:
            for _ in range(READS_PER_DRAIN):
                chunk = os.read(fd, READ_SIZE)
                if not chunk:
                    raise ConnectionLost("the broker closed the connection")
                chunks.append(chunk)
                if len(chunk) < READ_SIZE:
                    break
        except BlockingIOError:
            pass
        if not chunks:
            return
        data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        frames, used = split_frames(data)
        transport._read_buffer = data[used:]
        on_frame = amqp_conn.on_inbound_frame
        channel = self._channel
        channel_id = channel.channel_id if channel is not None else -1
        callbacks = channel.callbacks if channel is not None else {}
        index, count = 0, len(frames)
        while index < count:
            frame = frames[index]
            if frame[0] == METHOD and frame[1] == channel_id:
                taken = take_delivery(frames, index, channel_id)
                if taken is not None and taken.args.consumer_tag in callbacks:
                    amqp_conn.bytes_recv += taken.frames  # what py-amqp counts for heartbeats
                    index += taken.frames
                    self._on_taken(taken)
                    continue
            if frame[0] == METHOD and frame[2][:4] == CHANNEL_CLOSE:
                with self._answered("channel.open (py-amqp reopening a channel the broker closed)"):
                    on_frame(frame)
            else:
                on_frame(frame)  # also a delivery for a cancelled consumer: py-amqp requeues it
            index += 1

    def _drain_slowly(self, amqp_conn: Any) -> None:
        """TLS: py-amqp reads; a channel it reopens inside (a CHANNEL_CLOSE frame) is a
        synchronous wait, watched like every other."""
        with self._answered("a frame over TLS (or py-amqp reopening a channel)"):
            for _ in range(DRAIN_BATCH):
                try:
                    amqp_conn.drain_events(timeout=0)
                except TimeoutError:
                    return

    def _ready_to_close(self, now: float) -> bool:
        if self._outbox:
            return False
        if self._confirms and now < self._close_deadline:
            return False
        if self._confirms:
            logger.warning(
                "closing with %d republishes unconfirmed; their originals stay unacked", len(self._confirms)
            )
        return True

    def _shutdown(self) -> None:
        self.connected = False
        try:
            if self._conn is not None:
                self._conn.close()
        except Exception as exc:  # the broker may already be gone; nothing left to lose
            logger.debug("closing the connection: %s", exc)
        self.closed.set()

    def abort(self) -> None:
        """Drop the connection at once without acking anything (immediate stop, fatal error).

        If the consumer greenlet runs, it drops the connection itself: closing the socket
        under its live I/O watcher would trip libev.
        """
        self.connected = False
        self._aborting = True
        if self._running:
            self._wake.ring()
        else:
            self._collect()

    def _collect(self) -> None:
        if self._conn is not None:
            try:
                self._conn.collect()
            except Exception as exc:
                logger.debug("dropping the connection: %s", exc)
        self.closed.set()

    def _run_outbox(self) -> None:
        outbox = self._outbox
        while outbox:
            if self._aborting:
                return  # a fatal error or an immediate stop came while an op waited (consume,
                # cancel): nothing more goes out, nothing more is acked
            op = outbox.popleft()
            if op[0] == "reject":
                if self._current(op[1]):
                    self._channel.basic_reject(op[1].tag, requeue=op[2])
            elif op[0] == "publish":
                self._publish(*op[1:])
            elif op[0] == "consume":
                self._consume(op[1], op[3])
                op[2]()
            elif op[0] == "cancel":
                with self._answered("basic.cancel"):
                    for tag in list(self._queue_of):
                        self._channel.basic_cancel(tag)  # deliveries before its cancel-ok come first
                        del self._queue_of[tag]
                op[1]()
        if self._aborting:
            return
        # The outbox is empty and nothing yielded since: every reject the router counted
        # as settled is written, so a multiple-ack over it is safe.
        for ack in self._take_acks():
            if ack.generation == self.generation:
                self._channel.basic_ack(ack.tag, multiple=ack.multiple)

    def _current(self, delivery: Delivery) -> bool:
        """Tags are per channel: a delivery of an older generation is never settled here."""
        if delivery.generation == self.generation:
            return True
        logger.info("not settling %r from an old channel; the broker redelivers it", delivery)
        return False

    def _publish(
        self, routing_key: str, body: bytes, properties: dict[str, Any], on_confirm: Confirm
    ) -> None:
        headers = properties.get("application_headers")
        self._confirms.published(routing_key, body, headers, on_confirm)
        self._channel.basic_publish(
            AmqpMessage(body, **properties), exchange="", routing_key=routing_key, mandatory=True
        )

    def _on_confirm_ack(self, delivery_tag: int, multiple: bool) -> None:
        for on_confirm, ok, why in self._confirms.settled(delivery_tag, multiple, True):
            on_confirm(ok, why)

    def _on_confirm_nack(self, delivery_tag: int, multiple: bool) -> None:
        for on_confirm, ok, why in self._confirms.settled(delivery_tag, multiple, False):
            on_confirm(ok, why)

    def _on_return(self, exc: Exception, exchange: str, routing_key: str, message: Any) -> None:
        body, _ = _as_bytes(message.body, None)
        headers = message.properties.get("application_headers")
        if self._confirms.returned(routing_key, body, headers, str(exc)) is None:
            logger.warning("the broker returned a message to %r that matches no publish of ours", routing_key)


def _as_bytes(body: Any, encoding: Any) -> tuple[bytes, str | None]:
    """The body as bytes. With auto_decode off py-amqp hands over bytes; anything else is
    turned back into bytes as best we can and marked, so it is dead-lettered, not lost."""
    if isinstance(body, bytes):
        return body, None
    if isinstance(body, str) and not body:
        return b"", None  # py-amqp's default for a message with no body frame
    if isinstance(body, bytearray | memoryview):
        return bytes(body), None
    if isinstance(body, str):
        return body.encode("utf-8", "surrogatepass"), f"the body arrived decoded ({encoding!r})"
    return repr(body).encode(), f"the body arrived as {type(body).__name__}"


def _frame_meta(delivery: Delivery) -> str | None:
    """Encode the worker frame's metadata once; the reason if it cannot be encoded."""
    try:
        meta = encode_meta([delivery.id, delivery.meta()])
    except Exception as exc:  # msgpack refuses some values (huge ints, odd types)
        return f"its properties cannot be passed to a worker ({type(exc).__name__}: {exc})"
    if len(meta) > MAX_META_SIZE:
        return f"its properties and headers take {len(meta)} bytes, above {MAX_META_SIZE}"
    delivery.frame_meta = meta
    return None


def _as_lost(exc: Exception) -> ConnectionLost | None:
    """The outage an exception from the consumer loop means, if it is one."""
    if isinstance(exc, ConnectionLost):
        return exc
    if isinstance(exc, OSError | ConnectionError):
        return ConnectionLost(str(exc) or type(exc).__name__)
    if _is_connection_error(exc):
        return ConnectionLost(f"{type(exc).__name__}: {exc}")
    if isinstance(exc, ChannelError):  # the broker closed our channel (py-amqp revived it)
        return ConnectionLost(f"the broker closed the channel: {exc}", channel_only=True,
                              reply_code=getattr(exc, "reply_code", 0) or 0)  # fmt: skip
    return None


def _is_connection_error(exc: Exception) -> bool:
    from amqp.exceptions import ConnectionError as AmqpConnectionError
    from amqp.exceptions import RecoverableConnectionError

    return isinstance(exc, AmqpConnectionError | RecoverableConnectionError)
