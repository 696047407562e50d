"""Broker URL checks and password masking. Pure: every URL that reaches a log, a process
title, an error or the stats goes through `mask_url` first."""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import unquote, urlsplit

#: Schemes accepted (kombu's names for py-amqp, so users' URLs carry over); amqps is TLS.
AMQP_SCHEMES = frozenset({"amqp", "amqps", "pyamqp"})

_USERINFO = re.compile(r"^(?P<scheme>[a-zA-Z][\w+.-]*://)(?P<user>[^:@/]*):(?P<password>[^@]*)@")


def mask_url(url: str, mask: str = "**") -> str:
    """The URL with its password replaced by `mask`; works on malformed URLs too."""
    return _USERINFO.sub(lambda m: f"{m['scheme']}{m['user']}:{mask}@", url, count=1)


def mask_secrets(text: str, url: str, mask: str = "**") -> str:
    """`text` with the URL's password masked wherever it appears (for foreign error texts)."""
    try:
        parts = urlsplit(url)
        password, username = parts.password, parts.username
    except ValueError:
        password = username = None
    text = text.replace(url, mask_url(url, mask))
    # A password equal to the user name (guest:guest) would mask the name too; the URL
    # itself is masked above, which is where such a password shows.
    if password and len(password) >= 3 and password != username:
        text = text.replace(password, mask)
    return text


def check_broker_url(url: str) -> str:
    """Return `url` unchanged if it is a usable AMQP URL, else raise ValueError saying why."""
    try:
        parts = urlsplit(url)
    except ValueError as exc:
        raise ValueError(f"malformed URL {mask_url(url)!r}: {exc}") from None
    if parts.scheme.lower() not in AMQP_SCHEMES:
        raise ValueError(f"malformed URL {mask_url(url)!r}: scheme must be one of amqp, amqps, pyamqp")
    try:
        port = parts.port
    except ValueError:
        raise ValueError(f"malformed URL {mask_url(url)!r}: port is not a number 1-65535") from None
    if port == 0:
        raise ValueError(f"malformed URL {mask_url(url)!r}: port is not a number 1-65535")
    if not parts.hostname:
        raise ValueError(f"malformed URL {mask_url(url)!r}: no host")
    return url


def connection_params(url: str) -> dict[str, Any]:
    """py-amqp `Connection` keywords for a checked AMQP URL, read as kombu reads it: the
    vhost is the path without its first slash (`//` and no path are both `/`, `%2F` is
    `/`), user and password default to guest, amqps means TLS on port 5671."""
    parts = urlsplit(url)
    tls = parts.scheme.lower() == "amqps"
    port = parts.port or (5671 if tls else 5672)
    host = parts.hostname or "localhost"
    if ":" in host:
        host = f"[{host}]"  # an IPv6 literal
    vhost = unquote(parts.path[1:]) if parts.path else ""
    return {
        "host": f"{host}:{port}",
        "userid": unquote(parts.username) if parts.username is not None else "guest",
        "password": unquote(parts.password) if parts.password is not None else "guest",
        "virtual_host": vhost or "/",
        "ssl": tls,
    }
