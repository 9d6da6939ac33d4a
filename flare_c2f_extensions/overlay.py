"""A quick look at a segmentation: three orthogonal slices of the CT with the label map drawn over them."""

from __future__ import annotations

import os
from pathlib import Path

import nibabel as nib
import numpy as np
from PIL import Image

from .data import atomic_path
from .labels import NUM_CLASSES

# One colour per FLARE id (0 unused); distinct hues, readable on a grey CT.
PALETTE = np.array(
    [
        (0, 0, 0), (220, 80, 60), (60, 160, 220), (150, 90, 200), (240, 200, 60), (230, 30, 30), (40, 90, 230),
        (255, 130, 200), (200, 255, 120), (60, 220, 120), (255, 160, 40), (170, 120, 80), (120, 220, 220),
        (30, 200, 200),
    ],
    dtype=np.float32,
)
assert len(PALETTE) == NUM_CLASSES


def _window(ct: np.ndarray, low: float = -160.0, high: float = 240.0) -> np.ndarray:
    return np.clip((ct - low) / (high - low), 0.0, 1.0) * 255.0


def overlay_slices(ct: np.ndarray, labels: np.ndarray, spacing=(1.0, 1.0, 1.0), alpha: float = 0.45) -> np.ndarray:
    """RGB uint8 image: axial, coronal and sagittal slices through the labels' centre, side by side.

    Both arrays must be in RAS array order (``nibabel.as_closest_canonical``); slices are shown with the
    patient's anterior up (axial) and superior up (coronal, sagittal), stretched to square pixels.
    """
    fg = np.argwhere(labels > 0)
    centre = fg.mean(axis=0).astype(int) if len(fg) else np.array(labels.shape) // 2
    x, y, z = centre
    views = [
        (ct[:, :, z], labels[:, :, z], (0, 1)),
        (ct[:, y, :], labels[:, y, :], (0, 2)),
        (ct[x, :, :], labels[x, :, :], (1, 2)),
    ]
    pixel = min(spacing)
    panels = []
    for image, label, axes in views:
        grey = np.repeat(_window(image)[..., None], 3, axis=-1)
        colour = PALETTE[np.clip(label, 0, NUM_CLASSES - 1)]
        mix = np.where(label[..., None] > 0, (1 - alpha) * grey + alpha * colour, grey)
        panel = Image.fromarray(np.rot90(mix).astype(np.uint8))  # second array axis (A or S) up
        width = round(image.shape[0] * spacing[axes[0]] / pixel)
        height = round(image.shape[1] * spacing[axes[1]] / pixel)
        panels.append(np.asarray(panel.resize((width, height), Image.NEAREST)))
    height = max(p.shape[0] for p in panels)
    padded = [np.pad(p, ((0, height - p.shape[0]), (0, 4), (0, 0))) for p in panels]
    return np.concatenate(padded, axis=1)


def save_overlay(image_path: str | os.PathLike, label_path: str | os.PathLike, png_path: str | os.PathLike) -> Path:
    """Write a PNG of three orthogonal slices of ``image_path`` with ``label_path`` drawn over them."""
    ct = nib.as_closest_canonical(nib.load(str(image_path)))
    labels = nib.as_closest_canonical(nib.load(str(label_path)))
    spacing = tuple(float(s) for s in ct.header.get_zooms()[:3])
    ct_data = np.asarray(ct.dataobj, dtype=np.float32)
    rgb = overlay_slices(ct_data, np.asarray(labels.dataobj).astype(np.int64), spacing)
    png_path = Path(png_path)
    png_path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(png_path) as tmp:
        Image.fromarray(rgb).save(tmp, format="PNG")
    return png_path
