"""Broker URL checks and password masking. Pure: every URL that reaches a log, a process
title, an error or the stats goes through `mask_url` first."""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit

#: Schemes accepted (kombu's names for py-amqp, so users' URLs carry over); amqps is TLS.
AMQP_SCHEMES = frozenset({"amqp", "amqps", "pyamqp"})

#: Where a kombu failover list starts its next URL (a `;` in a password does not split).
_NEXT_URL = re.compile(r";(?=[a-zA-Z][\w+.-]*://)")
_USERINFO = re.compile(r"^(?P<scheme>[a-zA-Z][\w+.-]*://)(?P<user>[^:@/]*):(?P<password>[^@]*)@")


def mask_url(url: str, mask: str = "**") -> str:
    """The URL with its password replaced by `mask`; works on malformed URLs too, and on
    kombu's `;`-separated failover lists (every password in them)."""
    return ";".join(
        _USERINFO.sub(lambda m: f"{m['scheme']}{m['user']}:{mask}@", part, count=1)
        for part in _NEXT_URL.split(url)
    )


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


#: TLS options accepted in an amqps URL's query, by kombu's names, and py-amqp's for them.
SSL_QUERY_KEYS = {
    "ssl_ca_certs": "ca_certs",
    "ssl_certfile": "certfile",
    "ssl_keyfile": "keyfile",
    "ssl_cert_reqs": "cert_reqs",
    "ssl_server_hostname": "server_hostname",
}
#: ssl.CERT_* by name (the values of ssl.VerifyMode; ssl itself is not imported here).
CERT_REQS = {"CERT_NONE": 0, "CERT_OPTIONAL": 1, "CERT_REQUIRED": 2}


def check_broker_url(url: str) -> str:
    """Return `url` unchanged if it is a usable AMQP URL, else raise ValueError saying why."""
    try:
        parts = urlsplit(url)
    except ValueError as exc:
        raise ValueError(f"malformed URL {mask_url(url)!r}: {exc}") from None
    bad = f"malformed URL {mask_url(url)!r}"
    if _NEXT_URL.search(url):
        raise ValueError(f"{bad}: one broker only (failover lists are not supported)")
    if parts.scheme.lower() not in AMQP_SCHEMES:
        raise ValueError(f"{bad}: scheme must be one of amqp, amqps, pyamqp")
    try:
        port = parts.port
    except ValueError:
        raise ValueError(f"{bad}: port is not a number 1-65535") from None
    if port == 0:
        raise ValueError(f"{bad}: port is not a number 1-65535")
    if not parts.hostname:
        raise ValueError(f"{bad}: no host")
    for key, value in parse_qsl(parts.query, keep_blank_values=True):
        if key not in SSL_QUERY_KEYS:
            known = ", ".join(SSL_QUERY_KEYS)
            raise ValueError(f"{bad}: unknown option {key!r} (the URL takes {known}; the rest are flags)")
        if parts.scheme.lower() != "amqps":
            raise ValueError(f"{bad}: {key} needs amqps://")
        if key == "ssl_cert_reqs" and value not in CERT_REQS:
            raise ValueError(f"{bad}: ssl_cert_reqs must be one of {', '.join(CERT_REQS)}")
    query = dict(parse_qsl(parts.query))
    if query.get("ssl_cert_reqs") == "CERT_NONE" and "ssl_server_hostname" in query:
        raise ValueError(f"{bad}: ssl_server_hostname checks a certificate that CERT_NONE does not ask for")
    return url


def connection_params(url: str) -> dict[str, Any]:
    """py-amqp `Connection` keywords for a checked AMQP URL, read as kombu reads it: the
    vhost is the path without its first slash (`//` and no path are both `/`, `%2F` is
    `/`), an empty user or password is guest, amqps means TLS on port 5671 with the
    `ssl_*` options of the query."""
    parts = urlsplit(url)
    tls = parts.scheme.lower() == "amqps"
    port = parts.port or (5671 if tls else 5672)
    host = unquote(parts.hostname or "localhost")
    if ":" in host:
        host = f"[{host}]"  # an IPv6 literal
    vhost = unquote(parts.path[1:]) if parts.path else ""
    ssl: bool | dict[str, Any] = tls
    options: dict[str, Any] = {SSL_QUERY_KEYS[k]: v for k, v in parse_qsl(parts.query) if k in SSL_QUERY_KEYS}
    if tls and options:
        if "cert_reqs" in options:
            options["cert_reqs"] = CERT_REQS[options["cert_reqs"]]
        ssl = options
    return {
        "host": f"{host}:{port}",
        "userid": unquote(parts.username or "") or "guest",
        "password": unquote(parts.password or "") or "guest",
        "virtual_host": vhost or "/",
        "ssl": ssl,
    }
