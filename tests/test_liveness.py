"""Nothing dies silently: a queue locked by another process for longer than the busy timeout stops the
node's loops only while it lasts (/healthz 503 meanwhile, the recovery logged once), and an image whose
analysis kills the node `max_attempts` times ends failed while the others go on."""
from __future__ import annotations

import json
import sqlite3
import time

import pytest

from tests.harness import Node, chest_copies, dcmsend, wait_for
from tests.test_faults import SOURCES, health_code, uids

pytestmark = pytest.mark.slow

LOCK_SECONDS = 100  # the measurement: a backup tool or a stuck disk holding the queue (busy timeout 30 s)


def events(node: Node, name: str) -> list[dict]:
    lines = [line for line in node.log().splitlines() if line.startswith("{")]
    return [entry for entry in map(json.loads, lines) if entry.get("event") == name]


def test_a_queue_locked_past_the_busy_timeout_stops_no_loop_for_good(tmp_path, dicom_dir, record):
    image = chest_copies([dicom_dir / SOURCES[0]], 1, tmp_path / "images")[0]
    node = Node(tmp_path / "node", processing={"stable_seconds": 0, "liveness_seconds": 20}).start()
    try:
        wait_for(lambda: health_code(node) == 200, 30, what="/healthz 200 before the lock")
        blocker = sqlite3.connect(node.folder / "state" / "queue.sqlite3", isolation_level=None)
        blocker.execute("BEGIN EXCLUSIVE")  # as a backup tool would hold it
        locked_at, codes = time.monotonic(), set()
        while time.monotonic() - locked_at < LOCK_SECONDS:
            codes.add(health_code(node))
            time.sleep(2)
        blocker.execute("ROLLBACK")
        blocker.close()
        released_at = time.monotonic()
        assert dcmsend(node.port, [image]).returncode == 0
        uid = uids([image])[0]
        wait_for(lambda: (node.instance(uid) or {}).get("state") == "done", 60, what="analysis after the release")
        analysed_after = time.monotonic() - released_at
        wait_for(lambda: health_code(node) == 200, 30, what="/healthz 200 after the release")
    finally:
        node.stop()
    failures, recoveries = events(node, "loop failed; retrying with backoff"), events(node, "loop working again")
    record("faults", case=f"SQLite queue held with BEGIN EXCLUSIVE by another process for {LOCK_SECONDS} s "
                          "(busy timeout 30 s), then an instance sent",
           expected="/healthz 503 while locked; loops retry and recover; the instance analysed within 60 s",
           observed=f"/healthz {sorted(codes)} while locked; {len(failures)} loop failures logged with their cause, "
                    f"{len(recoveries)} recoveries; analysed {analysed_after:.0f} s after the release",
           sent=1, accepted=1, delivered=1, lost=0, duplicated=0)
    assert 503 in codes, codes
    assert any(e["loop"] == "worker-0" for e in failures) and all(e["error"] for e in failures), failures
    recovered = [e["loop"] for e in recoveries]
    assert "worker-0" in recovered and "promote" in recovered and len(recovered) == len(set(recovered)), recovered


def test_an_image_that_kills_its_worker_ends_failed_after_max_attempts_and_others_go_on(tmp_path, dicom_dir, record):
    poison, good = chest_copies([dicom_dir / SOURCES[0]], 2, tmp_path / "images", per_study=1)
    poison_uid, good_uid = uids([poison, good])
    node = Node(tmp_path / "node", processing={"stable_seconds": 0, "max_attempts": 3}).start()
    died = "worker died 3 times while analysing it"
    try:
        assert dcmsend(node.port, [poison]).returncode == 0
        for attempt in (1, 2, 3):  # kill -9 of the node while it analyses that image, as a crash or the OOM killer would
            wait_for(lambda: (node.instance(poison_uid) or {}).get("state") == "processing", 60, 0.02,
                     "the analysis of the image")
            node.kill()
            node.start()
            metrics = node.metrics()  # what the restarted process found: the job queued again, or failed at last
            assert f"cxr_jobs_requeued_total {float(attempt < 3)}" in metrics
            assert f"cxr_jobs_failed_after_worker_deaths_total {float(attempt == 3)}" in metrics
        failed = node.status(poison_uid)
        assert dcmsend(node.port, [good]).returncode == 0
        wait_for(lambda: (node.instance(good_uid) or {}).get("state") == "done", 60, what="the next image analysed")
        wait_for(lambda: 'cxr_instances{state="failed"} 1.0' in node.metrics(), 30, what="/metrics counting it")
        assert node.status(poison_uid)["state"] == "failed"  # not run again by itself
        retry = node.cli("retry", "--uid", poison_uid)
        assert retry.returncode == 0, retry.stderr
        wait_for(lambda: (node.instance(poison_uid) or {}).get("state") == "done", 60, what="the retried image")
        retried = node.status(poison_uid)
    finally:
        node.stop()
    record("faults", case="kill -9 of the node while it analyses the same image, 3 times (max_attempts 3)",
           expected=f"failed '{died}', the next image analysed, `retry` runs it again",
           observed=f"{failed['state']}: {failed['reason']}; next image done; after retry {retried['state']} "
                    f"at attempt {retried['attempts']}", sent=2, accepted=2, delivered=2, lost=0, duplicated=0)
    assert (failed["state"], failed["reason"], failed["attempts"]) == ("failed", died, 3)
    assert retried["state"] == "done" and retried["attempts"] == 1
