"""An App with worker events, for the TARGET=module:app path. Events append to SG_RECORD."""

from __future__ import annotations

import json
import os
import time

from speed_gevent import App

app = App()


def _note(event: str, **extra) -> None:
    path = os.environ.get("SG_RECORD")
    if path:
        with open(path, "a") as handle:
            handle.write(json.dumps({"event": event, "pid": os.getpid(), **extra}) + "\n")


@app.handler
def handle(message) -> None:
    if message.json().get("fail"):
        raise ValueError("handler failed on purpose")
    _note("handled", id=message.json()["id"])


@app.on("start")
def started(worker) -> None:
    if os.environ.get("SG_FAIL_START"):
        raise RuntimeError("start event fails on purpose")
    _note("start", worker=worker.id)
    time.sleep(float(os.environ.get("SG_SLOW_START", "0")))


@app.on("message")
def on_message(worker, message) -> None:
    _note("message", id=message.json()["id"])
    raise RuntimeError("a message callback that raises is logged, never fatal")


@app.on("error")
def on_error(exc, worker) -> None:
    _note("error", error=type(exc).__name__)


@app.on("end")
def ended(worker) -> None:
    _note("end", handled=worker.handled)
