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


#: Signals raised by a fault in the process itself: a callback that returns would make
#: the faulting instruction run again, forever.
FAULTS = frozenset({signal.SIGSEGV, signal.SIGBUS, signal.SIGFPE, signal.SIGILL})


def uncatchable(signum: int) -> str | None:
    """Why the master cannot run a callback on `signum` (None: it can)."""
    if signum not in signal.valid_signals():
        return f"{signum!r} is not a signal"
    try:
        name = signal.Signals(signum).name
    except ValueError:  # a real-time signal: no name, still catchable
        return None
    if signum in (signal.SIGKILL, signal.SIGSTOP):
        return f"{name} cannot be caught"
    if signum == signal.SIGCHLD:
        return "SIGCHLD belongs to gevent's child watcher, which reaps the fork server"
    if signum in FAULTS:
        return f"{name} reports a fault in the master itself; a callback cannot resume from it"
    return None
