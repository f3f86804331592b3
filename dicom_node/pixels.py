"""Image files (DICOM, PNG, JPEG) -> one gray channel where air is dark (MONOCHROME2)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom

from model.image import read_gray


class UnusableImage(ValueError):
    """The object has no single-frame gray or colour image the models can read."""


def is_dicom(path: Path) -> bool:
    with open(path, "rb") as handle:
        head = handle.read(132)
    return head[128:132] == b"DICM" or Path(path).suffix.lower() in (".dcm", ".dicom")


def dataset_gray(ds: pydicom.Dataset) -> np.ndarray:
    """Decoded pixels of a dataset as a 2-D array, MONOCHROME1 inverted so air is dark."""
    if "PixelData" not in ds:
        raise UnusableImage("no pixel data")
    bits_stored = int(ds.get("BitsStored", 8) or 0)
    if bits_stored < 6:
        raise UnusableImage(f"BitsStored {bits_stored}: too few gray levels for a radiograph")
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if frames != 1:
        raise UnusableImage(f"{frames} frames: only single-frame radiographs are analysed")
    try:
        pixels = ds.pixel_array
    except Exception as error:  # decoders raise many types; the reason is what matters
        raise UnusableImage(f"pixel data cannot be decoded: {error}") from error
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2"))
    if pixels.ndim == 3 and pixels.shape[-1] in (3, 4):
        if photometric.startswith("YBR"):
            from pydicom.pixels import convert_color_space
            pixels = convert_color_space(pixels, photometric, "RGB")
        pixels = pixels[..., :3].astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)
    if pixels.ndim != 2 or min(pixels.shape) < 32:
        raise UnusableImage(f"image shape {pixels.shape} is not a radiograph")
    if photometric == "MONOCHROME1":
        pixels = pixels.max() - pixels.astype(np.float32) + pixels.min()
    return pixels


def read_image(path: Path) -> np.ndarray:
    """A DICOM, PNG or JPEG file -> gray array (any bit depth; the model normalises it)."""
    path = Path(path)
    if is_dicom(path):
        return dataset_gray(pydicom.dcmread(path, force=True))
    return read_gray(path)
