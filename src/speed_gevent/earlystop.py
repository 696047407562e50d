"""TERM and INT before the master's own handlers: recorded, never raised.

Between the interpreter's start and the master's gevent signal handlers, a TERM would kill
the process with status 143. Raising KeyboardInterrupt instead lands at an arbitrary
bytecode (inside an import, inside gevent's patching), so the stop is only recorded here:
`speed-gevent run` checks it before it starts anything, and the master replays it as a
stop the moment its handlers are in. `publish` gives the signals their usual meaning back.
Import-light: the entry point calls `catch()` before it monkey-patches.
"""

from __future__ import annotations

import signal

_received: list[int] = []


def catch() -> None:
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, _record)


def _record(signum: int, frame: object) -> None:
    _received.append(signum)


def received() -> list[int]:
    """The stops recorded so far, in order."""
    return list(_received)


def release() -> None:
    """TERM and INT as Python has them by default (a recorded stop stays recorded)."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)
