"""What batching gains: ms per image of the whole pipeline (Pipeline.segment_many: both models run once
per batch) and of each model alone, at batch sizes 1, 2, 4 and 8, on real radiographs.

    .venv/bin/python benchmarks/batching.py [--images 32] [--repeats 3] [--threads 2] [--providers CUDAExecutionProvider]
Prints a Markdown table (median over repeats). On a CPU the models already use every core at batch 1;
the gain a batch brings is a GPU's (run this there with onnxruntime-gpu and --providers)."""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import cv2
import numpy as np
from tqdm import tqdm

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from model.data import load_records  # noqa: E402
from model.image import normalize_gray, read_gray  # noqa: E402
from model.infer import choose_providers, load_pipeline  # noqa: E402

BATCH_SIZES = (1, 2, 4, 8)


def ms_per_image(function, items: list, batch: int, repeats: int) -> float:
    runs = []
    for _ in range(repeats):
        started = time.perf_counter()
        for start in range(0, len(items), batch):
            function(items[start:start + batch])
        runs.append(1000 * (time.perf_counter() - started) / len(items))
    return statistics.median(runs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2, help="ONNX Runtime intra-op threads")
    parser.add_argument("--providers", nargs="*", default=["CPUExecutionProvider"])
    args = parser.parse_args()
    grays = [read_gray(r.image_path) for r in tqdm(load_records(REPO.parent / "shared" / "data" / "cxr")[: args.images],
                                                   desc="reading")]
    pipeline = load_pipeline(threads=args.threads, providers=args.providers)
    pipeline.segment_many(grays[:2])  # warm-up
    inputs = [cv2.resize(normalize_gray(g), (pipeline.lung_size,) * 2)[..., None].astype(np.float32) / 255 for g in grays]
    rows = {}
    for batch in tqdm(BATCH_SIZES, desc="batch sizes"):
        rows[batch] = (ms_per_image(lambda b: pipeline.lung_runner(np.stack(b)), inputs, batch, args.repeats),
                       ms_per_image(lambda b: pipeline.opacity_runner(np.stack(b)), inputs, batch, args.repeats),
                       ms_per_image(pipeline.segment_many, grays, batch, args.repeats))
    print(f"\nMachine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; ONNX Runtime "
          f"{choose_providers(args.providers)}, {args.threads} threads; {len(grays)} images of shared/data/cxr, "
          f"median of {args.repeats}\n")
    print("| batch | lung model ms/image | opacity model ms/image | whole pipeline ms/image | pipeline vs batch 1 |")
    print("|---|---|---|---|---|")
    for batch, (lungs, opacity, whole) in rows.items():
        print(f"| {batch} | {lungs:.1f} | {opacity:.1f} | {whole:.1f} | {rows[1][2] / whole:.2f}x |")


if __name__ == "__main__":
    main()
