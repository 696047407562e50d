"""speed-gevent: consume RabbitMQ queues with an elastic pool of preforked workers.

Kept import-light on purpose: the console entry point imports this package before it
monkey-patches, so nothing here may import gevent, kombu or amqp (they are loaded lazily).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

__all__ = ["App", "Message", "Reject", "Retry", "__version__"]

if TYPE_CHECKING:  # pragma: no cover
    from .app import App
    from .errors import Reject, Retry
    from .message import Message

_LAZY = {
    "App": ("speed_gevent.app", "App"),
    "Message": ("speed_gevent.message", "Message"),
    "Retry": ("speed_gevent.errors", "Retry"),
    "Reject": ("speed_gevent.errors", "Reject"),
}


def __getattr__(name: str) -> Any:
    try:
        module_name, attr = _LAZY[name]
    except KeyError:
        raise AttributeError(f"module 'speed_gevent' has no attribute {name!r}") from None
    import importlib

    return getattr(importlib.import_module(module_name), attr)
