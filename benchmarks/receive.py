"""Receive throughput, side by side on the same machine and the same files: cxr-node's receiver
(durable: fsync + queue commit before 0x0000) in one process and in several sharing the port
(`node.receiver_processes`), DCMTK storescp and pynetdicom's storescp app, fed by DCMTK storescu
over one association and over several at once.

    .venv/bin/python benchmarks/receive.py [--copies 200] [--runs 3] [--parallel 4] [--receiver-processes 2]
The copies are the real radiographs of ../shared/data/dicom, decompressed (storescu sends what it can
propose), with new UIDs. TCP_NODELAY=1 is set for DCMTK on both ends. cxr-node runs with a long
study-stable delay so that only receiving is measured."""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pydicom
from tqdm import tqdm

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from tests.harness import Node, free_port, wait_for  # noqa: E402

DCMTK_ENV = {**os.environ, "TCP_NODELAY": "1"}


def make_copies(count: int, folder: Path) -> list[Path]:
    sources = []
    for path in sorted((REPO.parent / "shared" / "data" / "dicom").rglob("*.dcm")):
        ds = pydicom.dcmread(path)
        if "PixelData" in ds and ds.Modality != "SEG":  # the radiographs (DCMTK's storescp refuses SEG)
            if ds.file_meta.TransferSyntaxUID.is_compressed:
                ds.decompress()
            sources.append(ds)
    folder.mkdir(parents=True)
    files = []
    for index in range(count):
        ds = sources[index % len(sources)]
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
        files.append(folder / f"{index:04d}.dcm")
        ds.save_as(files[-1], enforce_file_format=True)
    return files


class Receiver:
    """One receiving program on a fresh port and output folder, started and stopped per run."""

    def __init__(self, kind: str, folder: Path):
        self.kind, self.folder = kind, folder

    def start(self) -> int:
        out = self.folder / "out"
        shutil.rmtree(self.folder, ignore_errors=True)
        out.mkdir(parents=True)
        if self.kind.startswith("cxr-node"):
            processes = int(self.kind.partition(" x")[2] or 1)  # node.receiver_processes
            self.node = Node(self.folder / "node", processing={"stable_seconds": 3600},
                             node={"allowed_calling_aes": [], "max_associations": 64,
                                   "receiver_processes": processes}).start()
            if processes > 1:  # the extra receiver processes listen too before the run starts
                wait_for(lambda: self.node.log().count('"role": "receiver"') >= processes - 1, 30, 0.2,
                         "the extra receiver processes")
            return self.node.port
        port = free_port()
        command = {"dcmtk storescp": ["storescp", "-od", str(out), "-aet", "CXR_NODE", str(port)],
                   "pynetdicom storescp": [sys.executable, "-m", "pynetdicom", "storescp", "-od", str(out),
                                           "-aet", "CXR_NODE", str(port)]}[self.kind]
        self.process = subprocess.Popen(command, env=DCMTK_ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for(lambda: subprocess.run(["echoscu", "-aec", "CXR_NODE", "127.0.0.1", str(port)],
                                        capture_output=True).returncode == 0, 30, 0.2, f"{self.kind} up")
        return port

    def stop(self) -> None:
        if self.kind.startswith("cxr-node"):
            self.node.stop()
        else:
            self.process.terminate()
            self.process.wait()


def push(port: int, files: list[Path], associations: int) -> float:
    """Seconds for `associations` storescu processes to send all files (split evenly)."""
    def one(part):
        result = subprocess.run(["storescu", "-aet", "STORESCU", "-aec", "CXR_NODE", "127.0.0.1", str(port), *map(str, part)],
                                capture_output=True, text=True, env=DCMTK_ENV)
        assert result.returncode == 0, result.stderr[-500:]
    started = time.perf_counter()
    with ThreadPoolExecutor(associations) as pool:
        list(pool.map(one, [files[i::associations] for i in range(associations)]))
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--copies", type=int, default=200)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--parallel", type=int, default=4)
    parser.add_argument("--receiver-processes", type=int, default=2,
                        help="also measure cxr-node with 2..N receiver processes (node.receiver_processes)")
    args = parser.parse_args()
    kinds = ["cxr-node", *(f"cxr-node x{n}" for n in range(2, args.receiver_processes + 1)),
             "dcmtk storescp", "pynetdicom storescp"]
    with tempfile.TemporaryDirectory(dir=REPO.parent if os.access(REPO.parent, os.W_OK) else None) as folder:
        folder = Path(folder)
        files = make_copies(args.copies, folder / "copies")
        megabytes = sum(path.stat().st_size for path in files) / 1e6
        times = {(kind, n): [] for kind in kinds for n in (1, args.parallel)}
        with tqdm(total=len(times) * args.runs, desc="receive runs") as progress:
            for _ in range(args.runs):  # interleaved, so drifts of the machine hit every receiver alike
                for kind, associations in times:
                    receiver = Receiver(kind, folder / "receiver")
                    port = receiver.start()
                    os.sync()  # every run starts without the previous run's dirty pages to write back
                    try:
                        times[kind, associations].append(push(port, files, associations))
                    finally:
                        receiver.stop()
                    progress.update()
    print(f"\n{args.copies} instances, {megabytes:.0f} MB ({megabytes / args.copies:.2f} MB mean), "
          f"{args.runs} runs each, {os.cpu_count()} cores; DCMTK storescu sending, TCP_NODELAY=1\n")
    print("| receiver | associations | seconds (median) | spread (min-max) | MB/s | instances/s | vs DCMTK | vs pynetdicom |")
    print("|---|---|---|---|---|---|---|---|")
    for (kind, associations), runs in times.items():
        median = statistics.median(runs)
        dcmtk = statistics.median(times["dcmtk storescp", associations])
        pynet = statistics.median(times["pynetdicom storescp", associations])
        print(f"| {kind} | {associations} | {median:.2f} | {min(runs):.2f}-{max(runs):.2f} | {megabytes / median:.0f} | "
              f"{args.copies / median:.0f} | {dcmtk / median:.2f}x | {pynet / median:.2f}x |")


if __name__ == "__main__":
    main()
