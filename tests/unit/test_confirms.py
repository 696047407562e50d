"""Confirms: every publish is settled once, and refused exactly as often as the broker
returned or nacked publishes that anyone could tell apart."""

from __future__ import annotations

from collections import Counter

from hypothesis import given
from hypothesis import strategies as st

from speed_gevent.confirms import Confirms

publishes = st.lists(
    st.tuples(st.sampled_from(["q", "q.dead"]), st.sampled_from([b"a", b"b"]), st.booleans()),
    min_size=1,
    max_size=30,
)


def recorder(log: list, seq: int):
    return lambda ok, why: log.append((seq, ok, why))


@given(publishes, st.randoms(use_true_random=False))
def test_each_publish_is_settled_once_and_returns_are_counted_per_kind(plan, rnd):
    confirms = Confirms()
    log: list = []
    for n, (key, body, _) in enumerate(plan, 1):
        assert confirms.published(key, body, {"h": 1}, recorder(log, n)) == n
    # The broker: a return before the ack of the same publish, returns in publish order;
    # acks in any order otherwise.
    acks = list(range(1, len(plan) + 1))
    rnd.shuffle(acks)
    returned = [n for n, (_, _, is_returned) in enumerate(plan, 1) if is_returned]
    for tag in acks:
        while returned and returned[0] <= tag:
            seq = returned.pop(0)
            key, body, _ = plan[seq - 1]
            assert confirms.returned(key, body, {"h": 1}, "NO_ROUTE") is not None
        for on_confirm, ok, why in confirms.settled(tag, False, True):
            on_confirm(ok, why)
    assert len(confirms) == 0
    assert sorted(seq for seq, _, _ in log) == list(range(1, len(plan) + 1))
    refused = Counter((plan[seq - 1][0], plan[seq - 1][1]) for seq, ok, _ in log if not ok)
    expected = Counter((key, body) for key, body, is_returned in plan if is_returned)
    assert refused == expected


def test_a_return_is_matched_by_queue_body_and_headers_and_not_by_a_header_of_ours():
    confirms = Confirms()
    log: list = []
    confirms.published("q.dead", b"same", {"x-speed-attempt": 1}, recorder(log, 1))
    confirms.published("q.dead", b"same", {"x-speed-attempt": 2}, recorder(log, 2))
    confirms.published("q", b"same", {"x-speed-attempt": 2}, recorder(log, 3))
    assert confirms.returned("q.dead", b"same", {"x-speed-attempt": 2}, "NO_ROUTE") == 2
    for on_confirm, ok, why in confirms.settled(3, True, True):
        on_confirm(ok, why)
    assert log == [(1, True, ""), (2, False, "queue 'q.dead' did not take it: NO_ROUTE"), (3, True, "")]


def test_a_nack_refuses_and_a_new_channel_numbers_from_one():
    confirms = Confirms()
    log: list = []
    confirms.published("q", b"x", None, recorder(log, 1))
    confirms.published("q", b"y", None, recorder(log, 2))
    for on_confirm, ok, why in confirms.settled(2, True, False):
        on_confirm(ok, why)
    assert log == [(1, False, "the broker nacked it"), (2, False, "the broker nacked it")]
    assert confirms.returned("q", b"x", None, "NO_ROUTE") is None  # nothing pending matches
    confirms.published("q", b"z", None, recorder(log, 3))
    confirms.clear()
    assert len(confirms) == 0
    assert confirms.published("q", b"z", None, recorder(log, 4)) == 1
