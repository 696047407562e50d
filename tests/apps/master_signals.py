"""A master, run through the Python API, with callbacks on signals outside the built-in
set (USR2, WINCH) and on a built-in one (USR1); each callback appends its signal's name
to SG_SIGNALS. Registering SIGKILL is refused, and the refusal is recorded too.

    python -m tests.apps.master_signals QUEUE
"""

from __future__ import annotations

from gevent import monkey

monkey.patch_all()

import logging  # noqa: E402
import os  # noqa: E402
import signal  # noqa: E402
import sys  # noqa: E402

from speed_gevent.master import Master  # noqa: E402


def record(text: str) -> None:
    with open(os.environ["SG_SIGNALS"], "a") as out:
        out.write(text + "\n")


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    master = Master.create("tests.apps.recorder:handle", queue=sys.argv[1], max_workers=1)
    for signum in (signal.SIGUSR2, signal.SIGWINCH, signal.SIGUSR1):
        master.add_signal(signum, lambda n, m: record(signal.Signals(n).name))
    try:
        master.add_signal(signal.SIGKILL, lambda n, m: None)
    except ValueError as exc:
        record(f"refused: {exc}")
    return master.run()


if __name__ == "__main__":
    sys.exit(main())
