"""Every greenlet of the master is started through its linked spawner, so one that dies
unexpectedly stops the master with one clear line instead of stalling silently."""

from __future__ import annotations

import re
from pathlib import Path

SRC = Path(__file__).resolve().parents[2] / "src" / "speed_gevent"
BARE = re.compile(r"gevent\.spawn|spawn_later|Greenlet\(|\.spawn_raw|gevent\.Timeout\(.*\)\.start")


def test_no_greenlet_is_started_outside_the_masters_linked_spawner():
    offenders = []
    for path in SRC.glob("*.py"):
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if BARE.search(line):
                offenders.append(f"{path.name}:{number}: {line.strip()}")
    assert offenders == []


def test_the_spawner_links_every_greenlet_it_starts():
    text = (SRC / "master.py").read_text()
    spawn = text[text.index("    def _spawn(") :]
    spawn = spawn[: spawn.index("\n    def ", 10)]
    assert "self._group.spawn" in spawn and "link_exception(self._on_greenlet_crash)" in spawn
    assert text.count("self._group.spawn") == 1


CORE = ["router", "actions", "workerproc", "acks", "cache", "policy", "patrol", "protocol", "delivery",
        "config", "units", "urls", "stats", "signals", "errors", "message"]  # fmt: skip
NOT_IN_CORE = {"gevent", "kombu", "amqp", "psutil", "socket", "subprocess", "select"}
OUTER = {"master", "broker", "links", "forkclient", "forkserver", "worker", "cli", "publish", "osproc"}


def test_the_pure_core_imports_nothing_of_gevent_kombu_or_the_outer_layers():
    import ast

    for name in CORE:
        tree = ast.parse((SRC / f"{name}.py").read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                roots = {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom):
                roots = {(node.module or "").split(".")[0]} if node.level == 0 else {node.module or ""}
            else:
                continue
            assert not roots & NOT_IN_CORE, f"{name}.py imports {roots & NOT_IN_CORE}"
            assert not roots & OUTER, f"{name}.py imports the outer layer {roots & OUTER}"
