"""Lung geometry shared by training and inference: right/left labels, crop box, Brixia zones.

Convention: images are displayed as radiographs are read, so the patient's RIGHT lung is on the
image's LEFT side (smaller column index).
"""
from __future__ import annotations

import numpy as np
import cv2

RIGHT, LEFT = 1, 2
# Brixia zones A-F: upper/middle/lower thirds of the right lung, then of the left lung.
ZONES = ("A", "B", "C", "D", "E", "F")
ZONE_NAMES = {
    "A": "right upper", "B": "right middle", "C": "right lower",
    "D": "left upper", "E": "left middle", "F": "left lower",
}


def split_right_left(lung: np.ndarray) -> np.ndarray:
    """Binary lung mask -> label map (0 background, 1 right lung, 2 left lung).

    The two largest connected components are the lungs; the one further to the image's left is the
    patient's right. A single merged component is cut at the column with the fewest lung pixels in
    its central third.
    """
    lung = (lung > 0).astype(np.uint8)
    labels = np.zeros(lung.shape, np.uint8)
    count, components, stats, centroids = cv2.connectedComponentsWithStats(lung)
    if count <= 1:
        return labels
    order = np.argsort(stats[1:, cv2.CC_STAT_AREA])[::-1] + 1
    if count >= 3 and stats[order[1], cv2.CC_STAT_AREA] > 0.1 * stats[order[0], cv2.CC_STAT_AREA]:
        first, second = order[0], order[1]
        right, left = (first, second) if centroids[first][0] < centroids[second][0] else (second, first)
        labels[components == right] = RIGHT
        labels[components == left] = LEFT
        return labels
    only = components == order[0]
    x0, width = stats[order[0], cv2.CC_STAT_LEFT], stats[order[0], cv2.CC_STAT_WIDTH]
    columns = only.sum(axis=0)
    lo, hi = x0 + width // 3, x0 + 2 * width // 3
    cut = lo + int(np.argmin(columns[lo:hi + 1])) if hi > lo else x0 + width // 2
    labels[:, :cut][only[:, :cut]] = RIGHT
    labels[:, cut:][only[:, cut:]] = LEFT
    return labels


def crop_box(lung: np.ndarray, margin: float = 0.05) -> tuple[int, int, int, int]:
    """(y0, y1, x0, x1) of the lungs' bounding box grown by `margin` of the image size on every side.

    Falls back to the whole image when no lung was found, so opacity is still computed somewhere.
    """
    rows, cols = np.nonzero(lung)
    height, width = lung.shape
    if rows.size == 0:
        return 0, height, 0, width
    dy, dx = int(margin * height), int(margin * width)
    return (max(0, rows.min() - dy), min(height, rows.max() + 1 + dy),
            max(0, cols.min() - dx), min(width, cols.max() + 1 + dx))


def zone_map(labels: np.ndarray) -> np.ndarray:
    """Label map (0/1/2) -> zone map (0 outside lungs, 1..6 = zones A..F).

    Each lung's vertical extent is cut in thirds: a geometric stand-in for Brixia's anatomical lines
    (aortic arch and inferior pulmonary vein), which a segmentation model does not see.
    """
    zones = np.zeros(labels.shape, np.uint8)
    for lung_label, first_zone in ((RIGHT, 1), (LEFT, 4)):
        rows = np.nonzero((labels == lung_label).any(axis=1))[0]
        if rows.size == 0:
            continue
        top, bottom = rows.min(), rows.max() + 1
        cuts = [top + (bottom - top) * k // 3 for k in range(4)]
        for third in range(3):
            band = np.zeros(labels.shape, bool)
            band[cuts[third]:cuts[third + 1]] = True
            zones[band & (labels == lung_label)] = first_zone + third
    return zones
