"""Console entry point: monkey-patch first, then hand over to the CLI.

gevent must patch the standard library before amqp imports `socket`, so this
module imports nothing of ours but the CLI, and that only after `patch_all()`. A TERM
or INT that arrives meanwhile is recorded (`earlystop`), not lost and not fatal.
"""

from __future__ import annotations

import sys


def _patch_all() -> None:
    """gevent's `patch_all`, without its scan for patch plugins.

    The scan reads every installed distribution's metadata through importlib.metadata,
    which leaves about 2.5 MB of imports (email, zipfile, csv, ...) in the master for
    good, for plugins that nothing we ship or document uses. gevent looks the scan up on
    its `events` module at each patch, so it is swapped for the plain event notification
    only while patching (pinned and tested: tests/process/test_entrypoint.py)."""
    import gevent.events
    from gevent import monkey

    scan = gevent.events.notify_and_call_entry_points
    gevent.events.notify_and_call_entry_points = gevent.events.notify
    try:
        monkey.patch_all()
    finally:
        gevent.events.notify_and_call_entry_points = scan


def main() -> None:
    from speed_gevent import earlystop

    earlystop.catch()
    _patch_all()
    from speed_gevent.cli import main as cli_main

    sys.exit(cli_main())


if __name__ == "__main__":
    main()
