"""Counters the master keeps, and the texts made from them (summary line, USR1 snapshot)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class Counters:
    received: int = 0
    handled: int = 0  #: results received (any outcome)
    failed: int = 0  #: results that were not OK, plus deliveries lost with a dead worker
    acked: int = 0
    retried: int = 0
    dead_lettered: int = 0
    requeued: int = 0
    refused: int = 0  #: retries and dead letters the broker did not take (given back later)
    crashes: int = 0
    spawned: int = 0
    first_delivery_at: float | None = None
    last_result_at: float | None = None
    per_worker: dict[int, int] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def summary_line(counters: Counters, elapsed: float, how: str) -> str:
    """The one line printed at stop: counts, rate over the busy span, and per-worker counts."""
    busy = 0.0
    if counters.first_delivery_at is not None and counters.last_result_at is not None:
        busy = max(0.0, counters.last_result_at - counters.first_delivery_at)
    rate = counters.handled / busy if busy > 0 else 0.0
    workers = " ".join(f"{wid}:{n}" for wid, n in sorted(counters.per_worker.items())) or "-"
    return (
        f"stopped ({how}) after {elapsed:.1f}s: received {counters.received}, handled "
        f"{counters.handled} (failed {counters.failed}), acked {counters.acked}, retried "
        f"{counters.retried}, dead-lettered {counters.dead_lettered}, requeued {counters.requeued}, "
        f"refused {counters.refused}, "
        f"worker crashes {counters.crashes}; {rate:.0f} msg/s over {busy:.1f}s; per worker {workers}"
    )
