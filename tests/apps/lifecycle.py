"""An App with worker events, for the TARGET=module:app path."""

from __future__ import annotations

import os

from speed_gevent import App

app = App()


@app.handler
def handle(message) -> None:
    pass


@app.on("start")
def started(worker) -> None:
    if os.environ.get("SG_FAIL_START"):
        raise RuntimeError("start event fails on purpose")
