"""Settings of `speed-gevent run`: one option table feeds the CLI, the environment
(`SPEED_GEVENT_<NAME>`), the TOML file (`--config`) and the README.

Precedence is command line > environment > file > defaults. Every error names the
option and where its value came from. Pure: no gevent, no kombu, no I/O but reading the
TOML file the user named.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from typing import Any

from .backoff import LONGEST_SUFFIX, MAX_STEP_MS
from .errors import ConfigError
from .httpaddr import parse_address
from .units import parse_duration, parse_size
from .urls import check_broker_url

ENV_PREFIX = "SPEED_GEVENT_"

#: Cached messages allowed per worker of --max-workers when --max-cache is not given.
#: Chosen by benchmark: with 4 the broker's prefetch ran dry between acks (no-op, 2
#: workers: 0.72x raw kombu, median of 5), with 16 it did not (1.17x; 32 gave no more).
CACHE_PER_WORKER = 16

#: RabbitMQ's limit on queue names, in bytes.
MAX_QUEUE_NAME_BYTES = 255

#: Longest value quoted back in an error, in characters.
SHOWN_MAX = 80

#: Suffix of the dead-letter queue of each source queue.
DEAD_SUFFIX = ".dead"


def _int_at_least(minimum: int) -> Callable[[object], int]:
    def parse(value: object) -> int:
        if isinstance(value, bool):
            raise ValueError(f"expected a whole number ≥ {minimum}")
        try:
            number = int(str(value).strip()) if not isinstance(value, int) else value
        except ValueError:
            raise ValueError(f"expected a whole number ≥ {minimum}") from None
        if number < minimum:
            raise ValueError(f"expected a whole number ≥ {minimum}")
        return number

    return parse


def _optional_duration(value: object) -> float | None:
    """A duration where 0 or `off` means the feature is off."""
    if isinstance(value, str) and value.strip().lower() in ("off", "none", ""):
        return None
    seconds = parse_duration(value)
    return seconds or None


def _duration_or_zero(value: object) -> float:
    if isinstance(value, str) and value.strip().lower() in ("off", "none"):
        return 0.0
    return parse_duration(value)


def _positive_duration(value: object) -> float:
    seconds = parse_duration(value)
    if seconds <= 0:
        raise ValueError("expected a duration above zero")
    return seconds


#: AMQP carries the heartbeat as a 16-bit number of seconds.
MAX_HEARTBEAT = 65535


def _heartbeat(value: object) -> float:
    """Whole seconds: AMQP negotiates the heartbeat in seconds, so 0.5s would reach the
    broker as 0 (off) while the client still expected one every half second."""
    seconds = parse_duration(value)
    if seconds != int(seconds) or seconds > MAX_HEARTBEAT:
        raise ValueError(f"expected whole seconds up to {MAX_HEARTBEAT} (AMQP's 16-bit count), or 0 for off")
    return seconds


def _optional_size(value: object) -> int | None:
    if isinstance(value, str) and value.strip().lower() in ("off", "none", ""):
        return None
    return parse_size(value) or None


def _optional_count(value: object) -> int | None:
    if isinstance(value, str) and value.strip().lower() in ("off", "none", ""):
        return None
    return _int_at_least(0)(value) or None


def _choice(*choices: str) -> Callable[[object], str]:
    def parse(value: object) -> str:
        text = str(value).strip().lower()
        if text not in choices:
            raise ValueError(f"expected one of {', '.join(choices)}")
        return text

    return parse


def _flag(value: object) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off", ""):
        return False
    raise ValueError("expected true or false")


def _name(value: object) -> str:
    text = str(value).strip()
    if not text:
        raise ValueError("must not be empty")
    return text


def queue_name(value: object) -> str:
    """A queue we may consume and declare: not empty, not `amq.*`, short enough for the
    names of its own `.dead` and delay queues."""
    name = str(value)
    if not name.strip():
        raise ValueError("queue name must not be empty")
    if name.startswith("amq."):
        raise ValueError(f"queue name {name!r} starts with 'amq.', which RabbitMQ reserves")
    if len((name + max(DEAD_SUFFIX, LONGEST_SUFFIX, key=len)).encode()) > MAX_QUEUE_NAME_BYTES:
        raise ValueError(f"queue name {name[:40]!r}... is too long")
    return name


def _dead_letter_queue(value: object) -> str | None:
    """One shared dead-letter queue (None: `<queue>.dead` for each source queue)."""
    name = str(value)
    if not name.strip():
        return None
    if name.startswith("amq."):
        raise ValueError(f"queue name {name!r} starts with 'amq.', which RabbitMQ reserves")
    if len(name.encode()) > MAX_QUEUE_NAME_BYTES:
        raise ValueError(f"queue name {name[:40]!r}... is longer than {MAX_QUEUE_NAME_BYTES} bytes")
    return name


def _http(value: object) -> tuple[str, int] | None:
    """Where `--http` listens: None (off), or (host, port); 127.0.0.1 unless a host is given."""
    text = str(value).strip()
    if text.lower() in ("", "off", "none", "0"):
        return None
    return parse_address(text)


def _queues(value: object) -> tuple[str, ...]:
    items = value if isinstance(value, list | tuple) else str(value).split(",")
    return tuple(queue_name(item) for item in items)


def _broker(value: object) -> str:
    return check_broker_url(str(value).strip())


@dataclass(frozen=True)
class Option:
    """One setting: its long option, parser, default and help. The env name derives from it."""

    name: str
    parse: Callable[[object], Any]
    default: Any
    help: str
    short: str | None = None
    metavar: str | None = None
    repeatable: bool = False
    switch: bool = False

    @property
    def attr(self) -> str:
        return self.name.replace("-", "_")

    @property
    def env(self) -> str:
        return ENV_PREFIX + self.attr.upper()

    @property
    def flag(self) -> str:
        return "--" + self.name


OPTIONS: tuple[Option, ...] = (
    Option("broker", _broker, "amqp://guest:guest@localhost:5672//", "AMQP broker URL",
           short="-b", metavar="URL"),
    Option("queue", _queues, (), "queue to consume; repeatable (env: comma-separated)",
           short="-q", metavar="NAME", repeatable=True),
    Option("passive", _flag, False, "queues must already exist; without it they are declared",
           switch=True),
    Option("queue-type", _choice("classic", "quorum"), "classic", "type used when declaring",
           metavar="classic|quorum"),
    Option("min-workers", _int_at_least(1), 1, "workers kept even when idle", metavar="N"),
    Option("max-workers", _int_at_least(1), os.cpu_count() or 1, "upper bound of the pool",
           metavar="N"),
    Option("max-cache", _int_at_least(1), None,
           f"most unacked messages held, all queues together (default {CACHE_PER_WORKER} "
           "per worker)", metavar="N"),
    Option("max-cache-bytes", _optional_size, 64 * 2**20,
           "pause consuming while the message bodies held exceed this; again at half (0: off)",
           metavar="SIZE"),
    Option("max-idle", _optional_duration, 60.0,
           "retire a worker idle this long, down to --min-workers (0: never)", metavar="DURATION"),
    Option("patrol-interval", _positive_duration, 60.0, "how often the patrol runs",
           metavar="DURATION"),
    Option("max-worker-memory", _optional_size, None,
           "recycle a worker above this much unique memory (e.g. 512MB, 1GiB)", metavar="SIZE"),
    Option("max-messages", _optional_count, None, "recycle a worker after this many messages",
           metavar="N"),
    Option("timeout", _optional_duration, None,
           "kill a handler running longer; the message counts a failed attempt", metavar="DURATION"),
    Option("graceful-timeout", parse_duration, 30.0, "time in-flight handlers get on SIGTERM",
           metavar="DURATION"),
    Option("max-retries", _int_at_least(0), 3, "attempts after the first before dead-lettering",
           metavar="N"),
    Option("retry-delay", _duration_or_zero, 1.0,
           "wait before the first retry, doubled for each one after it (0: retry at once)",
           metavar="DURATION"),
    Option("dead-letter-queue", _dead_letter_queue, None,
           "one dead-letter queue for every source queue (default: <queue>.dead each)", metavar="NAME"),
    Option("retry-delay-max", _positive_duration, 3600.0, "longest wait before a retry",
           metavar="DURATION"),
    Option("heartbeat", _heartbeat, 30.0, "AMQP heartbeat asked of the broker, whole seconds (0: off)",
           metavar="DURATION"),
    Option("consumer-timeout", _positive_duration, 1800.0,
           "the broker's delivery-ack timeout, mirrored", metavar="DURATION"),
    Option("connect-timeout", _optional_duration, None,
           "give up (exit 3) if the broker cannot be reached this long (default: retry forever)",
           metavar="DURATION"),
    Option("name", _name, "default", "shown in process titles and stats", metavar="NAME"),
    Option("exit-when-idle", _optional_duration, None,
           "stop gracefully after no message arrived for this long (a retry we delayed counts "
           "as one to come)", metavar="DURATION"),
    Option("http", _http, None,
           "serve /livez, /readyz, /stats and /metrics at HOST:PORT (127.0.0.1 unless a host "
           "is given; 0.0.0.0 in the container image)", metavar="HOST:PORT"),
    Option("log-level", _choice("debug", "info", "warning", "error"), "info", "log level",
           metavar="LEVEL"),
    Option("log-format", _choice("text", "json"), "text", "log format", metavar="text|json"),
)  # fmt: skip

OPTIONS_BY_NAME = {option.name: option for option in OPTIONS}


@dataclass(frozen=True)
class Settings:
    """Validated settings of one `run`. Built once, passed explicitly, never mutated."""

    target: str
    broker: str
    queue: tuple[str, ...]
    passive: bool
    queue_type: str
    min_workers: int
    max_workers: int
    max_cache: int
    max_cache_bytes: int | None
    max_idle: float | None
    patrol_interval: float
    max_worker_memory: int | None
    max_messages: int | None
    timeout: float | None
    graceful_timeout: float
    max_retries: int
    retry_delay: float
    retry_delay_max: float
    dead_letter_queue: str | None
    heartbeat: float
    consumer_timeout: float
    connect_timeout: float | None
    name: str
    exit_when_idle: float | None
    http: tuple[str, int] | None
    log_level: str
    log_format: str

    @property
    def queues(self) -> tuple[str, ...]:
        return self.queue

    def prefetch_per_queue(self) -> dict[str, int]:
        """Split `max_cache` over the queues so the parts add up to it (each part ≥ 1)."""
        return split_prefetch(self.max_cache, self.queue)


def split_prefetch(total: int, queues: tuple[str, ...]) -> dict[str, int]:
    """Per-consumer prefetch counts adding up to `total`; the first queues take the remainder."""
    base, extra = divmod(total, len(queues))
    return {queue: base + (1 if index < extra else 0) for index, queue in enumerate(queues)}


def _source_of(option: Option, origin: str) -> str:
    if origin == "cli":
        return "from the command line"
    if origin == "env":
        return f"from {option.env}"
    if origin == "default":
        return "default"
    return f"from config file {origin!r}"


def _parse(option: Option, raw: object, origin: str) -> Any:
    try:
        return option.parse(raw)
    except ValueError as exc:
        shown = repr(raw)
        if len(shown) > SHOWN_MAX:
            shown = shown[: SHOWN_MAX - 3] + "..."
        detail = str(exc) if option.name == "broker" else f"{exc}, got {shown}"
        raise ConfigError(f"{option.flag}: {detail} ({_source_of(option, origin)})") from None


def read_config_file(path: str) -> dict[str, Any]:
    """The TOML file's keys, checked against the option table."""
    try:
        with open(path, "rb") as handle:
            data = tomllib.load(handle)
    except OSError as exc:
        raise ConfigError(f"--config: cannot read {path!r}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"--config: {path!r} is not valid TOML: {exc}") from None
    unknown = sorted(set(data) - set(OPTIONS_BY_NAME))
    if unknown:
        raise ConfigError(f"--config: unknown key {unknown[0]!r} in {path!r}")
    return data


def load_settings(
    target: str,
    cli: Mapping[str, object],
    env: Mapping[str, str],
    config_path: str | None = None,
) -> Settings:
    """Merge CLI > env > file > defaults, parse each value once, then check cross-field rules.

    `cli` holds only the options given on the command line, keyed by long name.
    """
    from_file = read_config_file(config_path) if config_path else {}
    values: dict[str, Any] = {}
    origins: dict[str, str] = {}
    for option in OPTIONS:
        if option.name in cli:
            raw, origin = cli[option.name], "cli"
        elif option.env in env:
            raw, origin = env[option.env], "env"
        elif option.name in from_file:
            raw, origin = from_file[option.name], str(config_path)
        else:
            values[option.attr], origins[option.attr] = option.default, "default"
            continue
        values[option.attr] = _parse(option, raw, origin)
        origins[option.attr] = origin
    return _cross_check(target, values, origins)


def _refused(name: str, why: str, values: dict[str, Any], origins: dict[str, str]) -> ConfigError:
    """`--NAME: <why>, got <value> (<where it came from>)`."""
    option = OPTIONS_BY_NAME[name]
    value = values[option.attr]
    shown = f"{value:.10g}s" if isinstance(value, float) else str(value)
    return ConfigError(f"{option.flag}: {why}, got {shown} ({_source_of(option, origins[option.attr])})")


def _cross_check(target: str, values: dict[str, Any], origins: dict[str, str]) -> Settings:
    queue = OPTIONS_BY_NAME["queue"]
    if not values["queue"]:
        raise ConfigError(f"{queue.flag}: at least one queue is required (or set {queue.env})")
    if len(set(values["queue"])) != len(values["queue"]):
        raise ConfigError(f"{queue.flag}: a queue is named twice ({_source_of(queue, origins['queue'])})")
    queue_count = len(values["queue"])
    if values["max_cache"] is None:
        values["max_cache"] = max(queue_count, CACHE_PER_WORKER * values["max_workers"])
    elif values["max_cache"] < queue_count:
        raise _refused("max-cache", f"must be at least the number of queues ({queue_count})", values, origins)
    if values["min_workers"] > values["max_workers"]:
        why = f"must be at least --min-workers ({values['min_workers']})"
        raise _refused("max-workers", why, values, origins)
    if values["timeout"] is not None and values["timeout"] >= values["consumer_timeout"]:
        limit = values["consumer_timeout"]
        why = f"must be below --consumer-timeout ({limit:g}s) or RabbitMQ closes the channel"
        raise _refused("timeout", why, values, origins)
    if values["retry_delay_max"] * 1000 > MAX_STEP_MS:
        why = f"at most {MAX_STEP_MS // 1000}s (RabbitMQ's longest message TTL)"
        raise _refused("retry-delay-max", why, values, origins)
    if values["retry_delay"] > values["retry_delay_max"]:
        why = f"must be at least --retry-delay ({values['retry_delay']:g}s)"
        raise _refused("retry-delay-max", why, values, origins)
    if values["dead_letter_queue"] in values["queue"]:
        why = "must not be one of the queues consumed (a dead letter would be handled again)"
        raise _refused("dead-letter-queue", why, values, origins)
    names = {field.name for field in fields(Settings)}
    return Settings(target=target, **{key: value for key, value in values.items() if key in names})
