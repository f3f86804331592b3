"""Training augmentation as in Tang et al. 2020 (albumentations)."""
from __future__ import annotations

import albumentations as A
import cv2
import numpy as np


def build_augmentation(size: int) -> A.Compose:
    """Affine, perspective, brightness/contrast, blur/sharpen, noise and crops. Flips are done by
    `maybe_flip`, because a flip must swap the right and left lung labels."""
    return A.Compose([
        A.Affine(scale=(0.85, 1.15), translate_percent=(-0.06, 0.06), rotate=(-10, 10), shear=(-5, 5),
                 border_mode=cv2.BORDER_CONSTANT, fill=0, fill_mask=0, p=0.8),
        A.Perspective(scale=(0.02, 0.06), p=0.3),
        A.RandomResizedCrop(size=(size, size), scale=(0.75, 1.0), ratio=(0.85, 1.18), p=0.4),
        A.RandomBrightnessContrast(brightness_limit=0.2, contrast_limit=0.25, p=0.8),
        A.RandomGamma(gamma_limit=(75, 135), p=0.3),
        A.OneOf([A.GaussianBlur(blur_limit=(3, 5)), A.Sharpen(alpha=(0.1, 0.35))], p=0.4),
        A.GaussNoise(std_range=(0.01, 0.05), p=0.3),
    ])


def maybe_flip(image: np.ndarray, masks: list[np.ndarray], rng: np.random.Generator,
               swap_lung_labels: np.ndarray | None = None) -> tuple[np.ndarray, list[np.ndarray]]:
    """Horizontal flip with p=0.5. `swap_lung_labels` is a lookup table applied to the first mask
    (the lung label map), turning right into left and back."""
    if rng.random() >= 0.5:
        return image, masks
    image = image[:, ::-1]
    masks = [m[:, ::-1] for m in masks]
    if swap_lung_labels is not None:
        masks[0] = swap_lung_labels[masks[0]]
    return np.ascontiguousarray(image), [np.ascontiguousarray(m) for m in masks]
