"""Where one image's time goes in the worker, by stage and by image size, profiled on the real code
path (cProfile, cumulative time of each stage's function): decode, normalise, lungs, opacity, masks and
zones, SEG and SR encoding, durable writes. Also ONNX Runtime threads and batch sizes per model.

    .venv/bin/python benchmarks/pipeline.py [--repeats 5]
The 1k image is the real PA radiograph from ../shared/data/dicom; 2k and 3k are the same image resized
(16-bit, uncompressed), so only the size changes."""
from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
import pydicom
from tqdm import tqdm

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from dicom_node.config import load_config  # noqa: E402
from dicom_node.queue import Queue, SQLiteQueue  # noqa: E402
from dicom_node.service import algorithm_identity  # noqa: E402
from dicom_node.spool import Spool  # noqa: E402
from dicom_node.worker import Worker  # noqa: E402
from model.infer import LUNG_SIZE, OPACITY_SIZE, WEIGHTS_DIR, load_pipeline, onnx_runner  # noqa: E402

SOURCE = REPO.parent / "shared" / "data" / "dicom" / "torchxrayvision" / \
    "1.2.276.0.7230010.3.1.4.8323329.6904.1517875201.850819.dcm"
STAGES = {  # label -> (file name fragment, function name) of the function whose cumulative time it is
    "read + decode (pydicom)": ("pixels.py", "dataset_gray"),
    "normalise": ("image.py", "normalize_gray"),
    "lungs: model + masks": ("infer.py", "lungs"),
    "opacity: crop + model + resize": ("infer.py", "opacity_probability"),
    "zones": ("lungs.py", "zone_map"),
    "SEG build (highdicom)": ("seg.py", "build_segmentation"),
    "SR build (highdicom)": ("sr.py", "build_report"),
    "encode SEG + SR": ("worker.py", "encode"),
    "durable writes": ("spool.py", "write"),
    "queue commit": ("queue.py", "complete"),
    "whole job": ("worker.py", "_process"),
}


def sized_copy(size: int, folder: Path) -> Path:
    ds = pydicom.dcmread(SOURCE)
    ds.decompress()
    if size != ds.Rows:
        pixels = cv2.resize(ds.pixel_array.astype(np.uint16) * 16, (size, size), interpolation=cv2.INTER_LINEAR)
        ds.PixelData, ds.Rows, ds.Columns = pixels.tobytes(), size, size
        ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 12, 11
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
    path = folder / f"{size}.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path


def profile_stages(worker: Worker, queue: Queue, path: Path, repeats: int) -> dict[str, float]:
    """ms per image of each stage (cumulative, so a stage includes what it calls)."""
    profiler = cProfile.Profile()
    for _ in range(repeats):
        uid = str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)
        queue.record_received(uid, "s", "s", "c", "BENCH", path, state="processing")
        profiler.enable()
        worker._process(queue.instance(uid))
        profiler.disable()
        queue._transaction(lambda db: db.execute("DELETE FROM instances"))
    stats = pstats.Stats(profiler).stats
    found = {}
    for label, (file_part, function) in STAGES.items():
        cumulative = sum(value[3] for (file, _, name), value in stats.items() if name == function and file.endswith(file_part))
        found[label] = 1000 * cumulative / repeats
    return found


def model_timings(repeats: int) -> list[tuple]:
    rows = []
    for name, size in (("lungs", LUNG_SIZE), ("opacity", OPACITY_SIZE)):
        for threads in (1, 2):
            runner = onnx_runner(WEIGHTS_DIR / f"{name}.onnx", threads)
            for batch in (1, 4):
                images = np.random.default_rng(0).random((batch, size, size, 1), np.float32)
                runner(images)
                times = []
                for _ in range(repeats):
                    started = time.perf_counter()
                    runner(images)
                    times.append(1000 * (time.perf_counter() - started) / batch)
                rows.append((name, size, threads, batch, statistics.median(times), min(times), max(times)))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        (folder / "bench.toml").write_text(f'[storage]\nstate_dir = "{folder / "state"}"\n')
        config = load_config(folder / "bench.toml")  # no destinations: results are written to state/results
        spool = Spool(config.state_dir)
        queue = SQLiteQueue(folder / "queue.sqlite3", spool, config.results_dir)
        worker = Worker(config, queue, spool, load_pipeline(threads=2), algorithm_identity())
        columns = {}
        for size in tqdm((1024, 2048, 3072), desc="image sizes"):
            path = sized_copy(size, folder)
            profile_stages(worker, queue, path, 1)  # warm-up
            columns[size] = profile_stages(worker, queue, path, args.repeats)
        models = model_timings(args.repeats * 4)
    print(f"\n{os.cpu_count()} cores; worker stages in ms per image (cProfile, cumulative, mean of {args.repeats}); "
          "profiling adds a little overhead\n")
    print("| stage | " + " | ".join(f"{size}x{size}" for size in columns) + " |\n|---|" + "---|" * len(columns))
    for label in STAGES:
        print(f"| {label} | " + " | ".join(f"{columns[size][label]:.0f}" for size in columns) + " |")
    print("\nONNX Runtime per model: ms per image by intra-op threads and batch size (median, min-max)\n")
    print("| model | input | threads | batch | ms/image | min-max |\n|---|---|---|---|---|---|")
    for name, size, threads, batch, median, low, high in models:
        print(f"| {name} | {size}x{size} | {threads} | {batch} | {median:.0f} | {low:.0f}-{high:.0f} |")
    print(f"\nPeak RSS: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB")


if __name__ == "__main__":
    main()
