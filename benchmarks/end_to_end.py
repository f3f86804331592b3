"""End-to-end latency: from the end of each C-STORE (the node's acknowledgement) to both SEG and SR
stored in a real Orthanc (its 0x0000 answer), for a burst of real images; and sustained images/min.

    .venv/bin/python benchmarks/end_to_end.py [--images 30]
Needs Orthanc and DCMTK (see .ci/run). The study-stable delay is 0 for the measurement."""
from __future__ import annotations

import argparse
import sqlite3
import statistics
import sys
import tempfile
import time
from pathlib import Path

import pydicom

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from tests.harness import Node, Orthanc, dcmsend, wait_for  # noqa: E402

SOURCES = ["torchxrayvision/1.2.276.0.7230010.3.1.4.8323329.6904.1517875201.850819.dcm",
           "nhsx-nccid/1.3.6.1.4.1.11129.5.5.110503645592756492463169821050252582267888.dcm",
           "pydicom-data/RG1_J2KI.dcm"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--images", type=int, default=30)
    args = parser.parse_args()
    dicom = REPO.parent / "shared" / "data" / "dicom"
    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        files = []
        for index in range(args.images):  # copies with new UIDs: every one is a new study
            ds = pydicom.dcmread(dicom / SOURCES[index % len(SOURCES)])
            ds.StudyInstanceUID, ds.SeriesInstanceUID = pydicom.uid.generate_uid(), pydicom.uid.generate_uid()
            ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
            files.append(folder / f"{index}.dcm")
            ds.save_as(files[-1], enforce_file_format=True)
        pacs = Orthanc(folder / "orthanc").start()
        node = Node(folder / "node", destinations=[("pacs", pacs)], processing={"stable_seconds": 0}).start()
        try:
            start = time.time()
            assert dcmsend(node.port, files).returncode == 0
            wait_for(lambda: node.status()["results"]["sent"] == 2 * args.images, 1800, 0.5, "all results")
            elapsed = time.time() - start
            db = sqlite3.connect(folder / "node" / "state" / "queue.sqlite3")
            latencies = [row[0] for row in db.execute(
                "SELECT MAX(r.sent_at) - i.received_at FROM instances i JOIN results r ON r.source_sop_uid = i.sop_uid"
                " GROUP BY i.sop_uid")]
        finally:
            node.stop()
            pacs.stop()
    latencies.sort()
    p95 = latencies[min(len(latencies) - 1, round(0.95 * (len(latencies) - 1)))]
    print(f"\n{args.images} images (1024x1024 JPEG baseline, 1024x1024 implicit VR, 1955x1841 JPEG 2000), one burst, "
          "1 worker, stable delay 0\n")
    print("| images | p50 latency (s) | p95 latency (s) | max (s) | images per minute (burst) |\n|---|---|---|---|---|")
    print(f"| {args.images} | {statistics.median(latencies):.2f} | {p95:.2f} | {latencies[-1]:.2f} | "
          f"{60 * args.images / elapsed:.1f} |")


if __name__ == "__main__":
    main()
