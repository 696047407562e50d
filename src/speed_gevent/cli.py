"""The `speed-gevent` command: a thin layer over `Master`, `publish` and `config`.

`main()` is the only place that turns exceptions into exit codes: 0 clean stop, 1 fatal
runtime error, 2 usage or configuration error (one line, no traceback), 3 broker refused
or unreachable. The entry point (`__main__`) has monkey-patched before this is imported.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable
from typing import Any, NoReturn

from . import __version__, earlystop
from .config import ENV_PREFIX, OPTIONS, load_settings, queue_name
from .errors import (
    BrokerError,
    ConfigError,
    ExitCode,
    FatalError,
    QueueMissingError,
    TargetError,
)
from .osproc import set_title
from .urls import check_broker_url, mask_secrets

logger = logging.getLogger("speed_gevent")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.exit(ExitCode.USAGE, f"{self.prog}: error: {message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="speed-gevent", description=__doc__.split("\n")[0])
    parser.add_argument("--version", action="version", version=f"speed-gevent {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    run = commands.add_parser(
        "run",
        help="consume queues with a pool of worker processes",
        description="Consume queues with a pool of preforked workers. Every "
        f"option can also come from {ENV_PREFIX}<NAME> or --config FILE.",
    )
    run.add_argument("target", metavar="TARGET", help="module:callable or module:app")
    run.add_argument("--config", metavar="FILE", help="TOML file with the same option names")
    for option in OPTIONS:
        flags = [option.short, option.flag] if option.short else [option.flag]
        kwargs: dict[str, Any] = {
            "dest": option.attr,
            "default": argparse.SUPPRESS,
            "help": f"{option.help} [{option.env}]",
        }
        if option.switch:
            kwargs["action"] = "store_true"
        else:
            kwargs["metavar"] = option.metavar
            if option.repeatable:
                kwargs["action"] = "append"
        run.add_argument(*flags, **kwargs)

    pub = commands.add_parser("publish", help="publish test messages (confirmed, mandatory)")
    pub.add_argument("queue", metavar="QUEUE")
    pub.add_argument("-b", "--broker", default=os.environ.get(ENV_PREFIX + "BROKER", OPTIONS[0].default))
    pub.add_argument("--count", type=int, default=1, help="how many messages (default 1)")
    body = pub.add_mutually_exclusive_group()
    body.add_argument(
        "--body",
        default='{"n": {n}}',
        help="message body; {n} becomes the message number (default: %(default)s)",
    )
    body.add_argument("--file", help="send this file's bytes as the body")
    pub.add_argument("--queue-type", choices=("classic", "quorum"), default="classic")
    pub.add_argument("--passive", action="store_true", help="the queue must already exist")

    rep = commands.add_parser(
        "replay",
        help="move dead letters back to the queue they failed in",
        description="Move dead letters back to their origin queue, one at a time, confirmed: "
        "an interruption duplicates at most one message and loses none. Our x-speed-* headers "
        "are removed, so the attempt starts again at 1.",
    )
    rep.add_argument("dead_queue", metavar="DEAD_QUEUE", help="e.g. orders.dead")
    rep.add_argument("-b", "--broker", default=os.environ.get(ENV_PREFIX + "BROKER", OPTIONS[0].default))
    rep.add_argument("--to", metavar="QUEUE", help="send them here instead of their origin queue")
    rep.add_argument("--count", type=int, help="replay at most this many (default: all there are)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # The title replaces argv in /proc/<pid>/cmdline at once: `-b URL` holds a password
    # (SPEED_GEVENT_BROKER keeps it out of argv altogether).
    set_title(f"speed-gevent: {args.command}")
    try:
        if args.command == "run":
            return _run(args)
        earlystop.release()
        if earlystop.received():  # 128 + the signal, as if it had not been caught
            return _fail(128 + earlystop.received()[0], f"interrupted before the {args.command} began")
        try:
            return _replay(args) if args.command == "replay" else _publish(args)
        except OSError as exc:  # unreachable, refused, reset: the broker, not us
            return _fail(ExitCode.BROKER, f"cannot reach the broker: {exc.strerror or exc}")
    except (ConfigError, TargetError, QueueMissingError) as exc:
        return _fail(ExitCode.USAGE, str(exc))
    except BrokerError as exc:
        return _fail(ExitCode.BROKER, str(exc))
    except FatalError as exc:
        return _fail(ExitCode.FATAL, str(exc))
    except KeyboardInterrupt:  # INT during `publish` or `replay` (TERM keeps its default there)
        return _fail(ExitCode.INTERRUPTED, "interrupted; what was confirmed so far stays where it went")


def _fail(code: int, message: str) -> int:
    broker = os.environ.get(ENV_PREFIX + "BROKER", "")
    print(f"speed-gevent: error: {mask_secrets(message, broker) if broker else message}", file=sys.stderr)
    return code


def _run(args: argparse.Namespace) -> int:
    from .logsetup import setup_logging
    from .target import parse_target

    parse_target(args.target)
    given = {option.name: getattr(args, option.attr) for option in OPTIONS if hasattr(args, option.attr)}
    config_path = args.config or os.environ.get(ENV_PREFIX + "CONFIG")
    settings = load_settings(args.target, given, os.environ, config_path)
    setup_logging(settings.log_level, settings.log_format, background=True)
    if earlystop.received():
        logging.getLogger(__name__).info("stopped before start: nothing was started")
        return ExitCode.OK
    from .master import Master

    return Master(settings).run()


def _publish(args: argparse.Namespace) -> int:
    from .publish import publish_messages, render_body

    _check("--broker", check_broker_url, args.broker)
    _check("QUEUE", queue_name, args.queue)
    if args.count < 1:
        raise ConfigError(f"--count: expected a whole number ≥ 1, got {args.count}")
    if args.file:
        try:
            with open(args.file, "rb") as handle:
                data = handle.read()
        except OSError as exc:
            raise ConfigError(f"--file: cannot read {args.file!r}: {exc.strerror}") from None
        bodies = [data] * args.count
    else:
        bodies = [render_body(args.body, n) for n in range(1, args.count + 1)]
    confirmed = publish_messages(args.broker, args.queue, bodies, args.queue_type, args.passive)
    print(f"published {confirmed} messages to {args.queue!r} (confirmed by the broker)")
    return ExitCode.OK


def _replay(args: argparse.Namespace) -> int:
    from .replay import replay

    _check("--broker", check_broker_url, args.broker)
    _check("DEAD_QUEUE", queue_name, args.dead_queue)
    if args.to is not None:
        _check("--to", queue_name, args.to)
    if args.count is not None and args.count < 1:
        raise ConfigError(f"--count: expected a whole number ≥ 1, got {args.count}")
    on_terminal = sys.stderr.isatty()

    def progress(done: int, total: int) -> None:
        if on_terminal:
            print(f"\rreplayed {done}/{total}", end="", file=sys.stderr, flush=True)

    try:
        summary = replay(args.broker, args.dead_queue, args.to, args.count, progress)
    finally:
        if on_terminal:
            print(file=sys.stderr)
    print(summary.line())
    return ExitCode.OK


def _check(name: str, check: Callable[[str], Any], value: str) -> None:
    """A value the command line gave, checked: ConfigError naming where it came from."""
    try:
        check(value)
    except ValueError as exc:
        raise ConfigError(f"{name}: {exc}") from None
