"""Receiving on several cores: `node.receiver_processes = 2` runs a second receiver process on the same
port (SO_REUSEPORT). Concurrent senders are spread across both, everything lands in the one queue and
is analysed once; each serves /healthz and /metrics; a receiver process that dies is replaced."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.harness import REPO, Node, chest_copies, dcmsend, process_gone, wait_for
from tests.test_faults import SOURCES

pytestmark = pytest.mark.slow


def events(node: Node, name: str) -> list[dict]:
    lines = [line for line in node.log().splitlines() if line.startswith("{")]  # (a dying process may print a traceback)
    return [entry for entry in map(json.loads, lines) if entry.get("event") == name]


def http_get(port: int, path: str) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as response:
        return response.read().decode()


def received(metrics: str, outcome: str) -> float:
    """cxr_instances_received_total for `outcome` in a /metrics page (0 when absent)."""
    prefix = f'cxr_instances_received_total{{outcome="{outcome}"}} '
    return sum(float(line.removeprefix(prefix)) for line in metrics.splitlines() if line.startswith(prefix))


def test_two_receiver_processes_share_the_port_and_the_queue(dicom_dir, tmp_path):
    node = Node(tmp_path / "node", node={"receiver_processes": 2}, processing={"stable_seconds": 1}).start()
    try:
        wait_for(lambda: events(node, "ready") and any(e.get("role") == "receiver" for e in events(node, "ready")),
                 30, what="the second receiver process")
        files = chest_copies([dicom_dir / name for name in SOURCES], 24, tmp_path / "copies", size=512)
        with ThreadPoolExecutor(8) as pool:  # eight concurrent associations of three images
            results = list(pool.map(lambda i: dcmsend(node.port, files[i::8]), range(8)))
        assert all(result.returncode == 0 for result in results), [r.stderr[-500:] for r in results]
        receiving = {e["pid"] for e in events(node, "instance received")}
        assert len(receiving) == 2, f"instances received by processes {receiving}"  # the kernel spread them
        processes = node.status()["processes"]  # `cxr-node status`: every process of the node
        assert sorted(p["role"] for p in processes) == ["all", "receiver"]
        assert all(p["heartbeat_age_s"] < 15 for p in processes)
        # every process serves /healthz and /metrics: the extra receiver on health.port + 1, with its own
        # C-STORE outcomes and no queue counts (the "queue not draining" alert reads those per process)
        child_metrics = http_get(node.health_port + 1, "/metrics")
        accepted = [received(metrics, "accepted") for metrics in (node.metrics(), child_metrics)]
        assert accepted[0] > 0 and accepted[1] > 0 and sum(accepted) == 24, accepted
        assert "cxr_queue_reachable 1.0" in child_metrics and "cxr_instances{" not in child_metrics
        assert json.loads(http_get(node.health_port + 1, "/healthz"))["status"] == "ok"
        wait_for(node.idle, 300, 1, "all analysed")
        counts = node.status()
        assert counts["instances"]["received"] == 0 and counts["results"]["written"] == 2 * counts["instances"]["done"]
        assert counts["instances"]["done"] + counts["instances"]["skipped"] == 24

        child = next(e["pid"] for e in events(node, "ready") if e.get("role") == "receiver")
        os.kill(child, signal.SIGKILL)
        wait_for(lambda: len([e for e in events(node, "ready") if e.get("role") == "receiver"]) == 2, 30,
                 what="a new receiver process")
        assert received(http_get(node.health_port + 1, "/metrics"), "accepted") == 0  # the new one, on the same port
        assert child not in [p["pid"] for p in node.status()["processes"]]  # forgotten, not listed as dead
        main = next(e["pid"] for e in events(node, "ready") if e.get("role") == "all")
        restarted = events(node, "receiver process exited; starting another")[0]
        assert restarted["pid"] == main and restarted["receiver_pid"] == child
        assert dcmsend(node.port, files[:2]).returncode == 0  # duplicates: acknowledged, not analysed again
    finally:
        node.stop()
    assert events(node, "stopped") and not any(os.path.exists(f"/proc/{e['pid']}") for e in events(node, "ready"))
    assert "Traceback" not in node.log()  # every process stopped cleanly


def test_a_receiver_process_that_cannot_start_stops_the_node_with_exit_2(tmp_path):
    """Its health port (health.port + 1) taken: restarting it cannot help, so the node stops and says why."""
    import socket

    node = Node(tmp_path / "node", node={"receiver_processes": 2})
    node.write_config()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", node.health_port + 1))
        taken.listen()
        result = subprocess.run([sys.executable, "-m", "dicom_node.cli", "serve", "--config", str(node.config_path)],
                                capture_output=True, text=True, cwd=REPO, timeout=120)
    assert result.returncode == 2, result.stderr[-2000:]
    assert f"health.port: 127.0.0.1:{node.health_port + 1} is already in use" in result.stderr
    assert result.stderr.count("receiver process cannot start (configuration error above); stopping the node") == 1


def test_a_receiver_process_stops_when_the_node_that_started_it_is_killed(tmp_path):
    node = Node(tmp_path / "node", node={"receiver_processes": 2}).start()
    try:
        wait_for(lambda: any(e.get("role") == "receiver" for e in events(node, "ready")), 30, what="the receiver process")
        child = next(e["pid"] for e in events(node, "ready") if e.get("role") == "receiver")
        node.kill()  # kill -9: nothing of the node's own shutdown runs
        wait_for(lambda: process_gone(child), 20, what="the orphaned receiver process to stop")
        assert events(node, "the node that started this receiver is gone; stopping")
    finally:
        node.stop()
