from __future__ import annotations

import signal

import pytest

from speed_gevent.config import load_settings, split_prefetch
from speed_gevent.errors import ConfigError
from speed_gevent.signals import uncatchable
from speed_gevent.units import parse_duration, parse_size

T = "app:handle"


def test_defaults_with_one_queue():
    s = load_settings(T, {"queue": [["a"]][0]}, {})
    assert s.queues == ("a",)
    assert s.broker == "amqp://guest:guest@localhost:5672//"
    assert s.heartbeat == 30.0 and s.graceful_timeout == 30.0 and s.max_retries == 3
    assert s.max_cache == max(1, 16 * s.max_workers)
    assert s.exit_when_idle is None and s.connect_timeout is None
    assert s.retry_delay == 1.0 and s.retry_delay_max == 3600.0


def test_precedence_cli_over_env_over_file_over_default(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('max-workers = 3\nname = "file"\nheartbeat = "10s"\nqueue = ["f1", "f2"]\n')
    env = {"SPEED_GEVENT_MAX_WORKERS": "5", "SPEED_GEVENT_QUEUE": "e1,e2"}
    s = load_settings(T, {"max-workers": "7"}, env, str(path))
    assert s.max_workers == 7  # cli
    assert s.queues == ("e1", "e2")  # env (comma-separated)
    assert s.name == "file" and s.heartbeat == 10.0  # file
    assert s.graceful_timeout == 30.0  # default


@pytest.mark.parametrize(
    "cli, env, message",
    [
        (
            {"queue": ["a"], "max-workers": "abc"},
            {},
            r"--max-workers: expected a whole number ≥ 1, got 'abc' \(from the command line\)",
        ),
        (
            {"queue": ["a"]},
            {"SPEED_GEVENT_MAX_WORKERS": "0"},
            r"--max-workers: .* \(from SPEED_GEVENT_MAX_WORKERS\)",
        ),
        ({"queue": ["a"], "heartbeat": "soon"}, {}, r"--heartbeat: expected a duration"),
        ({"queue": ["a"], "heartbeat": "0.5s"}, {}, r"--heartbeat: expected whole seconds"),
        ({"queue": ["a"], "heartbeat": "1500ms"}, {}, r"--heartbeat: expected whole seconds"),
        ({"queue": ["a"], "heartbeat": "70000s"}, {}, r"--heartbeat: expected whole seconds up to 65535"),
        ({"queue": ["a"], "graceful-timeout": "-1s"}, {}, r"--graceful-timeout"),
        ({}, {}, r"--queue: at least one queue is required"),
        ({"queue": [""]}, {}, r"--queue: queue name must not be empty"),
        ({"queue": ["amq.foo"]}, {}, r"--queue: .*starts with 'amq.'"),
        ({"queue": ["a", "a"]}, {}, r"--queue: a queue is named twice"),
        (
            {"queue": ["a", "b", "c"], "max-cache": "2"},
            {},
            r"--max-cache: must be at least the number of queues \(3\)",
        ),
        ({"queue": ["a"], "broker": "http://x"}, {}, r"--broker: malformed URL .*scheme"),
        ({"queue": ["a"], "broker": "amqp://u:secret@host:99999//"}, {}, r"--broker: malformed URL .*port"),
        ({"queue": ["a"], "queue-type": "stream"}, {}, r"--queue-type: expected one of classic, quorum"),
        ({"queue": ["a"], "log-level": "loud"}, {}, r"--log-level"),
        ({"queue": ["a"], "retry-delay": "-1s"}, {}, r"--retry-delay: "),
        ({"queue": ["a"], "retry-delay-max": "0"}, {}, r"--retry-delay-max: expected a duration above zero"),
        (
            {"queue": ["a"], "retry-delay": "10m"},
            {"SPEED_GEVENT_RETRY_DELAY_MAX": "5m"},
            r"--retry-delay-max: must be at least --retry-delay \(600s\), got 300s \(from SPEED_GEVENT_RETRY",
        ),
        ({"queue": ["a"], "retry-delay-max": "2000h"}, {}, r"--retry-delay-max: at most 4294967s"),
    ],
)
def test_bad_values_name_the_option_and_source(cli, env, message):
    with pytest.raises(ConfigError, match=message):
        load_settings(T, cli, env)


def test_broker_errors_never_show_the_password():
    with pytest.raises(ConfigError) as info:
        load_settings(T, {"queue": ["a"], "broker": "amqp://u:hunter2@host:99999//"}, {})
    assert "hunter2" not in str(info.value)


def test_config_file_errors(tmp_path):
    with pytest.raises(ConfigError, match=r"--config: cannot read .*missing.toml"):
        load_settings(T, {"queue": ["a"]}, {}, str(tmp_path / "missing.toml"))
    bad = tmp_path / "bad.toml"
    bad.write_text("max-workers = \n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_settings(T, {"queue": ["a"]}, {}, str(bad))
    unknown = tmp_path / "unknown.toml"
    unknown.write_text("max-wrokers = 2\n")
    with pytest.raises(ConfigError, match="unknown key 'max-wrokers'"):
        load_settings(T, {"queue": ["a"]}, {}, str(unknown))
    typed = tmp_path / "typed.toml"
    typed.write_text("queue = ['a']\nmax-workers = 'many'\n")
    with pytest.raises(ConfigError, match=r"--max-workers: .* \(from config file"):
        load_settings(T, {}, {}, str(typed))


@pytest.mark.parametrize("text, seconds", [
    ("30", 30.0), ("30s", 30.0), ("0.5s", 0.5), ("500ms", 0.5), ("5m", 300.0), ("1h", 3600.0),
    (2, 2.0), (" 7 s ", 7.0), (".25s", 0.25),
])  # fmt: skip
def test_durations(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "abc", "5 minutes", "-1", "1d", True])
def test_bad_durations(text):
    with pytest.raises(ValueError):
        parse_duration(text)


@pytest.mark.parametrize("text, size", [
    ("512MB", 512 * 10**6), ("1GB", 10**9), ("512MiB", 512 * 2**20), ("1GiB", 2**30),
    ("100", 100), (4096, 4096), ("1.5kB", 1500),
])  # fmt: skip
def test_sizes(text, size):
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["", "big", "1PB", "-5MB", False])
def test_bad_sizes(text):
    with pytest.raises(ValueError):
        parse_size(text)


@pytest.mark.parametrize("total, queues, parts", [
    (8, ("a",), [8]), (8, ("a", "b", "c"), [3, 3, 2]), (3, ("a", "b", "c"), [1, 1, 1]),
])  # fmt: skip
def test_prefetch_split_adds_up(total, queues, parts):
    split = split_prefetch(total, queues)
    assert list(split.values()) == parts and sum(split.values()) == total


@pytest.mark.parametrize("signum, why", [
    (signal.SIGKILL, "SIGKILL cannot be caught"),
    (signal.SIGSTOP, "SIGSTOP cannot be caught"),
    (signal.SIGCHLD, "SIGCHLD belongs to gevent's child watcher"),
    (999, "999 is not a signal"),
    (signal.SIGSEGV, "a fault in the master itself"),
    (signal.SIGRTMIN + 2, None),
    (signal.SIGUSR2, None),
    (signal.SIGWINCH, None),
])  # fmt: skip
def test_which_signals_a_master_callback_may_take(signum, why):
    found = uncatchable(signum)
    assert found == why if why is None else why in found
