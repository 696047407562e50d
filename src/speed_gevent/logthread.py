"""The master's log lines leave through a real OS thread, never from the hub.

A `write` to a stderr pipe nobody reads (a stuck log shipper, a parent that stopped
reading) blocks; in the master that would block the hub, and with it heartbeats, acks
and every worker. So log records are formatted in the caller and queued; a real thread
(gevent's patched `threading` would make it a greenlet) writes them. The queue is
bounded: when full, lines are dropped and counted, and the count is written once the
stream takes lines again.
"""

from __future__ import annotations

import logging
import os
import time
from collections import deque
from collections.abc import Callable
from typing import Any, TextIO

#: Lines waiting for the stream before new ones are dropped.
CAPACITY = 1000
#: Seconds `flush` (at exit) waits for a slow stream.
FLUSH_TIMEOUT = 2.0


def _original(module: str, name: str) -> Callable[..., Any]:
    """The unpatched function (this module is imported after `patch_all`)."""
    from gevent import monkey

    return monkey.get_original(module, name)


class BackgroundStreamHandler(logging.Handler):
    def __init__(self, stream: TextIO, capacity: int = CAPACITY) -> None:
        super().__init__()
        self._stream = stream
        self._lines: deque[str] = deque()
        self._capacity = capacity
        self.dropped = 0
        self._reported = 0
        self._writing = False
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_w, False)
        self._sleep = _original("time", "sleep")
        _original("_thread", "start_new_thread")(self._run, ())

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record) + "\n"
        except Exception:
            self.handleError(record)
            return
        if len(self._lines) >= self._capacity:
            self.dropped += 1
        else:
            self._lines.append(line)  # deque appends and pops are atomic between threads
        try:
            os.write(self._wake_w, b".")
        except BlockingIOError:
            pass  # the thread has wake-ups enough waiting

    def flush(self) -> None:
        """Wait (a while) until the thread wrote what is queued: called at exit."""
        deadline = time.monotonic() + FLUSH_TIMEOUT
        while self._busy() and time.monotonic() < deadline:
            self._sleep(0.01)

    def _busy(self) -> bool:
        return bool(self._lines) or self._writing or self.dropped != self._reported

    def _run(self) -> None:
        while True:
            try:
                os.read(self._wake_r, 4096)  # blocks this thread only
            except OSError:
                return
            self._writing = True
            try:
                self._write_waiting()
            finally:
                self._writing = False

    def _write_waiting(self) -> None:
        while self._lines:
            self._write(self._lines.popleft())
        dropped = self.dropped
        if dropped != self._reported:
            note = logging.LogRecord(
                "speed_gevent.log", logging.WARNING, __file__, 0,
                "%d log lines dropped: stderr was not read", (dropped - self._reported,), None,
            )  # fmt: skip
            try:
                text = self.format(note)  # in the stream's own format (JSON lines too)
            except Exception:  # a formatter that fails here must not end this thread
                text = note.getMessage()
            self._write(text + "\n")
            self._reported = dropped

    def _write(self, text: str) -> None:
        try:
            self._stream.write(text)
            self._stream.flush()
        except Exception:  # a closed or broken stream: nothing to tell it with
            pass
