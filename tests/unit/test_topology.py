"""Naming the argument a refused declare differs in, from RabbitMQ's own words."""

from __future__ import annotations

from speed_gevent.topology import differing_argument, queue_arguments

REFUSAL = (
    "PRECONDITION_FAILED - inequivalent arg 'x-max-priority' for queue 'jobs' in vhost '/': "
    "received none but current is the value '10' of type 'signedint'"
)


def test_the_argument_that_differs_is_named_with_both_values():
    assert differing_argument(REFUSAL) == (
        "x-max-priority: the queue has the value '10' of type 'signedint', we sent none"
    )


def test_another_refusal_is_passed_on_as_the_broker_said_it():
    text = "PRECONDITION_FAILED - something else"
    assert differing_argument(text) == text


def test_only_quorum_queues_get_a_type_argument():
    assert queue_arguments("quorum") == {"x-queue-type": "quorum"}
    assert queue_arguments("classic") is None
