"""End-to-end latency: from the end of each C-STORE (the node's acknowledgement) to both SEG and SR
stored in a real Orthanc (its 0x0000 answer), with the study-stable delay at 0.

Two loads, for each worker layout (worker threads x ONNX Runtime threads per worker):
- paced: one image every --interval seconds (a steady department): latency without queueing;
- burst: --images at once: sustained images per minute, and latency including the queue.

    .venv/bin/python benchmarks/end_to_end.py [--images 30] [--interval 2.5] [--runs 1]
Needs Orthanc and DCMTK (see .ci/run)."""
from __future__ import annotations

import argparse
import os
import sqlite3
import statistics
import sys
import tempfile
import time
from pathlib import Path

from tqdm import tqdm

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from tests.harness import Node, Orthanc, chest_copies, dcmsend, wait_for  # noqa: E402

SOURCES = ["torchxrayvision/1.2.276.0.7230010.3.1.4.8323329.6904.1517875201.850819.dcm",
           "nhsx-nccid/1.3.6.1.4.1.11129.5.5.110503645592756492463169821050252582267888.dcm",
           "pydicom-data/RG1_J2KI.dcm"]
LAYOUTS = [(1, 2), (2, 1)]  # (workers, ONNX Runtime threads each) on 2 cores


def latencies(state: Path) -> list[float]:
    db = sqlite3.connect(state / "queue.sqlite3")
    try:
        return sorted(row[0] for row in db.execute(
            "SELECT MAX(r.sent_at) - i.received_at FROM instances i JOIN results r ON r.source_sop_uid = i.sop_uid"
            " GROUP BY i.sop_uid"))
    finally:
        db.close()


def run(folder: Path, files: list[Path], workers: int, threads: int, interval: float | None) -> tuple[list[float], float]:
    """Latencies (s) and images per minute for one load on a fresh node and PACS."""
    pacs = Orthanc(folder / "orthanc").start()
    node = Node(folder / "node", destinations=[("pacs", pacs)],
                processing={"stable_seconds": 0, "workers": workers, "onnx_threads": threads}).start()
    try:
        started = time.time()
        if interval is None:
            assert dcmsend(node.port, files).returncode == 0
        else:
            for index, path in enumerate(files):
                time.sleep(max(0.0, started + index * interval - time.time()))
                assert dcmsend(node.port, [path]).returncode == 0
        wait_for(lambda: node.queue_counts().get("results.sent", 0) == 2 * len(files), 1800, 0.2, "all results")
        elapsed = time.time() - started
        return latencies(folder / "node" / "state"), 60 * len(files) / elapsed
    finally:
        node.stop()
        pacs.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--images", type=int, default=30)
    parser.add_argument("--interval", type=float, default=2.5)
    args = parser.parse_args()
    dicom = REPO.parent / "shared" / "data" / "dicom"
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        files = chest_copies([dicom / s for s in SOURCES], args.images, Path(folder) / "images", per_study=1)
        for (workers, threads), interval in tqdm([(layout, i) for layout in LAYOUTS for i in (args.interval, None)],
                                                 desc="loads"):
            run_folder = Path(folder) / f"{workers}-{threads}-{interval}"
            values, per_minute = run(run_folder, files, workers, threads, interval)
            p95 = values[min(len(values) - 1, round(0.95 * (len(values) - 1)))]
            load = f"paced, 1 image / {interval:g} s" if interval else f"burst of {args.images}"
            rows.append((f"{workers} x {threads}", load, statistics.median(values), p95, values[-1], per_minute))
    print(f"\n{args.images} images (1024x1024 JPEG baseline, 1024x1024 implicit VR, 1955x1841 JPEG 2000), each its own "
          f"study; stable delay 0; {os.cpu_count()} cores\n")
    print("| workers x ONNX threads | load | p50 latency (s) | p95 (s) | max (s) | images per minute |")
    print("|---|---|---|---|---|---|")
    for layout, load, p50, p95, worst, per_minute in rows:
        print(f"| {layout} | {load} | {p50:.2f} | {p95:.2f} | {worst:.2f} | {per_minute:.1f} |")


if __name__ == "__main__":
    main()
