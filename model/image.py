"""Gray images for the models: reading any PNG/JPEG mode into one channel, and the intensity
normalisation that training and inference share. The node reads images only through this module
and `model.infer`."""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np


def read_gray(path: Path) -> np.ndarray:
    """Any PNG/JPEG mode (gray, RGB, RGBA, palette, 16-bit) -> one uint8 gray channel."""
    image = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
    if image is None:
        raise ValueError(f"cannot read image {path}")
    return image


def normalize_gray(gray: np.ndarray) -> np.ndarray:
    """Any bit depth -> uint8 with the 0.5-99.5 percentile range stretched to 0-255, so 8-bit photos
    and 15-bit DICOM reach the models alike. Training and inference both use it."""
    gray = gray.astype(np.float32)
    low, high = np.percentile(gray, (0.5, 99.5))
    if high <= low:
        return np.zeros(gray.shape, np.uint8)
    return np.round(np.clip((gray - low) / (high - low), 0, 1) * 255).astype(np.uint8)
