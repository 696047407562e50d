"""`--http`: probes and metrics from a real run, through a proxy that can take the broker
away. /livez stays 200 through an outage (Kubernetes must not restart the pod for it),
/readyz is 503 until the master consumes again; metrics match the messages counted by id."""

from __future__ import annotations

import json
import re
import signal
import socket
import urllib.error
import urllib.request

import pytest

from tests.conftest import wait_until
from tests.helpers import handled_ids, publish_ids

pytestmark = pytest.mark.timeout(180)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def metric(text: str, name: str, labels: str = "") -> float | None:
    found = re.search(rf"^{re.escape(name + labels)} (\S+)$", text, re.MULTILINE)
    return float(found.group(1)) if found else None


def test_probes_and_metrics_while_connected_through_an_outage_and_after(
    run_recorder,
    queue_names,
    tmp_path,
    proxy,
    tally,
):
    queue, record, port = queue_names(), tmp_path / "rec", free_port()
    base = f"http://127.0.0.1:{port}"
    publish_ids(queue, list(range(1, 21)))
    through_proxy = {"SPEED_GEVENT_BROKER": f"amqp://guest:guest@127.0.0.1:{proxy.port}//"}
    runner = run_recorder(queue, "--max-workers", "2", "--heartbeat", "2s", "--http", f"127.0.0.1:{port}",
                          record=record, env=through_proxy)  # fmt: skip
    wait_until(lambda: len(handled_ids(record)) == 20, 30, message="the first 20 handled")
    assert wait_until(lambda: get(base + "/readyz")[0] == 200, 10, message="ready")
    assert get(base + "/livez") == (200, "ok\n")

    def acked(count: int) -> str | None:
        text = get(base + "/metrics")[1]
        return text if metric(text, "speed_gevent_messages_total", '{event="acked"}') == count else None

    text = wait_until(lambda: acked(20), 10, message="20 acked in the metrics")
    for event, value in (("received", 20), ("handled", 20), ("failed", 0), ("dead_lettered", 0)):
        assert metric(text, "speed_gevent_messages_total", f'{{event="{event}"}}') == value, event
    assert metric(text, "speed_gevent_broker_connected") == 1
    assert metric(text, "speed_gevent_broker_recoveries_total") == 0
    assert metric(text, "speed_gevent_cache_capacity") == 32
    assert (metric(text, "speed_gevent_workers", '{state="idle"}') or 0) >= 1
    assert (metric(text, "speed_gevent_master_process_resident_memory_bytes") or 0) > 10 * 2**20
    status, body = get(base + "/stats")
    stats = json.loads(body)
    assert status == 200 and stats["totals"]["acked"] == 20 and stats["state"] == "running"
    assert "guest:guest@" not in body and "guest:**@" in body

    proxy.pause()
    proxy.cut()
    wait_until(lambda: get(base + "/readyz")[0] == 503, 30, message="not ready while the broker is away")
    for _ in range(10):  # the whole time it is away, and the master still answers
        assert get(base + "/livez") == (200, "ok\n")
    assert metric(get(base + "/metrics")[1], "speed_gevent_broker_connected") == 0
    proxy.resume()
    wait_until(lambda: get(base + "/readyz")[0] == 200, 60, message="ready again")
    publish_ids(queue, list(range(21, 31)))
    text = wait_until(lambda: acked(30), 30, message="30 acked in the metrics")
    assert (metric(text, "speed_gevent_broker_recoveries_total") or 0) >= 1
    runner.proc.send_signal(signal.SIGTERM)
    assert runner.wait(30) == 0, runner.output()[-3000:]
    tally(range(1, 31), handled_ids(record), dead=[], queued=[])
    assert set(handled_ids(record)) == set(range(1, 31))
