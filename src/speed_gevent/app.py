"""`App`: the handler plus the worker-side events and signal handlers of one deployment.

Mirrors the seed package's WorkerFactory: events `start`, `end`, `message`, `disconnect`,
`error`, and worker signal handlers. A callback that raises is logged, never fatal,
except `start`, whose failure means the worker cannot boot.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

logger = logging.getLogger(__name__)

WORKER_EVENTS = ("start", "end", "message", "disconnect", "error")

Handler = Callable[[Any], None]


class App:
    """What a worker runs. `App(handler)`, or `app = App()` plus `@app.handler`."""

    def __init__(self, handler: Handler | None = None) -> None:
        self._handler = handler
        self._events: dict[str, list[Callable[..., Any]]] = {name: [] for name in WORKER_EVENTS}
        self._signals: dict[int, list[Callable[..., Any]]] = {}

    def handler(self, fn: Handler) -> Handler:
        """Decorator that sets the message handler."""
        self._handler = fn
        return fn

    @property
    def message_handler(self) -> Handler | None:
        return self._handler

    def on(self, event: str, fn: Callable[..., Any] | None = None) -> Any:
        """Register `fn` for a worker event; usable as `@app.on("start")`."""
        if event not in self._events:
            raise ValueError(f"unknown worker event {event!r}; known: {', '.join(WORKER_EVENTS)}")

        def register(callback: Callable[..., Any]) -> Callable[..., Any]:
            self._events[event].append(callback)
            return callback

        return register(fn) if fn is not None else register

    def add_signal(self, signum: int, fn: Callable[..., Any]) -> App:
        """Run `fn(signum, worker)` in the worker when it receives `signum`."""
        self._signals.setdefault(signum, []).append(fn)
        return self

    @property
    def signal_handlers(self) -> dict[int, list[Callable[..., Any]]]:
        return self._signals

    def emit(self, event: str, *args: Any) -> None:
        """Run the callbacks of `event`; one that raises is logged and the rest still run."""
        for callback in self._events[event]:
            try:
                callback(*args)
            except Exception:
                logger.exception("worker event %r callback %r raised", event, callback)

    def emit_strict(self, event: str, *args: Any) -> None:
        """Like `emit`, but let the first exception through (for `start`)."""
        for callback in self._events[event]:
            callback(*args)
