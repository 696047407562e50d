"""Parsers for the human spellings of durations (`30s`, `500ms`, `5m`) and sizes (`512MB`, `1GiB`).

Pure functions: they raise ValueError with a short reason; `config` adds the option and
where its value came from.
"""

from __future__ import annotations

import math
import re

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?|\.\d+)\s*(ms|s|m|h)?\s*$", re.IGNORECASE)
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]i?b|b)?\s*$", re.IGNORECASE)
_SIZE_UNITS = {
    "b": 1,
    "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
}  # fmt: skip


def parse_duration(value: object) -> float:
    """Seconds from `30`, `30s`, `0.5s`, `500ms`, `5m`, `1h` (a bare number is seconds)."""
    if isinstance(value, bool):
        raise ValueError("expected a duration such as 30s, 500ms or 5m")
    if isinstance(value, int | float):
        seconds = float(value)
    else:
        match = _DURATION.match(str(value))
        if not match:
            raise ValueError("expected a duration such as 30s, 500ms or 5m")
        seconds = float(match.group(1)) * _DURATION_UNITS[(match.group(2) or "s").lower()]
    if seconds < 0 or not math.isfinite(seconds):
        raise ValueError("expected a duration of zero or more")
    return seconds


def parse_size(value: object) -> int:
    """Bytes from `512MB`, `1GB` (decimal), `512MiB`, `1GiB` (binary) or a bare byte count."""
    if isinstance(value, bool):
        raise ValueError("expected a size such as 512MB or 1GiB")
    if isinstance(value, int):
        size = value
    else:
        match = _SIZE.match(str(value))
        if not match:
            raise ValueError("expected a size such as 512MB or 1GiB")
        size = int(float(match.group(1)) * _SIZE_UNITS[(match.group(2) or "b").lower()])
    if size < 0:
        raise ValueError("expected a size of zero or more")
    return size


def format_duration(seconds: float) -> str:
    """Short human form for logs and summaries."""
    if seconds < 1:
        return f"{seconds * 1000:.0f}ms"
    if seconds < 120:
        return f"{seconds:.1f}s"
    return f"{seconds / 60:.1f}m"
