"""Logging setup shared by the master, the fork server and workers (text or JSON lines)."""

from __future__ import annotations

import json
import logging
import sys
import time


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "pid": record.process,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def setup_logging(level: str, fmt: str, background: bool = False) -> None:
    """`background`: the master's lines are written by a real thread (see logthread)."""
    handler: logging.Handler
    if background:
        from .logthread import BackgroundStreamHandler

        handler = BackgroundStreamHandler(sys.stderr)
    else:
        handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)-7s [%(process)d] %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # py-amqp logs every heartbeat at debug; keep it quiet unless asked for explicitly.
    logging.getLogger("amqp").setLevel(max(logging.INFO, root.level))
