"""Exceptions and exit codes shared by the master, the fork server, workers and the CLI."""

from __future__ import annotations

from enum import IntEnum


class ExitCode(IntEnum):
    """Exit codes of the `speed-gevent` command."""

    OK = 0  #: clean stop, graceful or immediate
    FATAL = 1  #: unrecoverable runtime error
    USAGE = 2  #: usage or configuration error, reported before any work starts
    BROKER = 3  #: the broker refused the credentials/vhost, or could not be reached
    INTERRUPTED = 130  #: `publish` stopped by INT before it finished


class WorkerExit(IntEnum):
    """Exit codes of worker processes and the fork server, read by the master.

    1 is left out: it is what Python itself uses for an uncaught exception.
    """

    OK = 0  #: asked to stop, or its link to the master closed
    BOOT_FAILED = 3  #: the handler could not be loaded or the `start` event raised
    PROTOCOL_ERROR = 4  #: a corrupt or unexpected frame arrived
    PARENT_GONE = 5  #: the parent died before the child could notice through PDEATHSIG
    CRASHED = 70  #: an unexpected exception escaped the worker loop


class SpeedGeventError(Exception):
    """Base of the errors this package raises on purpose."""


class ConfigError(SpeedGeventError):
    """An option value is invalid; the message names the option and its source."""


class TargetError(SpeedGeventError):
    """TARGET cannot be imported or is not a handler."""


class ProtocolError(SpeedGeventError):
    """A frame is corrupt, truncated, oversized or of an unknown type."""


class BrokerError(SpeedGeventError):
    """The broker refused us at start (credentials, vhost) or cannot be reached."""


class QueueMissingError(SpeedGeventError):
    """A queue declared passively does not exist."""


class FatalError(SpeedGeventError):
    """The master cannot go on (lost connection, fork server gone, workers cannot boot)."""


class Retry(Exception):
    """Raised by a handler to ask for the message to be tried again."""

    def __init__(self, delay: float | None = None) -> None:
        super().__init__(f"retry requested (delay={delay})")
        self.delay = delay


class Reject(Exception):
    """Raised by a handler to send the message to the dead-letter queue at once."""

    def __init__(self, reason: str = "") -> None:
        super().__init__(reason)
        self.reason = reason
