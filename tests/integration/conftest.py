from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import pytest

from tests.proxy import PausableProxy


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "integration" in str(item.fspath):
            item.add_marker(pytest.mark.rabbitmq)


#: One row per scenario that called `tally`, printed after the run.
_TALLY: list[tuple[str, int, int, int, int, int, int]] = []


@pytest.fixture
def tally(request: pytest.FixtureRequest) -> Callable[..., None]:
    """Count a scenario's messages by id for the table at the end of the run: published =
    handled + dead-lettered + queued (never handled) + lost; duplicates are handlings
    beyond one per id, dead letters beyond one per id, and ids handled that are queued
    again (their ack never left)."""

    def record(
        published: Iterable[int], handled: Counter[int], dead: Iterable[int] = (), queued: Iterable[int] = ()
    ) -> None:
        ids, dead = set(published), list(dead)
        done = set(handled) & ids
        dead_ids = set(dead) & ids - done
        queued_ids = set(queued) & ids - done - dead_ids
        lost = len(ids - done - dead_ids - queued_ids)
        duplicates = sum(handled[i] - 1 for i in done) + len(set(queued) & done) + len(dead) - len(set(dead))
        name = request.node.name.removeprefix("test_")
        _TALLY.append((name, len(ids), len(done), len(dead_ids), len(queued_ids), duplicates, lost))

    return record


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if not _TALLY:
        return
    write = terminalreporter.write_line
    terminalreporter.write_sep("-", "messages by id, per scenario, this run")
    row = "{:<68} {:>9} {:>7} {:>4} {:>6} {:>5} {:>4}".format
    write(row("scenario", "published", "handled", "dead", "queued", "dupl.", "lost"))
    for name, *counts in _TALLY:
        write(row(name[:68], *counts))


@pytest.fixture
def proxy() -> Iterator[PausableProxy]:
    """A TCP proxy to the broker that can go silent or cut its links (an outage on cue)."""
    silent = PausableProxy()
    yield silent
    silent.close()
