"""Publisher confirms for republishes: which publish each ack, nack or return settles.

Pure. A basic.return carries the message but not its sequence number. RabbitMQ sends a
return before the confirm of the same publish, and returns in publish order, so a return
belongs to the oldest publish still unconfirmed, not yet marked returned, to the same
queue with the same body (and, where several match, the same headers). Publishes that
match in all of these cannot be told apart by anyone downstream: marking either loses
nothing. This keeps our bookkeeping out of the message; a sequence header used to show
up in every dead letter and every retried message a handler saw.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

#: Called once per publish: (taken by the broker, why not).
Confirm = Callable[[bool, str], None]


@dataclass
class _Pending:
    on_confirm: Confirm
    routing_key: str
    body: bytes
    headers: Any
    returned: str | None = None


class Confirms:
    """Unconfirmed publishes on one confirm-mode channel, numbered as the broker numbers them."""

    def __init__(self) -> None:
        self._pending: dict[int, _Pending] = {}
        self._seq = 0

    def __len__(self) -> int:
        return len(self._pending)

    def published(self, routing_key: str, body: bytes, headers: Any, on_confirm: Confirm) -> int:
        """Record a publish just written; its sequence number (1 for a channel's first)."""
        self._seq += 1
        self._pending[self._seq] = _Pending(on_confirm, routing_key, body, headers)
        return self._seq

    def returned(self, routing_key: str, body: bytes, headers: Any, why: str) -> int | None:
        """A basic.return: mark the publish it belongs to; its number, None if none matches."""
        candidates = [
            seq
            for seq, entry in self._pending.items()
            if entry.returned is None and entry.routing_key == routing_key and entry.body == body
        ]
        if not candidates:
            return None
        same_headers = [seq for seq in candidates if self._pending[seq].headers == headers]
        seq = (same_headers or candidates)[0]
        self._pending[seq].returned = why
        return seq

    def settled(self, tag: int, multiple: bool, ok: bool) -> list[tuple[Confirm, bool, str]]:
        """A basic.ack or basic.nack: the callbacks to call, with their outcome, in order."""
        seqs = [seq for seq in self._pending if seq <= tag] if multiple else [tag]
        done = []
        for seq in seqs:
            entry = self._pending.pop(seq, None)
            if entry is None:
                continue
            if entry.returned is not None:
                done.append((entry.on_confirm, False, f"queue {entry.routing_key!r} did not take it: "
                             f"{entry.returned}"))  # fmt: skip
            elif not ok:
                done.append((entry.on_confirm, False, "the broker nacked it"))
            else:
                done.append((entry.on_confirm, True, ""))
        return done

    def clear(self) -> None:
        """A new channel: numbering starts again at 1, and nothing earlier will be confirmed."""
        self._pending.clear()
        self._seq = 0
