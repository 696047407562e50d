"""`--http HOST:PORT`: `/livez`, `/readyz`, `/stats` and `/metrics`, served by gevent in
the master.

Every answer is read from `Master.stat()` when asked: nothing here touches the AMQP
connection or a worker, so a scrape never waits on the broker or blocks the consumer, and
nothing is counted per message for it. Worker figures come through the master (no
multiprocess directory on disk). `prometheus_client` is imported only when --http is on.

`/livez` is 200 whenever the master's loop answers at all, the broker up or not: an outage
must not make Kubernetes restart every pod (the master recovers by itself). `/readyz` is
200 only while connected and consuming.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from .httpaddr import parse_address

__all__ = ["StatusApp", "StatCollector", "parse_address", "serve"]

logger = logging.getLogger(__name__)

Stat = Callable[[], dict[str, Any]]
Ready = Callable[[], tuple[bool, str]]
StartResponse = Callable[[str, list[tuple[str, str]]], Any]

PREFIX = "speed_gevent"
#: Counters of the summary line, as `speed_gevent_messages_total{event=...}`.
MESSAGE_EVENTS = ("received", "handled", "failed", "acked", "retried", "dead_lettered", "requeued", "refused")


class StatusApp:
    """The WSGI application: four read-only paths."""

    def __init__(self, stat: Stat, ready: Ready) -> None:
        self._stat = stat
        self._ready = ready
        self._metrics: Any = None  # (registry, generate_latest), made at the first scrape

    def __call__(self, environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        if environ.get("REQUEST_METHOD") not in ("GET", "HEAD"):
            return _answer(start_response, "405 Method Not Allowed", b"GET only\n")
        path = environ.get("PATH_INFO", "")
        if path == "/livez":
            return _answer(start_response, "200 OK", b"ok\n")
        if path == "/readyz":
            ready, why = self._ready()
            status = "200 OK" if ready else "503 Service Unavailable"
            return _answer(start_response, status, why.encode() + b"\n")
        if path == "/stats":
            body = json.dumps(self._stat(), indent=1, default=str).encode() + b"\n"
            return _answer(start_response, "200 OK", body, "application/json")
        if path == "/metrics":
            registry, generate_latest, content_type = self._registry()
            return _answer(start_response, "200 OK", generate_latest(registry), content_type)
        return _answer(start_response, "404 Not Found", b"try /livez, /readyz, /stats or /metrics\n")

    def _registry(self) -> Any:
        if self._metrics is None:
            from prometheus_client import (
                CONTENT_TYPE_LATEST,
                CollectorRegistry,
                ProcessCollector,
                generate_latest,
            )

            registry = CollectorRegistry(auto_describe=False)
            registry.register(StatCollector(self._stat))
            ProcessCollector(namespace="speed_gevent_master", registry=registry)
            self._metrics = (registry, generate_latest, CONTENT_TYPE_LATEST)
        return self._metrics


class StatCollector:
    """Prometheus metrics made from one `stat()` snapshot per scrape."""

    def __init__(self, stat: Stat) -> None:
        self._stat = stat

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        stat = self._stat()
        totals, cache, workers = stat["totals"], stat["cache"], stat["workers"]
        messages = CounterMetricFamily(f"{PREFIX}_messages", "Deliveries by what happened", labels=["event"])
        for event in MESSAGE_EVENTS:
            messages.add_metric([event], totals.get(event, 0))
        yield messages
        exits = CounterMetricFamily(f"{PREFIX}_worker_exits", "Workers that left", labels=["reason"])
        for reason, count in sorted(stat["pool"]["retired"].items()):
            exits.add_metric([reason], count)
        yield exits
        states = GaugeMetricFamily(f"{PREFIX}_workers", "Workers by state", labels=["state"])
        for state in sorted({w["state"] for w in workers}):
            states.add_metric([state], sum(1 for w in workers if w["state"] == state))
        yield states
        memory = GaugeMetricFamily(f"{PREFIX}_worker_memory_bytes", "Unique memory at the last patrol",
                                   labels=["worker"])  # fmt: skip
        for worker in workers:
            if worker["memory_bytes"] is not None:
                memory.add_metric([str(worker["id"])], worker["memory_bytes"])
        yield memory
        oldest = max((w["message_age"] or 0.0 for w in workers), default=0.0)
        for kind, name, help_text, value in (
            (CounterMetricFamily, "workers_spawned", "Workers started", totals["spawned"]),
            (CounterMetricFamily, "worker_crashes", "Workers that died mid-message", totals["crashes"]),
            (GaugeMetricFamily, "oldest_running_message_seconds", "Longest-running handler", oldest),
            (GaugeMetricFamily, "cache_messages", "Deliveries waiting in the master", cache["size"]),
            (GaugeMetricFamily, "cache_capacity", "--max-cache", cache["capacity"]),
            (GaugeMetricFamily, "cache_bytes", "Bodies the master holds", cache["bytes_held"]),
            (GaugeMetricFamily, "unsettled_messages", "Received, not settled", stat["unsettled"]),
            (GaugeMetricFamily, "broker_connected", "1 while connected", int(stat["connected"])),
            (CounterMetricFamily, "broker_recoveries", "New channels or connections after outages",
             stat["recoveries"]),
        ):  # fmt: skip
            yield kind(f"{PREFIX}_{name}", help_text, value=value)


def _answer(
    start_response: StartResponse, status: str, body: bytes, content_type: str = "text/plain; charset=utf-8"
) -> list[bytes]:
    start_response(status, [("Content-Type", content_type), ("Content-Length", str(len(body)))])
    return [body]


def serve(address: tuple[str, int], app: StatusApp) -> Any:
    """Start the server in the master's hub; returns it (`stop()` at the end). OSError
    when the address cannot be bound."""
    from gevent.pywsgi import WSGIServer

    server = WSGIServer(address, app, log=None, error_log=_ErrorLog())
    server.start()
    return server


class _ErrorLog:
    """pywsgi's error log (a file-like object) into our logger."""

    def write(self, text: str) -> None:
        if text.strip():
            logger.warning("http: %s", text.strip())

    def flush(self) -> None:
        pass
