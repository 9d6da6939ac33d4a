"""A look at a segmentation: the CT with the prediction and the ground truth side by side, on axial, coronal and
sagittal slices through the organs' centre, true to the voxel spacing, with a legend of the organs (PNG)."""

from __future__ import annotations

import os
from pathlib import Path

import nibabel as nib
import numpy as np
from PIL import Image, ImageDraw, ImageFont

from flare_c2f_extensions.io.files import atomic_path
from flare_c2f_extensions.labels import NUM_CLASSES, ORGANS

__all__ = ["PALETTE", "VIEWS", "overlay_figure", "overlay_slices", "save_overlay"]

# One colour per FLARE id (0 unused); distinct hues, readable on a grey CT.
PALETTE = np.array(
    [
        (0, 0, 0), (220, 80, 60), (60, 160, 220), (150, 90, 200), (240, 200, 60), (230, 30, 30), (40, 90, 230),
        (255, 130, 200), (200, 255, 120), (60, 220, 120), (255, 160, 40), (170, 120, 80), (120, 220, 220),
        (30, 200, 200),
    ],
    dtype=np.uint8,
)
assert len(PALETTE) == NUM_CLASSES
# view -> (RAS axis shown across, axis shown upwards, axis sliced, letters at the left and right edges).
# Radiological convention: the patient's right on the viewer's left, anterior (axial) or superior up.
VIEWS = {"axial": (0, 1, 2, "RL"), "coronal": (0, 2, 1, "RL"), "sagittal": (1, 2, 0, "AP")}
WHITE, GREY = (255, 255, 255), (170, 170, 170)
GAP, PAIR_GAP, MARGIN = 4, 16, 12


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: a fixed bitmap font
        return ImageFont.load_default()


def _display(volume: np.ndarray, view: str, index: int) -> np.ndarray:
    """The slice of a RAS volume as shown: rows from top to bottom, columns from the viewer's left."""
    across, up, sliced, _ = VIEWS[view]
    plane = np.take(volume, index, axis=sliced)  # axes (across, up), in that order since across < up
    return plane[::-1, ::-1].T


def _panel(ct: np.ndarray, labels: np.ndarray, size: tuple[int, int], alpha: float = 0.4) -> Image.Image:
    """The windowed CT (bilinear) with the labels (nearest) filled at ``alpha`` and outlined, at ``size``."""
    grey = np.clip((ct + 160.0) / 400.0, 0.0, 1.0) * 255.0  # window -160 to 240 HU
    grey = np.asarray(Image.fromarray(grey.astype(np.float32), mode="F").resize(size, Image.BILINEAR))
    label = np.asarray(Image.fromarray(labels.astype(np.uint8)).resize(size, Image.NEAREST)).astype(np.int64)
    label = np.where(label < NUM_CLASSES, label, 0)
    rgb = np.repeat(np.clip(grey, 0, 255)[..., None], 3, axis=-1)
    colour = PALETTE[label].astype(np.float32)
    rgb = np.where(label[..., None] > 0, (1 - alpha) * rgb + alpha * colour, rgb)
    edge = np.zeros(label.shape, bool)
    edge[:-1] |= label[:-1] != label[1:]
    edge[1:] |= label[:-1] != label[1:]
    edge[:, :-1] |= label[:, :-1] != label[:, 1:]
    edge[:, 1:] |= label[:, :-1] != label[:, 1:]
    rgb = np.where((edge & (label > 0))[..., None], colour, rgb)
    return Image.fromarray(rgb.astype(np.uint8))


def _centre(pred: np.ndarray, gt: np.ndarray | None) -> np.ndarray:
    """The centre of the organs (ground truth if it has any, else the prediction, else the volume)."""
    for labels in (gt, pred):
        if labels is not None and labels.any():
            return np.round(np.argwhere(labels > 0).mean(axis=0)).astype(int)
    return np.array(pred.shape) // 2


def overlay_figure(ct, pred, gt=None, spacing=(1.0, 1.0, 1.0), width: int = 1600, title: str = ""):
    """RGB uint8 figure of RAS-ordered arrays and its layout.

    For each view (axial, coronal, sagittal, through the organs' centre), the prediction and the ground truth (if
    given) side by side, scaled to square millimetres so the panels fill ``width`` pixels; a legend of the organs
    present in either label map below. The layout is ``{"panels": {(view, row): (x0, y0, x1, y1)},
    "legend": {organ id: (x0, y0, x1, y1) of its swatch}}``.
    """
    rows = {"prediction": pred} if gt is None else {"prediction": pred, "ground truth": gt}
    centre, spacing = _centre(pred, gt), np.asarray(spacing, float)
    mm = {v: (ct.shape[a] * spacing[a], ct.shape[u] * spacing[u]) for v, (a, u, _, _) in VIEWS.items()}
    gaps = 2 * MARGIN + len(VIEWS) * (len(rows) - 1) * GAP + (len(VIEWS) - 1) * PAIR_GAP
    scale = (width - gaps) / (len(rows) * sum(w for w, _ in mm.values()))
    sizes = {v: (max(1, round(w * scale)), max(1, round(h * scale))) for v, (w, h) in mm.items()}
    font, small = _font(20), _font(15)
    top = MARGIN + 68 if title else MARGIN + 44
    organs = [o for o in ORGANS if any((labels == o).any() for labels in rows.values())]
    legend_top = top + max(h for _, h in sizes.values()) + 14
    legend_rows = -(-len(organs) // 5)
    figure = Image.new("RGB", (width, legend_top + 26 * legend_rows + MARGIN), (0, 0, 0))
    draw = ImageDraw.Draw(figure)
    if title:
        draw.text((MARGIN, MARGIN), title, fill=WHITE, font=font)
    layout, x = {"panels": {}, "legend": {}}, MARGIN
    for view, (_, _, sliced, letters) in VIEWS.items():
        y = top + (legend_top - 14 - top - sizes[view][1]) // 2  # panels centred on the tallest one
        draw.text((x, y - 44), view, fill=WHITE, font=font)
        for row, labels in rows.items():
            box = (x, y, x + sizes[view][0], y + sizes[view][1])
            ct_slice, label_slice = _display(ct, view, centre[sliced]), _display(labels, view, centre[sliced])
            figure.paste(_panel(ct_slice, label_slice, sizes[view]), box[:2])
            draw.text((x, y - 20), row, fill=GREY, font=small)
            draw.text((x + 3, (box[1] + box[3]) // 2 - 8), letters[0], fill=WHITE, font=small)
            draw.text((box[2] - 13, (box[1] + box[3]) // 2 - 8), letters[1], fill=WHITE, font=small)
            layout["panels"][(view, row)] = box
            x = box[2] + GAP
        x += PAIR_GAP - GAP
    column = (width - 2 * MARGIN) // 5
    for i, organ in enumerate(organs):
        x0, y0 = MARGIN + (i % 5) * column, legend_top + 26 * (i // 5)
        layout["legend"][organ] = (x0, y0 + 2, x0 + 16, y0 + 18)
        draw.rectangle(layout["legend"][organ], fill=tuple(int(c) for c in PALETTE[organ]))
        draw.text((x0 + 22, y0), ORGANS[organ].replace("_", " "), fill=WHITE, font=small)
    return np.asarray(figure), layout


def overlay_slices(ct: np.ndarray, labels: np.ndarray, spacing=(1.0, 1.0, 1.0), width: int = 1200) -> np.ndarray:
    """RGB uint8 figure of one RAS-ordered label map over its CT (no ground truth): :func:`overlay_figure`."""
    return overlay_figure(np.asarray(ct, np.float32), np.asarray(labels), None, spacing, width)[0]


def _ras(path) -> tuple[np.ndarray, tuple[float, float, float]]:
    image = nib.as_closest_canonical(nib.load(str(path)))
    return np.asarray(image.dataobj), tuple(float(s) for s in image.header.get_zooms()[:3])


def save_overlay(image_path, pred_path, png_path, gt_path=None, title: str | None = None) -> Path:
    """Write the PNG of :func:`overlay_figure` for a CT file, its predicted label map and (optionally) the ground
    truth; the title defaults to the CT's file name."""
    ct, spacing = _ras(image_path)
    pred = _ras(pred_path)[0].astype(np.int64)
    gt = None if gt_path is None else _ras(gt_path)[0].astype(np.int64)
    title = Path(os.fspath(image_path)).name if title is None else title
    rgb, _ = overlay_figure(ct.astype(np.float32), pred, gt, spacing, title=title)
    png_path = Path(png_path)
    png_path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(png_path) as tmp:
        Image.fromarray(rgb).save(tmp, format="PNG")
    return png_path
