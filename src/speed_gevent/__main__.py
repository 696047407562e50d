"""Console entry point: monkey-patch first, then hand over to the CLI.

gevent must patch the standard library before amqp imports `socket`, so this
module imports nothing of ours but the CLI, and that only after `patch_all()`. A TERM
or INT that arrives meanwhile is recorded (`earlystop`), not lost and not fatal.
"""

from __future__ import annotations

import sys


def main() -> None:
    from speed_gevent import earlystop

    earlystop.catch()
    from gevent import monkey

    monkey.patch_all()
    from speed_gevent.cli import main as cli_main

    sys.exit(cli_main())


if __name__ == "__main__":
    main()
