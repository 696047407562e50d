"""An App whose SIGUSR1 handlers ask the worker to leave (worker.stop), for the idle wait:
the second one's reason wins, which shows that the first one's stop() skipped nothing."""

from __future__ import annotations

import signal

from speed_gevent import App

app = App()


@app.handler
def handle(message) -> None:
    pass


def leave(signum, worker) -> None:
    worker.stop("USR1 asked")


def leave_too(signum, worker) -> None:
    worker.stop("USR1 asked twice")


app.add_signal(signal.SIGUSR1, leave)
app.add_signal(signal.SIGUSR1, leave_too)
