"""Master signals: which intent each signal records.

Signal handlers only record intent (gunicorn, huey); the master's control greenlet acts
on it (the router counts stops: the second is immediate). SIGCHLD is not here:
gevent's child watcher owns it in the master.
"""

from __future__ import annotations

import signal
from enum import Enum


class Intent(Enum):
    STOP = "stop"
    LOG_STATS = "log-stats"
    REPLACE_WORKERS = "replace-workers"
    MORE_WORKERS = "more-workers"
    FEWER_WORKERS = "fewer-workers"


SIGNAL_INTENTS: dict[int, Intent] = {
    signal.SIGTERM: Intent.STOP,
    signal.SIGINT: Intent.STOP,
    signal.SIGUSR1: Intent.LOG_STATS,
    signal.SIGHUP: Intent.REPLACE_WORKERS,
    signal.SIGTTIN: Intent.MORE_WORKERS,
    signal.SIGTTOU: Intent.FEWER_WORKERS,
}


def uncatchable(signum: int) -> str | None:
    """Why the master cannot run a callback on `signum` (None: it can)."""
    try:
        name = signal.Signals(signum).name
    except ValueError:
        return f"{signum!r} is not a signal"
    if signum in (signal.SIGKILL, signal.SIGSTOP):
        return f"{name} cannot be caught"
    if signum == signal.SIGCHLD:
        return "SIGCHLD belongs to gevent's child watcher, which reaps the fork server"
    return None
