"""Receiving on several cores: `node.receiver_processes = 2` runs a second receiver process on the same
port (SO_REUSEPORT). Concurrent senders are spread across both, everything lands in the one queue and
is analysed once; a receiver process that dies is replaced."""
from __future__ import annotations

import json
import os
import signal
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.harness import Node, chest_copies, dcmsend, process_gone, wait_for
from tests.test_faults import SOURCES

pytestmark = pytest.mark.slow


def events(node: Node, name: str) -> list[dict]:
    lines = [line for line in node.log().splitlines() if line.startswith("{")]  # (a dying process may print a traceback)
    return [entry for entry in map(json.loads, lines) if entry.get("event") == name]


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
        wait_for(node.idle, 300, 1, "all analysed")
        counts = node.status()
        assert counts["instances"]["received"] == 0 and counts["results"]["written"] == 2 * counts["instances"]["done"]
        assert counts["instances"]["done"] + counts["instances"]["skipped"] == 24

        child = next(e["pid"] for e in events(node, "ready") if e.get("role") == "receiver")
        os.kill(child, signal.SIGKILL)
        wait_for(lambda: len([e for e in events(node, "ready") if e.get("role") == "receiver"]) == 2, 30,
                 what="a new receiver process")
        main = next(e["pid"] for e in events(node, "ready") if e.get("role") == "all")
        restarted = events(node, "receiver process exited; starting another")[0]
        assert restarted["pid"] == main and restarted["receiver_pid"] == child
        assert dcmsend(node.port, files[:2]).returncode == 0  # duplicates: acknowledged, not analysed again
    finally:
        node.stop()
    assert events(node, "stopped") and not any(os.path.exists(f"/proc/{e['pid']}") for e in events(node, "ready"))
    assert "Traceback" not in node.log()  # every process stopped cleanly


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
