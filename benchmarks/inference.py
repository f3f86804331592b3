"""Inference time per image: ONNX Runtime (the shipped models) vs TensorFlow (same architecture),
both on 2 threads, on real radiographs; plus the whole pipeline and peak memory.

    .venv/bin/python benchmarks/inference.py [--images 20] [--repeats 3]
Prints a Markdown table (median and range over repeats)."""
from __future__ import annotations

import argparse
import os
import platform
import resource
import statistics
import time
from pathlib import Path

import cv2
import numpy as np
from tqdm import tqdm

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data" / "cxr"


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def timed(function, batches, repeats):
    """Median and range of ms per image over repeats."""
    per_image = []
    for _ in range(repeats):
        start = time.perf_counter()
        for batch in batches:
            function(batch)
        per_image.append(1000 * (time.perf_counter() - start) / len(batches))
    return statistics.median(per_image), min(per_image), max(per_image)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--images", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    import sys
    sys.path.insert(0, str(REPO))
    from model.data import load_records
    from model.image import normalize_gray, read_gray
    from model.infer import LUNG_SIZE, OPACITY_SIZE, WEIGHTS_DIR, load_pipeline, onnx_runner

    records = load_records(DATA)[: args.images]
    grays = [read_gray(r.image_path) for r in tqdm(records, desc="reading")]
    inputs = {size: [cv2.resize(normalize_gray(g), (size, size))[None, ..., None].astype(np.float32) / 255
                     for g in grays] for size in (LUNG_SIZE, OPACITY_SIZE)}
    rows = []
    runners = {"lungs": onnx_runner(WEIGHTS_DIR / "lungs.onnx", 2), "opacity": onnx_runner(WEIGHTS_DIR / "opacity.onnx", 2)}
    for name, size in (("lungs", LUNG_SIZE), ("opacity", OPACITY_SIZE)):
        runners[name](inputs[size][0])  # warm-up
        rows.append((f"{name} model {size}x{size}", "ONNX Runtime", *timed(runners[name], inputs[size], args.repeats)))
    pipeline = load_pipeline(threads=2)
    pipeline.segment(grays[0])
    rows.append(("whole pipeline (normalise, both models, masks, zones)", "ONNX Runtime",
                 *timed(pipeline.segment, grays, args.repeats)))
    onnx_rss = peak_rss_mb()

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    from model import network
    network.tf.config.threading.set_intra_op_parallelism_threads(2)
    network.tf.config.threading.set_inter_op_parallelism_threads(1)
    for name, size, channels in (("lungs", LUNG_SIZE, 2), ("opacity", OPACITY_SIZE, 1)):
        model = network.build_unet(size, channels)
        predict = network.tf.function(lambda x, m=model: m(x, training=False))
        predict(inputs[size][0])
        rows.append((f"{name} model {size}x{size}", "TensorFlow", *timed(predict, inputs[size], args.repeats)))

    print(f"\nMachine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}; "
          f"{len(grays)} real images from shared/data/cxr, batch 1, 2 threads, {args.repeats} repeats\n")
    print("| step | runtime | ms/image (median) | min | max |\n|---|---|---|---|---|")
    for step, runtime, median, low, high in rows:
        print(f"| {step} | {runtime} | {median:.0f} | {low:.0f} | {high:.0f} |")
    print(f"\nPeak RSS: {onnx_rss:.0f} MB with ONNX Runtime only; {peak_rss_mb():.0f} MB after loading TensorFlow too")


if __name__ == "__main__":
    main()
