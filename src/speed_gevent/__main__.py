"""Console entry point: monkey-patch first, then hand over to the CLI.

gevent must patch the standard library before amqp imports `socket`, so this
module imports nothing of ours but the CLI, and that only after `patch_all()`.

Until the master installs its own handlers, TERM and INT raise KeyboardInterrupt, which
the CLI turns into exit 0: a stop that arrives while the interpreter is still importing
is a clean stop before start, not a kill with status 143.
"""

from __future__ import annotations

import signal
import sys


def _stop_before_start(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main() -> None:
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, _stop_before_start)
    try:
        from gevent import monkey

        monkey.patch_all()
        from speed_gevent.cli import main as cli_main
    except KeyboardInterrupt:
        sys.exit(0)
    sys.exit(cli_main())


if __name__ == "__main__":
    main()
