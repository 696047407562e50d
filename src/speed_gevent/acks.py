"""`AckTracker`: which delivery tags of one channel generation may be acked, and how.

Acking with `multiple=True` up to tag T acks every outstanding delivery ≤ T on that
channel, so it is only allowed when every delivery below T is settled (acked, rejected,
or about to be acked in this batch). The tracker turns a batch of finished tags into one
multiple-ack for the settled prefix plus single acks for the rest. Pure; one instance
per channel generation, since tags are per channel.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field


@dataclass
class AckPlan:
    """What to send for one batch: `basic_ack(upto, multiple=True)`, then single acks."""

    upto: int | None = None
    singles: list[int] = field(default_factory=list)


class AckTracker:
    def __init__(self) -> None:
        self._open: deque[int] = deque()  # tags received and not yet passed by a multiple-ack
        self._settled: set[int] = set()  # open tags already acked singly or rejected

    def received(self, tag: int) -> None:
        self._open.append(tag)

    def rejected(self, tag: int) -> None:
        """The tag was rejected (or nacked): settled without an ack."""
        self._settled.add(tag)

    @property
    def outstanding(self) -> int:
        return len(self._open) - len(self._settled)

    def plan(self, finished: list[int]) -> AckPlan:
        """Settle `finished` tags and say how to ack them with the fewest frames."""
        pending = set(finished)
        settled = self._settled
        settled.update(pending)
        upto = None
        open_tags = self._open
        while open_tags and open_tags[0] in settled:
            tag = open_tags.popleft()
            settled.discard(tag)
            if tag in pending:
                # RabbitMQ refuses a multiple-ack whose own tag is not outstanding, so the
                # tag we name must be one acked now, not one settled earlier.
                pending.discard(tag)
                upto = tag
        plan = AckPlan(upto, sorted(pending))
        return plan
