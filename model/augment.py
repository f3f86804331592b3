"""Training augmentation as in Tang et al. 2020 (albumentations), and optionally what films from other
sources bring: re-compression, rescaling, borders and crops, burned-in text and arrows, lines and tubes,
window changes."""
from __future__ import annotations

import albumentations as A
import cv2
import numpy as np

LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 "


class Markings(A.ImageOnlyTransform):
    """What sits on top of a radiograph without changing what is under it: text and letters (figure
    labels, side markers), arrows, and thin bright lines and curves (ECG leads, lines and tubes of a
    bedside film). The masks stay as they are: opacity under a label is still opacity."""

    def apply(self, img: np.ndarray, **params) -> np.ndarray:
        rng, out, size = self.random_generator, img.copy(), img.shape[0]
        for _ in range(int(rng.integers(1, 4))):
            kind, colour = rng.integers(3), int(rng.choice([255, 230, 0]))
            x, y = (int(v) for v in rng.integers(0, size, 2))
            if kind == 0:
                text = "".join(rng.choice(list(LETTERS), int(rng.integers(1, 8))))
                cv2.putText(out, text, (x, y), cv2.FONT_HERSHEY_SIMPLEX, float(rng.uniform(0.3, 1.2)), colour,
                            int(rng.integers(1, 3)), cv2.LINE_AA)
            elif kind == 1:
                dx, dy = (int(v) for v in rng.integers(-size // 6, size // 6, 2))
                cv2.arrowedLine(out, (x, y), (x + dx, y + dy), colour, int(rng.integers(1, 4)), cv2.LINE_AA, tipLength=0.3)
            else:  # a tube or lead: a smooth curve through three random points
                points = np.array([[x, y], *rng.integers(0, size, (2, 2))], np.float32)
                t = np.linspace(0, 1, 40)[:, None]
                curve = (1 - t) ** 2 * points[0] + 2 * t * (1 - t) * points[1] + t ** 2 * points[2]
                cv2.polylines(out, [curve.astype(np.int32)], False, colour, int(rng.integers(1, 3)), cv2.LINE_AA)
        return out

    def get_transform_init_args_names(self):
        return ()


def build_augmentation(size: int, films_from_elsewhere: bool = False) -> A.Compose:
    """Affine, perspective, brightness/contrast, blur/sharpen, noise and crops; with
    `films_from_elsewhere`, also JPEG at low quality, down- and up-scaling, borders and tighter crops,
    markings, and wider window (contrast, gamma) changes. Flips are done by `maybe_flip`, because a flip
    must swap the right and left lung labels."""
    steps = [
        A.Affine(scale=(0.85, 1.15), translate_percent=(-0.06, 0.06), rotate=(-10, 10), shear=(-5, 5),
                 border_mode=cv2.BORDER_CONSTANT, fill=0, fill_mask=0, p=0.8),
        A.Perspective(scale=(0.02, 0.06), p=0.3),
        A.RandomResizedCrop(size=(size, size), scale=(0.75, 1.0), ratio=(0.85, 1.18), p=0.4),
        A.RandomBrightnessContrast(brightness_limit=0.2, contrast_limit=0.25, p=0.8),
        A.RandomGamma(gamma_limit=(75, 135), p=0.3),
        A.OneOf([A.GaussianBlur(blur_limit=(3, 5)), A.Sharpen(alpha=(0.1, 0.35))], p=0.4),
        A.GaussNoise(std_range=(0.01, 0.05), p=0.3),
    ]
    if films_from_elsewhere:
        steps += [
            A.CropAndPad(percent=(-0.08, 0.15), border_mode=cv2.BORDER_CONSTANT, fill=0, fill_mask=0,
                         keep_size=True, p=0.3),  # borders (padding) or a tighter crop
            Markings(p=0.4),
            A.RandomBrightnessContrast(brightness_limit=0.15, contrast_limit=0.4, p=0.3),  # another window
            A.RandomGamma(gamma_limit=(60, 160), p=0.2),
            A.Downscale(scale_range=(0.3, 0.8), p=0.25),
            A.ImageCompression(quality_range=(15, 70), p=0.35),
        ]
    return A.Compose(steps)


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
