"""A master, run through the Python API, whose USR1 callback makes the broker close its
channel: it rejects a delivery tag the channel never had (PRECONDITION_FAILED, unknown
delivery tag), as a broker-side channel error mid-run would.

    python -m tests.apps.channel_breaker QUEUE
"""

from __future__ import annotations

from gevent import monkey

monkey.patch_all()

import logging  # noqa: E402
import signal  # noqa: E402
import sys  # noqa: E402

from speed_gevent.delivery import Delivery  # noqa: E402
from speed_gevent.master import Master  # noqa: E402


def break_channel(signum: int, master: Master) -> None:
    session = master._session
    bogus = Delivery(0, session.generation, 10**9, "", "", "", False, b"", {}, 0.0, None)
    session.reject(bogus, requeue=True)


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    master = Master.create(
        "tests.apps.recorder:handle", queue=sys.argv[1], max_workers=2, exit_when_idle="3s"
    )
    master.add_signal(signal.SIGUSR1, break_channel)
    return master.run()


if __name__ == "__main__":
    sys.exit(main())
