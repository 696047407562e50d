"""An App whose SIGUSR1 handler asks the worker to leave (worker.stop), for the idle wait."""

from __future__ import annotations

import signal

from speed_gevent import App

app = App()


@app.handler
def handle(message) -> None:
    pass


def leave(signum, worker) -> None:
    worker.stop("USR1 asked")


app.add_signal(signal.SIGUSR1, leave)
