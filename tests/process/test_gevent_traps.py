"""Traps of the gevent master, checked in real interpreters (this pytest process stays
unpatched): patch before amqp is imported, and reap through gevent, not SIGCHLD handlers."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from tests.conftest import ROOT

pytestmark = pytest.mark.timeout(60)


def run_python(code: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "SPEED_GEVENT_BROKER": "amqp://guest:guest@127.0.0.1:1//"}
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=50)  # fmt: skip


def test_entry_point_patches_before_amqp_is_imported():
    result = run_python("""
        import importlib.abc, sys

        class Watch(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path, target=None):
                if name in ("amqp", "kombu"):
                    from gevent import monkey
                    print(name, "patched" if monkey.is_module_patched("socket") else "UNPATCHED")
                return None

        sys.meta_path.insert(0, Watch())
        sys.argv = ["speed-gevent", "run", "tests.apps.broken:handle", "-q", "a"]
        from speed_gevent.__main__ import main
        main()
    """)
    assert result.returncode == 2, result.stderr  # the broken TARGET, reported by the fork server
    lines = result.stdout.split()
    assert "amqp" in lines
    assert "kombu" not in lines, "the master talks py-amqp: kombu's imports cost megabytes"
    assert "UNPATCHED" not in result.stdout


def test_entry_point_patches_all_without_the_plugin_scan():
    result = run_python("""
        import sys
        from speed_gevent.__main__ import _patch_all
        import gevent.events
        from gevent import monkey

        scan = gevent.events.notify_and_call_entry_points
        _patch_all()
        names = ("socket", "ssl", "select", "time", "threading", "os", "signal", "subprocess", "queue")
        print("unpatched:", [n for n in names if not monkey.is_module_patched(n)])
        print("scanned:", "importlib.metadata" in sys.modules)
        print("restored:", gevent.events.notify_and_call_entry_points is scan)
    """)
    assert result.returncode == 0, result.stderr
    assert "unpatched: []" in result.stdout
    assert "scanned: False" in result.stdout, "gevent's plugin scan ran: about 2.5 MB kept in the master"
    assert "restored: True" in result.stdout


def test_master_reaps_the_fork_server_through_gevent_without_a_sigchld_handler():
    result = run_python("""
        from gevent import monkey
        monkey.patch_all()
        import signal, gevent
        from speed_gevent.forkclient import ForkClient

        exits = []
        client = ForkClient("tests.apps.recorder:handle", "t", "info", "text",
                            on_spawned=lambda wid, pid: None, on_exited=lambda pid, st: exits.append(pid),
                            on_lost=lambda why: None)
        client.start()
        reports = gevent.spawn(client.report_loop)
        ticks = []
        ticker = gevent.spawn(lambda: [ticks.append(gevent.sleep(0.01)) for _ in range(1000)])
        conn = client.spawn(1)
        conn.close()  # the worker exits on EOF; the fork server reports it
        with gevent.Timeout(10):
            while not exits:
                gevent.sleep(0.01)
        # A stopped fork server cannot exit: stop() waits its 0.5 s, then kills it. The wait
        # must go through gevent's child watcher, so the hub keeps running other greenlets.
        import os
        os.kill(client.pid, signal.SIGSTOP)
        ticks.clear()
        client.stop(timeout=0.5)
        print("handler", signal.getsignal(signal.SIGCHLD) in (signal.SIG_DFL, None))
        print("exit", client._proc.returncode)
        print("ticked", len(ticks) > 20)
        ticker.kill()
    """)
    assert result.returncode == 0, result.stderr
    assert "handler True" in result.stdout, "a Python-level SIGCHLD handler was installed in the master"
    assert "exit -9" in result.stdout, result.stdout
    assert "ticked True" in result.stdout, "the hub was blocked while waiting for children"
