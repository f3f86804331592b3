"""Training samples: images at training size with the masks that travel with them through
augmentation, and each image's weak labels. Built once per data set and cached as .npz."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
from tqdm import tqdm

from model.data import QuexRecord, Record, rasterize_labelme, read_lung_labels
from model.image import normalize_gray, read_gray
from model.infer import Pipeline, working_image
from model.lungs import ZONES, crop_box, zone_map

IGNORE_LABEL = 255
UNKNOWN = -1.0
# Masks of an opacity sample, in this order.
TARGET, WEIGHT, LUNG, ZONE = range(4)


@dataclass
class Samples:
    """`masks[i]` is a list of uint8 arrays the size of `images[i]`; `labels[i]` a dict of
    image-level labels (float arrays; UNKNOWN where not known)."""
    images: list = field(default_factory=list)
    masks: list = field(default_factory=list)
    labels: list = field(default_factory=list)
    names: list = field(default_factory=list)

    def __len__(self):
        return len(self.images)

    def add(self, image, masks, labels, name):
        self.images.append(image); self.masks.append(masks); self.labels.append(labels); self.names.append(name)

    def subset(self, keep) -> "Samples":
        picked = Samples()
        for i in np.flatnonzero(keep):
            picked.add(self.images[i], self.masks[i], self.labels[i], self.names[i])
        return picked

    def __add__(self, other):
        return Samples(self.images + other.images, self.masks + other.masks,
                       self.labels + other.labels, self.names + other.names)

    def save(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        keys = sorted(self.labels[0]) if self.labels else []
        np.savez_compressed(path, images=np.stack(self.images), masks=np.stack([np.stack(m) for m in self.masks]),
                            names=np.array(self.names), label_keys=np.array(keys),
                            **{f"label_{k}": np.stack([lab[k] for lab in self.labels]) for k in keys})

    @classmethod
    def load(cls, path: Path) -> "Samples":
        doc = np.load(path)
        keys = list(doc["label_keys"])
        labels = [dict(zip(keys, values)) for values in zip(*(doc[f"label_{k}"] for k in keys))] if keys else \
            [{} for _ in doc["names"]]
        return cls(list(doc["images"]), [list(m) for m in doc["masks"]], labels, list(doc["names"]))


def cached(path: Path, build) -> Samples:
    """Samples from `path`, or built by `build()` and saved there."""
    if path.exists():
        return Samples.load(path)
    samples = build()
    samples.save(path)
    return samples


def _resize(array, size, nearest):
    return cv2.resize(array, (size, size), interpolation=cv2.INTER_NEAREST if nearest else cv2.INTER_AREA)


def no_weak_labels() -> dict:
    return {"extent": np.array([UNKNOWN, UNKNOWN], np.float32), "zone_score": np.full(6, UNKNOWN, np.float32),
            "zone_negative": np.zeros(6, np.float32), "zone_positive": np.zeros(6, np.float32)}


def weak_labels(record: Record) -> dict:
    """Extent interval and Brixia zones of a Cohen-collection image. A zone is negative when every
    rater scored it 0, positive when every rater scored it >= 1; its score is the raters' mean."""
    labels = no_weak_labels()
    if record.extent_interval is not None:
        labels["extent"] = np.array(record.extent_interval, np.float32)
    raters = [zones for zones in (record.brixia_zones, record.brixia_junior_zones) if zones]
    if raters:
        scores = np.array([[zones[z] for z in ZONES] for zones in raters], np.float32)
        labels["zone_score"] = scores.mean(axis=0)
        labels["zone_negative"] = (scores == 0).all(axis=0).astype(np.float32)
        labels["zone_positive"] = (scores >= 1).all(axis=0).astype(np.float32)
    return labels


def lung_samples(records: list[Record], size: int) -> Samples:
    """Whole image -> label map (0 background, 1 right, 2 left, 255 ignore)."""
    samples = Samples()
    for record in tqdm(records, desc="lung samples", leave=False):
        image = normalize_gray(read_gray(record.image_path))
        labels, ignore = read_lung_labels(record.lung_mask_path)
        labels[ignore] = IGNORE_LABEL
        samples.add(_resize(image, size, False), [_resize(labels, size, True)], {}, record.filename)
    return samples


def _opacity_sample(image, lungs, target, weight, size):
    """Crop to the predicted lungs' box (as at inference) -> [target, weight, lung, zone] at `size`."""
    y0, y1, x0, x1 = crop_box(lungs > 0)
    crop = lambda a: _resize(np.ascontiguousarray(a[y0:y1, x0:x1]), size, True)  # noqa: E731
    return (_resize(np.ascontiguousarray(image[y0:y1, x0:x1]), size, False),
            [crop(target), crop(weight), crop((lungs > 0).astype(np.uint8)), crop(zone_map(lungs))])


def quex_samples(records: list[QuexRecord], pipeline: Pipeline, size: int) -> Samples:
    """QU-Ex radiographs: pixel supervision everywhere except lung the QU-Ex mask leaves out (it excludes
    the heart; this product's lung field includes the retrocardiac lung), which is unknown (weight 0)."""
    samples = Samples()
    for record in tqdm(records, desc="QU-Ex samples"):
        image = normalize_gray(read_gray(record.image_path))
        lungs, _ = pipeline.lungs(image)
        annotated_lung = read_gray(record.lung_mask_path) > 127
        if (lungs > 0).sum() < 0.5 * annotated_lung.sum():  # lung model failed: crop by the annotation
            lungs = annotated_lung.astype(np.uint8)
        target = (read_gray(record.infection_mask_path) > 127 if record.infection_mask_path
                  else np.zeros(image.shape, bool)).astype(np.uint8)
        weight = (~((lungs > 0) & ~annotated_lung)).astype(np.uint8)
        crop, masks = _opacity_sample(image, lungs, target, weight, size)
        samples.add(crop, masks, no_weak_labels(), record.filename)
    return samples


def cohen_samples(records: list[Record], pipeline: Pipeline, size: int) -> Samples:
    """Cohen-collection images with any opacity label. Polygons give pixel targets (every pixel
    weighted); extent and Brixia zones are image- and zone-level labels (pixels weighted 0)."""
    samples = Samples()
    for record in tqdm(records, desc="Cohen samples"):
        image = working_image(read_gray(record.image_path))
        lungs, _ = pipeline.lungs(image)
        labels = weak_labels(record)
        labels["polygons"] = np.float32(record.labelme_path is not None)
        if record.labelme_path:
            target = rasterize_labelme(record.labelme_path, image.shape)["opacity"].astype(np.uint8)
            weight = np.ones(image.shape, np.uint8)
        else:
            target = weight = np.zeros(image.shape, np.uint8)
        crop, masks = _opacity_sample(image, lungs, target, weight, size)
        samples.add(crop, masks, labels, record.filename)
    return samples
