"""What happens to a delivery after its attempt: the retry and dead-letter rules.

Pure. The master asks `decide()` for every finished attempt and carries out the
`Decision`: ack, republish for another attempt, or park in the dead-letter queue. A
republish (retry or dead letter) is confirmed by the broker before the original is acked.
"""

from __future__ import annotations

import datetime as dt
import os
import signal
from dataclasses import dataclass
from enum import Enum
from typing import Any

from .message import ATTEMPT_HEADER
from .protocol import Outcome

DEAD_SUFFIX = ".dead"


class Action(Enum):
    ACK = "ack"
    RETRY = "retry"
    DEAD_LETTER = "dead-letter"


class FailureKind(Enum):
    ERROR = "error"  #: the handler raised
    REJECT = "reject"  #: the handler raised Reject
    RETRY = "retry"  #: the handler raised Retry
    CRASH = "crash"  #: the worker died mid-message
    TIMEOUT = "timeout"  #: the handler ran past --timeout and its worker was killed
    INVALID = "invalid"  #: the master cannot turn the message into a frame for a worker


@dataclass(frozen=True)
class Failure:
    kind: FailureKind
    error_type: str = ""
    message: str = ""
    traceback: str = ""
    exit_status: str = ""
    retry_delay: float | None = None  #: what the handler's `Retry(delay=...)` asked for


@dataclass(frozen=True)
class Decision:
    action: Action
    failure: Failure | None = None


ACK = Decision(Action.ACK)


def failure_from_result(
    outcome: int, error_type: str, message: str, traceback: str, retry_delay: float | None = None
) -> Failure | None:
    """The failure a worker's result reports, or None when the handler returned."""
    if outcome == Outcome.OK:
        return None
    kind = {
        Outcome.ERROR: FailureKind.ERROR,
        Outcome.REJECT: FailureKind.REJECT,
        Outcome.RETRY: FailureKind.RETRY,
    }[Outcome(outcome)]  # the frame codec refuses unknown outcomes
    return Failure(kind, error_type, message, traceback, retry_delay=retry_delay)


def decide(failure: Failure | None, attempt: int, max_retries: int) -> Decision:
    """Ack on success; retry while attempts remain (Reject never retries); else dead-letter."""
    if failure is None:
        return ACK
    if failure.kind in (FailureKind.REJECT, FailureKind.INVALID) or attempt > max_retries:
        return Decision(Action.DEAD_LETTER, failure)
    return Decision(Action.RETRY, failure)


def killed_by_signal(status: int) -> bool:
    """The `waitpid` status of a process ended by a signal (ours, usually)."""
    return os.WIFSIGNALED(status)


def describe_exit(status: int) -> str:
    """A `waitpid` status as a person reads it: `exit code 3` or `killed by SIGKILL`."""
    if os.WIFSIGNALED(status):
        signum = os.WTERMSIG(status)
        try:
            name = signal.Signals(signum).name
        except ValueError:
            name = str(signum)
        return f"killed by {name}"
    if os.WIFEXITED(status):
        return f"exit code {os.WEXITSTATUS(status)}"
    return f"status {status}"


def dead_letter_queue(queue: str, override: str | None = None) -> str:
    return override or queue + DEAD_SUFFIX


def retry_headers(headers: dict[str, Any] | None, attempt: int) -> dict[str, Any]:
    """Headers of the republished message: the original ones, with the next attempt number."""
    new = dict(headers or {})
    new.pop("x-delivery-count", None)  # the broker's count restarts with the new message
    new[ATTEMPT_HEADER] = attempt + 1
    return new


def dead_letter_headers(
    headers: dict[str, Any] | None,
    failure: Failure,
    attempt: int,
    queue: str,
    exchange: str,
    routing_key: str,
    now: dt.datetime,
) -> dict[str, Any]:
    """The original headers plus why, when and from where the message was parked."""
    new = dict(headers or {})
    new.update({
        ATTEMPT_HEADER: attempt,
        "x-speed-reason": failure.kind.value,
        "x-speed-error-type": failure.error_type,
        "x-speed-error-message": failure.message,
        "x-speed-traceback": failure.traceback,
        "x-speed-origin-queue": queue,
        "x-speed-origin-exchange": exchange,
        "x-speed-origin-routing-key": routing_key,
        "x-speed-failed-at": now.isoformat(timespec="seconds"),
    })  # fmt: skip
    if failure.exit_status:
        new["x-speed-exit-status"] = failure.exit_status
    return new
