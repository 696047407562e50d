"""The retry ladder: doubling steps up to the cap, each with a queue name of its own, and
the step a failed attempt or a handler's `Retry(delay=...)` gets."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from speed_gevent.backoff import (
    MAX_STEPS,
    RefusalBackoff,
    delay_queue,
    delay_queue_arguments,
    ladder,
    step_after,
    step_for,
    step_label,
)

delays = st.floats(min_value=0.001, max_value=7 * 86400, allow_nan=False)


def test_the_default_ladder_doubles_from_one_second_to_the_hour():
    steps = ladder(1.0, 3600.0)
    assert steps[:4] == (1000, 2000, 4000, 8000) and steps[-1] == 3_600_000
    assert [delay_queue("jobs", step) for step in steps[:2]] == ["jobs.retry.1s", "jobs.retry.2s"]
    assert delay_queue("jobs", steps[-1]) == "jobs.retry.1h"
    assert len(steps) == 13


def test_no_first_step_means_retries_at_once():
    assert ladder(0, 3600) == ()
    assert step_after((), 3) is None and step_for((), 10) is None


@given(delays, delays)
def test_steps_double_up_to_the_cap_which_ends_the_ladder(first, cap):
    steps = ladder(min(first, cap), max(first, cap))
    assert 1 <= len(steps) <= MAX_STEPS
    assert list(steps) == sorted(set(steps)), "strictly growing"
    assert all(later == 2 * earlier for earlier, later in zip(steps[:-2], steps[1:-1], strict=True))
    assert steps[-1] >= steps[0]
    assert len({delay_queue("q", step) for step in steps}) == len(steps), "one name per step"


@given(delays, delays, st.integers(1, 100))
def test_each_failed_attempt_waits_at_least_as_long_as_the_one_before(first, cap, attempt):
    steps = ladder(min(first, cap), max(first, cap))
    assert step_after(steps, attempt) in steps
    assert step_after(steps, attempt + 1) >= step_after(steps, attempt)


@given(delays, delays, st.floats(min_value=0.0005, max_value=30 * 86400, allow_nan=False))
def test_a_delay_asked_for_gets_the_nearest_step_at_or_above_it_within_the_cap(first, cap, asked):
    steps = ladder(min(first, cap), max(first, cap))
    step = step_for(steps, asked)
    assert step in steps
    if asked * 1000 <= steps[-1]:
        assert step >= asked * 1000
        assert all(other < asked * 1000 for other in steps if other < step)
    else:
        assert step == steps[-1]


def test_no_delay_asked_is_a_retry_at_once_and_odd_floats_never_raise():
    steps = ladder(1, 60)
    assert step_for(steps, 0) is None and step_for(steps, -5) is None
    assert step_for(steps, float("nan")) is None
    assert step_for(steps, float("inf")) == steps[-1]
    assert step_for(steps, 1e306) == steps[-1] and step_for(steps, 1.7e308) == steps[-1]


def test_labels_are_exact():
    assert [step_label(ms) for ms in (1500, 1000, 64000, 120_000, 3_600_000)] == [
        "1500ms", "1s", "64s", "2m", "1h"]  # fmt: skip


def test_a_delay_queue_leads_back_to_its_source_and_on_quorum_at_least_once():
    assert delay_queue_arguments("jobs", 2000, "classic") == {
        "x-message-ttl": 2000, "x-dead-letter-exchange": "", "x-dead-letter-routing-key": "jobs"}  # fmt: skip
    quorum = delay_queue_arguments("jobs", 2000, "quorum")
    assert quorum["x-dead-letter-strategy"] == "at-least-once" and quorum["x-overflow"] == "reject-publish"
    assert quorum["x-queue-type"] == "quorum"


refusal_events = st.lists(st.tuples(st.sampled_from(["a.dead", "b.dead"]), st.floats(0, 30), st.booleans()))


@given(refusal_events)
def test_a_refused_message_never_goes_back_at_once_and_waits_at_most_the_cap(events):
    backoff = RefusalBackoff(first=1.0, cap=60.0)
    now = 0.0
    for target, later, accepted in events:
        now += later
        if accepted:
            backoff.accepted(target)
            assert backoff.refusals_in_a_row(target) == 0
            continue
        before = backoff.refusals_in_a_row(target)
        due = backoff.refused(target, now)
        assert now < due <= now + 60.0
        assert backoff.refusals_in_a_row(target) in (before, before + 1)


def test_refusals_in_a_row_double_the_wait_and_a_burst_counts_once():
    backoff = RefusalBackoff(first=1.0, cap=5.0)
    assert backoff.refused("q.dead", 0.0) == 1.0
    assert backoff.refused("q.dead", 0.5) == 1.0  # the same burst
    assert backoff.refused("q.dead", 1.0) == 3.0
    assert backoff.refused("q.dead", 3.0) == 7.0
    assert backoff.refused("q.dead", 7.0) == 12.0  # the cap
    assert backoff.refused("other.dead", 7.0) == 8.0
    backoff.accepted("q.dead")
    assert backoff.refused("q.dead", 20.0) == 21.0
