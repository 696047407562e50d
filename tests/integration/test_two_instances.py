"""How users scale out: more runners on the same queues, the broker sharing the messages
out. One is SIGKILLed mid-load and started again: every id handled, none lost, and the
only duplicates are what the killed one held unacked (at most its --max-cache)."""

from __future__ import annotations

import os
import signal

import pytest

from tests.conftest import wait_until
from tests.helpers import handled_ids, publish_load, ready_count

pytestmark = pytest.mark.timeout(240)

CACHE = 8


@pytest.mark.parametrize("queue_type", ["classic", "quorum"])
def test_two_runners_one_killed_and_restarted_lose_nothing(
    queue_type, run_recorder, queue_names, tmp_path, tally
):
    queue = queue_names()
    ids = publish_load(queue, 1500, 0.004, queue_type=queue_type)
    options = ("--max-workers", "2", "--max-cache", str(CACHE), "--queue-type", queue_type)
    killed_record, other_record, again_record = (tmp_path / name for name in ("killed", "other", "again"))
    killed = run_recorder(queue, *options, record=killed_record)
    other = run_recorder(queue, *options, record=other_record)
    wait_until(lambda: len(handled_ids(killed_record)) >= 100 and len(handled_ids(other_record)) >= 100, 60,
               message="both runners handling")  # fmt: skip
    os.kill(killed.pid, signal.SIGKILL)
    killed.proc.wait()
    again = run_recorder(queue, *options, record=again_record)

    def everything() -> bool:
        records = (killed_record, other_record, again_record)
        return set().union(*(handled_ids(record) for record in records)) >= set(ids)

    wait_until(everything, 120, message="every id handled")
    for runner in (other, again):
        runner.proc.send_signal(signal.SIGTERM)
    for runner in (other, again):
        assert runner.wait(60) == 0, runner.output()[-3000:]
    first_life = handled_ids(killed_record)
    handled = first_life + handled_ids(other_record) + handled_ids(again_record)
    tally(ids, handled, dead=[], queued=[])
    duplicated = {i for i, n in handled.items() if n > 1}
    assert duplicated <= set(first_life), "only the killed runner's unacked messages come twice"
    assert sum(handled[i] - 1 for i in duplicated) <= CACHE
    assert len(handled_ids(other_record)) >= 100 and len(handled_ids(again_record)) > 0
    assert ready_count(queue) == 0
