"""`Settler`: carries out the policy's decision for a finished attempt on the broker.

Ack on success; otherwise republish (to the source queue for a retry, to the dead-letter
queue at the end) and ack the original only once the broker confirmed the republish. A
republish the broker refused sends the original back unacked, so it is never lost.
"""

from __future__ import annotations

import datetime as dt
import logging

from .broker import BrokerSession
from .delivery import Delivery
from .policy import (
    Action,
    Decision,
    Failure,
    dead_letter_headers,
    dead_letter_queue,
    decide,
    retry_headers,
)
from .stats import Counters

logger = logging.getLogger(__name__)


class Settler:
    def __init__(self, session: BrokerSession, counters: Counters, max_retries: int) -> None:
        self._session = session
        self._counters = counters
        self._max_retries = max_retries

    def settle(self, delivery: Delivery, failure: Failure | None) -> None:
        decision = decide(failure, delivery.attempt, self._max_retries)
        if decision.action is Action.ACK:
            self._session.ack(delivery)
            self._counters.acked += 1
            return
        assert failure is not None
        properties = dict(delivery.properties)
        properties.setdefault("delivery_mode", 2)
        if decision.action is Action.RETRY:
            target = delivery.queue
            properties["application_headers"] = retry_headers(delivery.headers, delivery.attempt)
        else:
            target = dead_letter_queue(delivery.queue)
            properties["application_headers"] = dead_letter_headers(
                delivery.headers,
                failure,
                delivery.attempt,
                delivery.queue,
                delivery.exchange,
                delivery.routing_key,
                dt.datetime.now(dt.UTC),
            )
        self._session.publish(
            target,
            delivery.body,
            properties,
            lambda ok, why: self._republished(delivery, decision, target, ok, why),
        )

    def give_back(self, delivery: Delivery) -> None:
        """Return a delivery to its queue unacked: not a failed attempt."""
        self._session.reject(delivery, requeue=True)
        self._counters.requeued += 1

    def _republished(self, delivery: Delivery, decision: Decision, target: str, ok: bool, why: str) -> None:
        failure = decision.failure
        assert failure is not None
        if not ok:
            logger.error(
                "could not republish delivery %s to %r (%s); the original goes back to %r",
                delivery.id,
                target,
                why,
                delivery.queue,
            )
            self.give_back(delivery)
            return
        self._session.ack(delivery)
        self._counters.acked += 1
        if decision.action is Action.RETRY:
            self._counters.retried += 1
            logger.warning(
                "delivery %s from %r failed attempt %d (%s: %s); retrying",
                delivery.id,
                delivery.queue,
                delivery.attempt,
                failure.error_type,
                failure.message,
            )
        else:
            self._counters.dead_lettered += 1
            logger.warning(
                "delivery %s from %r dead-lettered to %r after attempt %d: %s: %s",
                delivery.id,
                delivery.queue,
                target,
                delivery.attempt,
                failure.error_type,
                failure.message,
            )
