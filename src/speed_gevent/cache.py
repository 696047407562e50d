"""`MessageCache`: deliveries waiting for a worker, in arrival order.

Bounded, and `put` never waits: the consumer greenlet must not block, and the broker's
prefetch (which adds up to the capacity) is what keeps the cache from overflowing.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator

from .delivery import Delivery


class CacheFull(Exception):
    """More deliveries arrived than the prefetch allows: a bug, never a wait."""


class MessageCache:
    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._items: deque[Delivery] = deque()

    def __len__(self) -> int:
        return len(self._items)

    def put(self, delivery: Delivery) -> None:
        if len(self._items) >= self.capacity:
            raise CacheFull(f"cache full ({self.capacity}); {delivery!r} not taken")
        self._items.append(delivery)

    def put_front(self, delivery: Delivery) -> None:
        """Give back a delivery that could not be handed to a worker; it keeps its turn."""
        self._items.appendleft(delivery)

    def peek(self) -> Delivery:
        """The next delivery `take` would return (the cache must not be empty)."""
        return self._items[0]

    def take(self) -> Delivery | None:
        return self._items.popleft() if self._items else None

    def drain(self) -> list[Delivery]:
        """Everything cached, oldest first, leaving the cache empty (for the requeue at stop)."""
        items = list(self._items)
        self._items.clear()
        return items

    def peek_all(self) -> Iterator[Delivery]:
        return iter(self._items)

    def expire(self, now: float, max_age: float) -> list[Delivery]:
        """Take out deliveries that waited `max_age` or more, wherever they wait (one put
        back at the front may be younger than those behind it). The test is the one the
        router's timer uses (`received_at + max_age <= now`), so they always agree."""
        if not any(d.received_at + max_age <= now for d in self._items):
            return []
        expired = [d for d in self._items if d.received_at + max_age <= now]
        self._items = deque(d for d in self._items if d.received_at + max_age > now)
        return expired


class Unsettled:
    """Deliveries received and not settled yet, by id, and the bytes of their bodies:
    what the master holds in memory for the broker (cache, windows, running handlers,
    republishes waiting for their confirms)."""

    def __init__(self) -> None:
        self._by_id: dict[int, Delivery] = {}
        self.bytes = 0
        self._bytes_by_generation: dict[int, int] = {}

    def __len__(self) -> int:
        return len(self._by_id)

    def __contains__(self, delivery_id: int) -> bool:
        return delivery_id in self._by_id

    def __iter__(self) -> Iterator[int]:
        return iter(self._by_id)

    def add(self, delivery: Delivery) -> None:
        self.pop(delivery.id)
        self._by_id[delivery.id] = delivery
        self.bytes += len(delivery.body)
        by_generation = self._bytes_by_generation
        by_generation[delivery.generation] = by_generation.get(delivery.generation, 0) + len(delivery.body)

    def get(self, delivery_id: int) -> Delivery | None:
        return self._by_id.get(delivery_id)

    def pop(self, delivery_id: int) -> Delivery | None:
        delivery = self._by_id.pop(delivery_id, None)
        if delivery is not None:
            self.bytes -= len(delivery.body)
            left = self._bytes_by_generation.get(delivery.generation, 0) - len(delivery.body)
            if left > 0:
                self._bytes_by_generation[delivery.generation] = left
            else:  # empty bodies count nothing: their generation may have no entry
                self._bytes_by_generation.pop(delivery.generation, None)
        return delivery

    def bytes_of(self, generation: int) -> int:
        """Body bytes of one channel generation (an old one's are back at the broker)."""
        return self._bytes_by_generation.get(generation, 0)

    def values(self) -> Iterator[Delivery]:
        return iter(self._by_id.values())
