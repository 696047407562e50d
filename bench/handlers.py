"""Handlers the benchmark runs under speed-gevent (`bench.handlers:<name>`)."""

from __future__ import annotations

import os
import struct
import time

_LATENCY_FILE = os.environ.get("SG_BENCH_LATENCY")
_STAMP = struct.Struct("!d")


def noop(message) -> None:
    """Do nothing: the runner's own overhead."""


def sleep_10ms(message) -> None:
    time.sleep(0.01)


def latency(message) -> None:
    """Record publish-to-start: the body starts with the publisher's time.time()."""
    started = time.time()
    (published,) = _STAMP.unpack_from(message.body)
    fd = os.open(_LATENCY_FILE or "/dev/null", os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, b"%.6f\n" % (started - published))
    finally:
        os.close(fd)
