"""Inference: gray image -> lung and opacity masks and the opacity percentages.

This is the model's whole interface to the rest of cxr-node. It runs on ONNX Runtime (no
TensorFlow); training code passes Keras models through the same `Pipeline` for cross-validation.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Protocol

import cv2
import numpy as np

from model.brixia import BrixiaMapping
from model.image import normalize_gray
from model.lungs import LEFT, RIGHT, ZONE_NAMES, ZONES, crop_box, split_right_left, zone_map

# The whole interface the node uses; lung labels and zone letters are part of what `segment` returns.
__all__ = ["LEFT", "RIGHT", "ZONES", "ZONE_NAMES", "Segmentation", "Segmenter", "Pipeline", "ModelInfo", "load_pipeline",
           "read_manifest", "choose_providers"]

WEIGHTS_DIR = Path(__file__).parent / "weights"
# Input sizes of the shipped models (ONNX models carry their own; see model/training/recipe.py).
LUNG_SIZE = 256      # whole image; lungs are large, and 256 keeps training feasible on 2 cores
OPACITY_SIZE = 256   # lung crop
# Lung pixels are kept from probability 0.3: chosen on the validation split (mean lung Dice 0.9487
# at 0.5, 0.9511 at 0.3, 0.9510 at 0.25, 0.9504 at 0.4), because densely opaque lung gets lower
# probabilities and would otherwise fall out of the lung field. Opacity keeps 0.5.
LUNG_THRESHOLD = 0.3
OPACITY_THRESHOLD = 0.5
# Masks are worked out on the image scaled to at most this side, then scaled up: the models see
# 256 px crops, so larger grids only cost time (a 3k image's job: 2.4 s -> 1.4 s, docs/PERFORMANCE.md).
WORKING_SIDE = 1024
# Lung confidence (mean lung probability over lung pixels) of a radiograph the right way round is
# 0.94-0.95 on the DICOM test files and 0.77-0.86 on the same images inverted. Below 0.9 the image is
# tried inverted too, and kept inverted when that is more confident by 0.05: a MONOCHROME1/2 label
# that contradicts the pixels must not give a silent garbage segmentation. Margins measured: the
# mislabelled Fake_MONOHR1.dcm +0.086; of the 460 Cohen images (all the right way round) 8 are below
# 0.9, their inverted margins -0.14 to +0.011 (a dark, low-contrast film).
POLARITY_CHECK_BELOW = 0.9
POLARITY_MARGIN = 0.05

# A batch of (n, size, size, 1) float32 images in [0, 1] -> (n, size, size, channels) probabilities.
Runner = Callable[[np.ndarray], np.ndarray]


@dataclass
class Segmentation:
    """Masks at the input image's own size and the figures derived from them."""
    lungs: np.ndarray            # uint8 label map: 0 background, 1 right lung, 2 left lung
    opacity: np.ndarray          # bool, always inside the lungs
    lung_confidence: float       # mean lung probability over predicted lung pixels (0..1)
    zone_opacity_pct: dict = field(default_factory=dict)  # Brixia zone letter -> opacity % of that zone
    # Brixia zone letter -> expected opacity % of that zone: the mean opacity probability over its lung
    # pixels. Faint opacity below the 0.5 threshold still counts here, so zones that show 0 % opacity
    # area are still ranked; the Brixia scores are read from it.
    zone_opacity_score: dict = field(default_factory=dict)
    inverted: bool = False       # the pixels were read inverted: their polarity label contradicted them
    brixia: dict = field(default_factory=dict)  # Brixia zone letter -> score 0-3 (empty without a mapping)

    @property
    def brixia_global(self) -> int | None:
        """Brixia global score 0-18 (the six zone scores summed), None without a mapping."""
        return sum(self.brixia.values()) if self.brixia else None

    @property
    def lung_area_px(self) -> int:
        return int((self.lungs > 0).sum())

    @property
    def opacity_area_px(self) -> int:
        return int(self.opacity.sum())

    def opacity_pct_of(self, region: np.ndarray) -> float:
        """Opacity area / lung area in `region`, in percent (0 when the region is empty)."""
        area = int(region.sum())
        return 100.0 * int((self.opacity & region).sum()) / area if area else 0.0

    @property
    def opacity_pct(self) -> float:
        return self.opacity_pct_of(self.lungs > 0)

    @property
    def right_opacity_pct(self) -> float:
        return self.opacity_pct_of(self.lungs == RIGHT)

    @property
    def left_opacity_pct(self) -> float:
        return self.opacity_pct_of(self.lungs == LEFT)

    def zone_masks(self) -> dict[str, np.ndarray]:
        """Brixia zone letter -> its lung pixels (upper/middle/lower third of its lung, model/lungs.py)."""
        zones = zone_map(self.lungs)
        return {letter: zones == index for index, letter in enumerate(ZONES, start=1)}


def _largest_components(mask: np.ndarray) -> np.ndarray:
    """Keep the largest connected component: stray specks are not lung."""
    count, components, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8))
    if count <= 1:
        return mask.astype(bool)
    return components == 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))


def working_image(gray: np.ndarray) -> np.ndarray:
    """Gray image of any size and bit depth -> uint8, scaled down to at most WORKING_SIDE."""
    height, width = gray.shape
    scale = WORKING_SIDE / max(height, width)
    if scale < 1:
        gray = cv2.resize(gray.astype(np.float32), (round(width * scale), round(height * scale)),
                          interpolation=cv2.INTER_AREA)
    return normalize_gray(gray)


class Segmenter(Protocol):
    """What the node calls: a radiograph in, its Segmentation out (Pipeline, batching.BatchingPipeline)."""
    version: str

    def segment(self, gray: np.ndarray) -> Segmentation: ...


class Pipeline:
    """Lungs on the whole image -> crop to the lungs' box -> opacity in the crop, kept inside the lungs."""

    def __init__(self, lung_runner: Runner, opacity_runner: Runner, version: str = "unversioned",
                 lung_size: int = LUNG_SIZE, opacity_size: int = OPACITY_SIZE, brixia: BrixiaMapping | None = None):
        self.lung_runner, self.opacity_runner, self.version = lung_runner, opacity_runner, version
        self.lung_size, self.opacity_size, self.brixia = lung_size, opacity_size, brixia

    def lungs(self, image: np.ndarray) -> tuple[np.ndarray, float]:
        """uint8 gray image -> (label map at the image's size, mean lung confidence)."""
        return self.lungs_many([image])[0]

    def lungs_many(self, images: list[np.ndarray]) -> list[tuple[np.ndarray, float]]:
        """lungs() of several images, the lung model run once over all of them."""
        small = np.stack([cv2.resize(image, (self.lung_size, self.lung_size), interpolation=cv2.INTER_AREA)
                          for image in images])
        probabilities = self.lung_runner(small[..., None].astype(np.float32) / 255.0)
        return [self._lung_labels(image.shape, prob) for image, prob in zip(images, probabilities)]

    @staticmethod
    def _lung_labels(shape: tuple[int, int], prob: np.ndarray) -> tuple[np.ndarray, float]:
        height, width = shape
        prob = cv2.resize(prob, (width, height), interpolation=cv2.INTER_LINEAR)
        lung_prob = prob.max(axis=-1)
        right = _largest_components((prob[..., 0] >= LUNG_THRESHOLD) & (prob[..., 0] >= prob[..., 1]))
        left = _largest_components((prob[..., 1] >= LUNG_THRESHOLD) & (prob[..., 1] > prob[..., 0]))
        labels = np.zeros(shape, np.uint8)
        labels[right], labels[left] = RIGHT, LEFT
        # A network can swap sides on an odd crop; anatomy (image position) decides the labels.
        labels = split_right_left(labels > 0) if right.any() and left.any() else labels
        confidence = float(lung_prob[labels > 0].mean()) if labels.any() else 0.0
        return labels, confidence

    def opacity_probability_many(self, images: list[np.ndarray], lungs: list[np.ndarray]) -> list[np.ndarray]:
        """Opacity probability of each image at its size (0 outside its lung crop), the opacity model
        run once over all the crops."""
        boxes = [crop_box(labels > 0) for labels in lungs]
        crops = np.stack([cv2.resize(image[y0:y1, x0:x1], (self.opacity_size, self.opacity_size),
                                     interpolation=cv2.INTER_AREA) for image, (y0, y1, x0, x1) in zip(images, boxes)])
        probabilities = self.opacity_runner(crops[..., None].astype(np.float32) / 255.0)[..., 0]
        fulls = []
        for image, (y0, y1, x0, x1), prob in zip(images, boxes, probabilities):
            full = np.zeros(image.shape, np.float32)
            full[y0:y1, x0:x1] = cv2.resize(prob, (x1 - x0, y1 - y0), interpolation=cv2.INTER_LINEAR)
            fulls.append(full)
        return fulls

    def oriented_lungs_many(self, images: list[np.ndarray]) -> list[tuple[np.ndarray, np.ndarray, float, bool]]:
        """(image, lungs, confidence, inverted) of each image: inverted when its lungs are found with clearly
        more confidence that way (see POLARITY_CHECK_BELOW); the doubtful ones are re-run as one batch."""
        found = [(image, labels, confidence, False)
                 for image, (labels, confidence) in zip(images, self.lungs_many(images))]
        doubtful = [index for index, (_, _, confidence, _) in enumerate(found) if confidence < POLARITY_CHECK_BELOW]
        if doubtful:
            inverted = self.lungs_many([255 - images[index] for index in doubtful])
            for index, (labels, confidence) in zip(doubtful, inverted):
                if confidence > found[index][2] + POLARITY_MARGIN:
                    found[index] = (255 - images[index], labels, confidence, True)
        return found

    def segment(self, gray: np.ndarray) -> Segmentation:
        """Gray image of any bit depth (MONOCHROME2 orientation: air is dark; an image whose lungs
        are clearer inverted is read inverted, and says so) -> Segmentation at the input's size."""
        return self.segment_many([gray])[0]

    def segment_many(self, grays: list[np.ndarray]) -> list[Segmentation]:
        """segment() of several images, each model run once per batch (what a GPU is fast at); the
        results are those of segment() one by one."""
        oriented = self.oriented_lungs_many([working_image(gray) for gray in grays])
        probabilities = self.opacity_probability_many([image for image, *_ in oriented],
                                                      [lungs for _, lungs, *_ in oriented])
        return [self._segmentation(gray, *found, probability)
                for gray, found, probability in zip(grays, oriented, probabilities)]

    def _segmentation(self, gray: np.ndarray, image: np.ndarray, lungs: np.ndarray, confidence: float,
                      inverted: bool, probability: np.ndarray) -> Segmentation:
        height, width = gray.shape
        opacity = (probability >= OPACITY_THRESHOLD) & (lungs > 0)
        working_zones = zone_map(lungs)
        zone_opacity_score = {letter: 100.0 * float(probability[working_zones == index].mean())
                              if (working_zones == index).any() else 0.0 for index, letter in enumerate(ZONES, start=1)}
        if image.shape != gray.shape:
            lungs = cv2.resize(lungs, (width, height), interpolation=cv2.INTER_NEAREST)
            opacity = cv2.resize(opacity.astype(np.uint8), (width, height), interpolation=cv2.INTER_NEAREST) > 0
        result = Segmentation(lungs=lungs, opacity=opacity, lung_confidence=confidence, inverted=inverted,
                              zone_opacity_score=zone_opacity_score)
        zones = zone_map(lungs)
        result.zone_opacity_pct = {letter: result.opacity_pct_of(zones == index)
                                   for index, letter in enumerate(ZONES, start=1)}
        if self.brixia is not None:
            result.brixia = self.brixia.zone_scores(result.zone_opacity_score)
        return result


@dataclass
class ModelInfo:
    """Identity of the shipped weights (written into DICOM outputs as the algorithm version) and how far
    each figure moves between copies of one film (`repeatability`: opacity_pct, brixia_global; measured by
    `cxr-node evaluate --repeatability`; empty until measured)."""
    name: str
    version: str
    sha256: dict
    repeatability: dict


def read_manifest(weights_dir: Path = WEIGHTS_DIR) -> ModelInfo:
    doc = json.loads((Path(weights_dir) / "manifest.json").read_text())
    return ModelInfo(name=doc["name"], version=doc["version"], sha256=doc["sha256"],
                     repeatability=doc.get("repeatability", {}))


def choose_providers(requested: list[str] | None) -> list[str]:
    """The requested ONNX Runtime providers this installation has, in order, and always the CPU last:
    a CUDA provider listed in the configuration is used where onnxruntime-gpu and a GPU are present."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    chosen = [p for p in (requested or []) if p in available and p != "CPUExecutionProvider"]
    return chosen + ["CPUExecutionProvider"]


def onnx_runner(path: Path, threads: int = 2, providers: list[str] | None = None) -> Runner:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    # tf2onnx's Resize attributes draw a deprecation warning per node at load: errors only.
    ort.set_default_logger_severity(3)
    options.log_severity_level = 3
    session = ort.InferenceSession(str(path), options, providers=choose_providers(providers))
    model_input = session.get_inputs()[0]

    def run(batch: np.ndarray) -> np.ndarray:
        return session.run(None, {model_input.name: batch})[0]

    run.input_size = model_input.shape[1]  # (n, size, size, 1)
    return run


def load_pipeline(weights_dir: Path = WEIGHTS_DIR, threads: int = 2, providers: list[str] | None = None) -> Pipeline:
    """The shipped models on ONNX Runtime, after checking their sha256 against the manifest (for calls made
    at the same time to share one run of each model, wrap it in batching.BatchingPipeline)."""
    import hashlib

    info = read_manifest(weights_dir)
    for filename, expected in info.sha256.items():
        actual = hashlib.sha256((Path(weights_dir) / filename).read_bytes()).hexdigest()
        if actual != expected:
            raise ValueError(f"{filename}: sha256 {actual} does not match the manifest ({expected})")
    lungs = onnx_runner(Path(weights_dir) / "lungs.onnx", threads, providers)
    opacity = onnx_runner(Path(weights_dir) / "opacity.onnx", threads, providers)
    brixia = Path(weights_dir) / "brixia.json"
    pipeline = Pipeline(lungs, opacity, version=info.version, lung_size=lungs.input_size,
                        opacity_size=opacity.input_size, brixia=BrixiaMapping.load(brixia) if brixia.exists() else None)
    return pipeline
