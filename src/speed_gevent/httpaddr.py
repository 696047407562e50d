"""The address `--http` listens on. Pure."""

from __future__ import annotations


def parse_address(value: str) -> tuple[str, int]:
    """`HOST:PORT`, `:PORT` (127.0.0.1) or `PORT`; `[::1]:PORT` for IPv6. ValueError says why."""
    text = value.strip()
    host, sep, port_text = text.rpartition(":")
    if not sep:
        host, port_text = "", text
    host = host.strip("[]") or "127.0.0.1"
    try:
        port = int(port_text)
    except ValueError:
        raise ValueError("expected HOST:PORT such as 127.0.0.1:9100") from None
    if not 0 < port < 65536:
        raise ValueError(f"port {port} is not between 1 and 65535")
    return host, port
