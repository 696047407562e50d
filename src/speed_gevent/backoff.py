"""How long a failed attempt waits before the next: a small ladder of delay queues.

Pure. A retry is republished to the delay queue of its step; that queue's message TTL is
the step, and its dead-letter route leads back to the source queue, so the broker holds
the message for us (nothing waits in the master, nothing is lost if we stop). Steps
double from --retry-delay up to --retry-delay-max, the cap being the last step. A
queue's TTL cannot be changed by declaring it again, so the step is part of the queue's
name; and every message in one queue waits alike, so none is stuck behind a longer one
(RabbitMQ expires messages only at the head of a queue).
"""

from __future__ import annotations

import math
from typing import Any

#: Most steps in a ladder (doubling from 1 ms, 32 steps exceed a month).
MAX_STEPS = 32
#: What a delay queue's name adds to its source queue's, before the step.
DELAY_INFIX = ".retry."
#: RabbitMQ's largest message TTL, in ms (32 bits): the longest a step may be.
MAX_STEP_MS = 2**32 - 1
#: The longest a delay queue's name may add.
LONGEST_SUFFIX = DELAY_INFIX + f"{MAX_STEP_MS}ms"


def ladder(first: float, cap: float) -> tuple[int, ...]:
    """The steps in milliseconds: `first` doubled until `cap`, which ends the ladder.
    Empty when `first` is 0 (retries without delay)."""
    first_ms, cap_ms = math.ceil(first * 1000), math.ceil(cap * 1000)
    if first_ms <= 0:
        return ()
    steps: list[int] = []
    step = first_ms
    while step < cap_ms and len(steps) < MAX_STEPS - 1:
        steps.append(step)
        step *= 2
    steps.append(max(cap_ms, first_ms))
    return tuple(steps)


def step_after(steps: tuple[int, ...], attempt: int) -> int | None:
    """The wait after failed attempt number `attempt` (1 for the first): one step further
    per attempt, staying on the cap. None: retry at once."""
    if not steps:
        return None
    return steps[min(max(attempt, 1), len(steps)) - 1]


def step_for(steps: tuple[int, ...], seconds: float) -> int | None:
    """The step for a delay the handler asked for (`Retry(delay=...)`): the nearest at or
    above it, the cap at most. None (at once) for no delay, or when there is no ladder."""
    if not steps or not seconds > 0:  # also NaN: a handler's own arithmetic
        return None
    wanted = seconds * 1000
    if not math.isfinite(wanted) or wanted >= steps[-1]:  # 1e306 s overflows to inf
        return steps[-1]
    return next((step for step in steps if step >= wanted), steps[-1])


def step_label(ms: int) -> str:
    """`1s`, `64s`, `5m`, `1h`, `1500ms`: exact, so two steps never share a name."""
    for unit, size in (("h", 3_600_000), ("m", 60_000), ("s", 1000)):
        if ms % size == 0:
            return f"{ms // size}{unit}"
    return f"{ms}ms"


def delay_queue(source: str, ms: int) -> str:
    return f"{source}{DELAY_INFIX}{step_label(ms)}"


def delay_queue_arguments(source: str, ms: int, queue_type: str) -> dict[str, Any]:
    """Expire after `ms`, then back to `source` through the default exchange. On quorum
    queues the way back is at least once (which RabbitMQ allows only with reject-publish:
    a full delay queue refuses the republish, and the original stays unacked)."""
    arguments: dict[str, Any] = {
        "x-message-ttl": ms,
        "x-dead-letter-exchange": "",
        "x-dead-letter-routing-key": source,
    }
    if queue_type == "quorum":
        arguments.update({
            "x-queue-type": "quorum",
            "x-dead-letter-strategy": "at-least-once",
            "x-overflow": "reject-publish",
        })  # fmt: skip
    return arguments


#: A message whose republish the broker refused waits this long before it goes back to
#: its queue, doubling with each refusal in a row, up to REFUSAL_MAX (seconds).
REFUSAL_FIRST = 1.0
REFUSAL_MAX = 60.0


class RefusalBackoff:
    """When to give back a message whose retry or dead letter the broker refused (its
    queue deleted, full, or a policy against it): never at once, which would redeliver,
    fail and refuse it again at full speed. Kept per target queue; a publish the broker
    takes starts that queue's wait again from the first. Refusals that come while a wait
    is running share its end, so a burst of them counts as one."""

    def __init__(self, first: float = REFUSAL_FIRST, cap: float = REFUSAL_MAX) -> None:
        self._first, self._cap = first, cap
        self._waits: dict[str, tuple[int, float]] = {}  #: target -> (refusals in a row, until)

    def refused(self, target: str, now: float) -> float:
        """The time to give the message back at: after `now`, unless a running wait ends sooner."""
        streak, until = self._waits.get(target, (0, now))
        if now < until:
            return until
        streak = min(streak + 1, 64)
        until = now + min(math.ldexp(self._first, streak - 1), self._cap)
        self._waits[target] = (streak, until)
        return until

    def accepted(self, target: str) -> None:
        self._waits.pop(target, None)

    def refusals_in_a_row(self, target: str) -> int:
        return self._waits.get(target, (0, 0.0))[0]
