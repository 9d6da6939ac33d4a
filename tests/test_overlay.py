"""The overlay PNG: prediction and ground truth side by side on three views, true to spacing, with a legend."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from flare_c2f_extensions.io.overlay import PALETTE, VIEWS, overlay_figure, save_overlay

SHAPE, SPACING = (40, 30, 20), (1.0, 2.0, 3.0)


@pytest.fixture
def volumes():
    """A CT with two organs off the volume's centre; the prediction calls the liver's part in the patient's far
    left (x < 10 in RAS) inferior vena cava."""
    rng = np.random.default_rng(0)
    ct = rng.normal(40.0, 30.0, SHAPE).astype(np.float32)
    gt = np.zeros(SHAPE, np.int64)
    gt[4:18, 3:15, 2:12] = 1  # liver
    gt[6:16, 16:22, 4:10] = 5  # aorta
    pred = gt.copy()
    pred[:10][pred[:10] == 1] = 6
    return ct, pred, gt


def _panel(rgb, box):
    x0, y0, x1, y1 = box
    return rgb[y0:y1, x0:x1]


def test_panels_are_true_to_spacing_and_wide(volumes):
    ct, pred, gt = volumes
    rgb, layout = overlay_figure(ct, pred, gt, SPACING)
    assert rgb.shape[1] >= 900 and rgb.shape[2] == 3
    sizes = {key: (box[2] - box[0], box[3] - box[1]) for key, box in layout["panels"].items()}
    assert set(sizes) == {(view, row) for view in VIEWS for row in ("prediction", "ground truth")}
    mm = {"axial": (40 * 1.0, 30 * 2.0), "coronal": (40 * 1.0, 20 * 3.0), "sagittal": (30 * 2.0, 20 * 3.0)}
    px_per_mm = sizes[("axial", "prediction")][0] / mm["axial"][0]
    for (view, _), (width, height) in sizes.items():
        assert abs(width - mm[view][0] * px_per_mm) <= 1 and abs(height - mm[view][1] * px_per_mm) <= 1, view
    # anisotropy shows: the axial panel is 1.5x taller than wide, the sagittal one square
    assert sizes[("axial", "prediction")][1] == pytest.approx(1.5 * sizes[("axial", "prediction")][0], abs=2)
    assert sizes[("sagittal", "prediction")][1] == pytest.approx(sizes[("sagittal", "prediction")][0], abs=2)


def test_prediction_and_truth_differ_only_where_the_labels_do(volumes):
    ct, pred, gt = volumes
    same, layout = overlay_figure(ct, gt, gt, SPACING)
    for view in VIEWS:
        panels = [_panel(same, layout["panels"][(view, row)]) for row in ("prediction", "ground truth")]
        assert np.array_equal(*panels), view
    rgb, layout = overlay_figure(ct, pred, gt, SPACING)
    for view in ("axial", "coronal"):  # x across, the patient's right on the viewer's left: low x on the right
        p, g = (_panel(rgb, layout["panels"][(view, row)]) for row in ("prediction", "ground truth"))
        columns = np.nonzero((p != g).any(axis=(0, 2)))[0]
        assert len(columns) > 0, view
        assert columns.min() >= p.shape[1] * (1 - 10 / 40) - 2, view
        assert (p == PALETTE[6]).all(axis=-1).any() and not (g == PALETTE[6]).all(axis=-1).any(), view
    # the sagittal slice (x = 11, through the organs' centre) misses the difference
    sagittal = [_panel(rgb, layout["panels"][("sagittal", row)]) for row in ("prediction", "ground truth")]
    assert np.array_equal(*sagittal)


def test_slices_go_through_the_organs_and_the_legend_names_those_present(volumes):
    ct, pred, gt = volumes
    rgb, layout = overlay_figure(ct, pred, gt, SPACING, title="case")
    for key, box in layout["panels"].items():  # every view cuts the liver, although it is off the volume's centre
        assert (_panel(rgb, box) == PALETTE[1]).all(axis=-1).any(), key
    assert sorted(layout["legend"]) == [1, 5, 6]
    legend_top = min(box[1] for box in layout["legend"].values())
    legend = rgb[legend_top:]
    for organ, (x0, y0, x1, y1) in layout["legend"].items():
        assert tuple(rgb[(y0 + y1) // 2, (x0 + x1) // 2]) == tuple(PALETTE[organ])
    for organ in (2, 3, 13):
        assert not (legend == PALETTE[organ]).all(axis=-1).any()


def test_save_overlay_reads_any_orientation(volumes, tmp_path):
    ct, pred, gt = volumes
    affine = np.diag([*SPACING, 1.0])
    flip = np.diag([-1.0, -1.0, 1.0, 1.0])
    flip[:2, 3] = [(SHAPE[0] - 1) * SPACING[0], (SHAPE[1] - 1) * SPACING[1]]
    lps = affine @ flip  # the same anatomy stored as LPS
    paths = {}
    for name, array, dtype in (("ct", ct, np.int16), ("pred", pred, np.uint8), ("gt", gt, np.uint8)):
        paths[name] = tmp_path / f"{name}.nii.gz"
        nib.save(nib.Nifti1Image(array[::-1, ::-1].astype(dtype), lps), str(paths[name]))
    png = save_overlay(paths["ct"], paths["pred"], tmp_path / "out" / "case.png", paths["gt"], title="case")
    expected, _ = overlay_figure(ct.astype(np.int16).astype(np.float32), pred, gt, SPACING, title="case")
    assert np.array_equal(np.asarray(Image.open(png)), expected)
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["case.png"]
