"""Naming the argument a refused declare differs in, from RabbitMQ's own words."""

from __future__ import annotations

import pytest
from amqp.exceptions import ChannelError, NotFound, error_for_code

from speed_gevent.topology import HOME_NODE_DOWN, differing_argument, queue_arguments, queue_exists

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


class RefusingChannel:
    def __init__(self, error: Exception) -> None:
        self.error = error
        self.is_open = False  # close_channel has nothing to close

    def queue_declare(self, **kwargs: object) -> None:
        raise self.error


class OneChannelConnection:
    def __init__(self, error: Exception) -> None:
        self.error = error

    def channel(self) -> RefusingChannel:
        return RefusingChannel(self.error)


def test_a_queue_on_a_cluster_node_that_is_away_is_not_taken_for_missing():
    """--passive must not say 'does not exist' (exit 2) for a queue whose node is down:
    the NOT_FOUND goes on, to be retried as an outage."""
    text = f"NOT_FOUND - home node 'rabbit@b' of durable queue 'q' in vhost '/' {HOME_NODE_DOWN}"
    away = error_for_code(404, text, (50, 10), ChannelError)
    with pytest.raises(NotFound):
        queue_exists(OneChannelConnection(away), "q")
    missing = error_for_code(404, "NOT_FOUND - no queue 'q' in vhost '/'", (50, 10), ChannelError)
    assert queue_exists(OneChannelConnection(missing), "q") is False
