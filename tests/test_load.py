"""Load: 20 DCMTK senders at once, 50 images each, into a node that allows 20 associations;
then the 21st association is refused while 20 are open. Every result must arrive."""
from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from pynetdicom import AE
from pynetdicom.sop_class import Verification

from tests.harness import Node, Orthanc, chest_copies, dcmsend_report, storescu, wait_for
from tests.test_faults import SOURCES, delivery, uids

pytestmark = pytest.mark.slow

SENDERS, PER_SENDER = 20, 50


def test_20_concurrent_associations_of_50_images(tmp_path, dicom_dir, record):
    files = chest_copies([dicom_dir / s for s in SOURCES], SENDERS * PER_SENDER, tmp_path / "images", size=512)
    pacs = Orthanc(tmp_path / "orthanc").start()
    node = Node(tmp_path / "node", destinations=[("pacs", pacs)],
                node={"max_associations": SENDERS}, processing={"stable_seconds": 0}).start()
    try:
        started = time.monotonic()
        with ThreadPoolExecutor(SENDERS) as pool:
            reports = list(pool.map(lambda i: dcmsend_report(node.port, files[i::SENDERS], tmp_path / f"r{i}.txt"),
                                    range(SENDERS)))
        received_s = time.monotonic() - started
        statuses = {uid: status for report in reports for uid, status in report.items()}
        accepted = sum(status == "0x0000" for status in statuses.values())
        wait_for(lambda: node.queue_counts().get("results.sent", 0) == 2 * accepted, 1500, 2, "every result sent")
        processed_s = time.monotonic() - started
        peak_rss = node.peak_rss_mb()
        counts = node.queue_counts()
        lost, duplicated = delivery(pacs, uids(files))
    finally:
        node.stop()
        pacs.stop()
    record("load", case=f"{SENDERS} concurrent dcmsend associations x {PER_SENDER} images (512x512)",
           sent=len(files), accepted=accepted, delivered=len(files) - lost, lost=lost, duplicated=duplicated,
           peak_rss_mb=round(peak_rss), received_s=round(received_s, 1), all_delivered_s=round(processed_s, 1))
    assert accepted == len(files) and counts == {"instances.done": len(files), "results.sent": 2 * len(files)}
    assert (lost, duplicated) == (0, 0)
    assert peak_rss < 2048, f"peak RSS {peak_rss:.0f} MB"


def test_association_beyond_the_limit_is_refused(tmp_path, dicom_dir, record):
    node = Node(tmp_path / "node", node={"max_associations": 3}).start()
    ae = AE(ae_title="STORESCU")
    ae.add_requested_context(Verification)
    held = [ae.associate("127.0.0.1", node.port, ae_title="CXR_NODE") for _ in range(3)]
    try:
        assert all(assoc.is_established for assoc in held)
        extra = storescu(node.port, [dicom_dir / SOURCES[1]])
        released = [assoc.release() for assoc in held]
        after = storescu(node.port, [dicom_dir / SOURCES[1]])
    finally:
        for assoc in held:
            assoc.release()
        node.stop()
    output = extra.stdout + extra.stderr
    record("load", case="4th association while 3 are open (max_associations 3)",
           expected="A-ASSOCIATE-RJ transient, local limit exceeded; accepted again once one is released",
           observed="; ".join(line[3:] for line in output.splitlines() if "Result:" in line or "Reason:" in line))
    assert extra.returncode != 0 and "Rejected Transient" in output and "Reason: Local Limit Exceeded" in output
    assert len(released) == 3 and after.returncode == 0
