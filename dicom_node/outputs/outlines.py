"""Outlines of masks as DICOM image coordinates: closed polylines in (column, row) with (0, 0) the
top left corner of the top left pixel (PS3.3 C.18.6.1.1), as SR SCOORDs and viewers expect them."""
from __future__ import annotations

import cv2
import numpy as np

# Vertices closer than this to the traced pixel boundary are dropped: a lung outline keeps ~100
# points instead of thousands, and no viewer can see the difference at a radiograph's size.
TOLERANCE_PX = 1.0


def outlines(mask: np.ndarray, min_area_px: int = 1) -> list[np.ndarray]:
    """The outer outline of each connected region of `mask`, largest first, each an (n, 2) float32 array
    whose last point repeats the first (a closed POLYLINE)."""
    contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    regions = [contour for contour in contours if cv2.contourArea(contour) >= min_area_px and len(contour) >= 3]
    regions.sort(key=cv2.contourArea, reverse=True)
    polylines = []
    for contour in regions:
        points = cv2.approxPolyDP(contour, TOLERANCE_PX, closed=True)[:, 0, :].astype(np.float32) + 0.5
        if len(points) >= 3:
            polylines.append(np.vstack([points, points[:1]]))
    return polylines


def hull(mask: np.ndarray) -> np.ndarray:
    """The convex hull of the mask (both lungs: the lung fields) as a closed POLYLINE. Not a rectangle:
    OHIF takes a four-cornered closed POLYLINE for one of its own rectangle tools and then draws nothing."""
    points = cv2.convexHull(np.argwhere(mask)[:, ::-1].astype(np.int32))[:, 0, :].astype(np.float32) + 0.5
    return np.vstack([points, points[:1]])
