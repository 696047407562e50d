"""Resolve TARGET (`module:callable` or `module:app`) into an `App`, with one clear error."""

from __future__ import annotations

import importlib
import re
import sys
from typing import Any

from .app import App
from .errors import TargetError

_DOTTED = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*$")


def parse_target(target: str) -> tuple[str, str]:
    """Split and check `module:attr` without importing anything."""
    module, sep, attr = target.partition(":")
    if not sep:
        raise TargetError(f"TARGET {target!r}: expected module:callable, e.g. myapp.handlers:handle")
    if not _DOTTED.match(module):
        raise TargetError(f"TARGET {target!r}: {module!r} is not a module path")
    if not _DOTTED.match(attr):
        raise TargetError(f"TARGET {target!r}: {attr!r} is not an attribute name")
    return module, attr


def load_target(target: str) -> App:
    """Import TARGET (the current directory is importable, as with gunicorn and celery)."""
    module_name, attr = parse_target(target)
    if "" not in sys.path and "." not in sys.path:
        sys.path.insert(0, "")
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:
        raise TargetError(
            f"TARGET {target!r}: cannot import module {module_name!r}: {type(exc).__name__}: {exc}"
        ) from None
    obj: Any = module
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise TargetError(
                f"TARGET {target!r}: module {module_name!r} has no attribute {attr!r}"
            ) from None
    if isinstance(obj, App):
        if obj.message_handler is None:
            raise TargetError(f"TARGET {target!r}: the App has no handler")
        return obj
    if not callable(obj):
        raise TargetError(f"TARGET {target!r}: {attr!r} is a {type(obj).__name__}, not callable")
    return App(obj)
