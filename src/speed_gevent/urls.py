"""Broker URL checks and password masking. Pure: every URL that reaches a log, a process
title, an error or the stats goes through `mask_url` first."""

from __future__ import annotations

import re
from urllib.parse import urlsplit

#: Schemes kombu's py-amqp transport accepts.
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
