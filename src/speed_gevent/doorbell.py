"""`Doorbell`: what wakes the consumer greenlet, at the cost of one switch.

The consumer greenlet sleeps until the broker's socket is readable, the outbox has
something, or a timer is due. gevent's `Event` hands every `set()` to a hub callback,
and the waiter is switched to from there: even when the hub itself rings (the socket's
I/O watcher, the ack timer), a delivery waits for that extra round. On a quiet queue that
round is a share of each message's latency. Here a ring from inside the hub switches
straight into the waiting greenlet; a ring from another greenlet goes through one hub
callback, as it must (only the hub may switch into a waiting greenlet).
"""

from __future__ import annotations

from gevent import get_hub, getcurrent
from gevent.hub import Waiter


class Doorbell:
    """A flag the consumer greenlet waits on; `ring()` is safe from any greenlet and from
    the hub's own callbacks. One greenlet waits at a time."""

    __slots__ = ("_rung", "_waiter", "_hub")

    def __init__(self) -> None:
        self._rung = False
        self._waiter: Waiter | None = None
        self._hub = get_hub()

    def is_rung(self) -> bool:
        return self._rung

    def clear(self) -> None:
        self._rung = False

    def ring(self) -> None:
        self._rung = True
        waiter = self._waiter
        if waiter is None:
            return
        self._waiter = None  # later rings only set the flag: one wake-up is enough
        if getcurrent() is self._hub:
            waiter.switch(True)
        else:
            self._hub.loop.run_callback(waiter.switch, True)

    def wait(self, timeout: float) -> bool:
        """Sleep until rung or `timeout` seconds passed; True if rung. A wake-up left over
        from an earlier wait never ends this one early: each wait has its own Waiter."""
        if self._rung:
            return True
        waiter = Waiter(self._hub)
        timer = self._hub.loop.timer(max(0.0, timeout))
        self._waiter = waiter
        try:
            timer.start(waiter.switch, False)
            waiter.get()
        finally:
            timer.close()
            self._waiter = None
        return self._rung
