"""FLARE22 DSC / NSD on hand-made masks whose scores are derived on paper in the comments.

Surface geometry used by the derivations (DeepMind's surfels, which MONAI's use_subvoxels=True implements):
surfels sit on the grid of voxel corners; a corner point is on the surface when its 2x2x2 neighbourhood of
voxels is mixed. For a box of a x b x c voxels the surface points are the grid points on the boundary of the
closed corner box [x0, x0+a] x [y0, y0+b] x [z0, z0+c], with these areas (spacing sx, sy, sz in mm):

- face interior (4 of the 8 voxels set, coplanar): the full face, e.g. sx*sy on a z face;
- edge (2 voxels set, the edge runs along x): a rectangle sx long and half a face diagonal wide,
  sx * sqrt(sy^2 + sz^2) / 2 (likewise for edges along y and z);
- corner (1 voxel set): the triangle through three half-edge points, sqrt(sy^2 sz^2 + sx^2 sz^2 + sx^2 sy^2) / 8.

Distances are measured between surface points, in mm.
"""

from __future__ import annotations

import csv
import json
import math

import nibabel as nib
import numpy as np
import pytest
import torch
from scipy import ndimage

from flare_c2f_extensions.evaluation.metrics import (
    evaluate_case,
    evaluate_folder,
    load_label_map,
    organ_scores,
    surface_dice,
)
from flare_c2f_extensions.io.discovery import case_name, is_nifti
from flare_c2f_extensions.labels import NSD_TOLERANCE_MM, ORGAN_IDS, ORGANS, SLAB_ORGANS

LIVER, AORTA, IVC, GALLBLADDER, ESOPHAGUS, DUODENUM = 1, 5, 6, 9, 10, 12


def box(shape, lo, size, label=1, dtype=np.uint8):
    """Label map of ``shape`` holding one box ``[lo, lo + size)`` of ``label``."""
    out = np.zeros(shape, dtype)
    out[tuple(slice(start, start + s) for start, s in zip(lo, size))] = label
    return out


def box_areas(size, spacing):
    """(total surface area, areas by kind) of an a x b x c box, from the surfel rules in the module doc."""
    a, b, c = size
    sx, sy, sz = spacing
    face = {"x": sy * sz, "y": sx * sz, "z": sx * sy}
    edge = {
        "x": sx * math.hypot(sy, sz) / 2,
        "y": sy * math.hypot(sx, sz) / 2,
        "z": sz * math.hypot(sx, sy) / 2,
    }
    corner = math.sqrt((sy * sz) ** 2 + (sx * sz) ** 2 + (sx * sy) ** 2) / 8
    total = (
        2 * (a - 1) * (b - 1) * face["z"]
        + 2 * (b - 1) * (c - 1) * face["x"]
        + 2 * (a - 1) * (c - 1) * face["y"]
        + 4 * (a - 1) * edge["x"]
        + 4 * (b - 1) * edge["y"]
        + 4 * (c - 1) * edge["z"]
        + 8 * corner
    )
    return total, face, edge, corner


def nsd_box_shifted_one_slice(size, spacing, tol):
    """Surface Dice of an a x b x c box against itself shifted by one slice along z, when sz > tol.

    Derivation (gt box on z in [z0, z0+c), prediction on [z0+1, z0+c+1)):
    - gt bottom face (k = z0, its interior, its 4 edges and 4 corners): the prediction's closed corner box
      starts at z0+1 right above, so every such point is sz > tol away -> not counted;
    - gt side points with z0 < k <= z0+c lie on the prediction's side faces -> distance 0, counted
      (side face interiors, vertical edges, and the top face's 4 edges and 4 corners);
    - gt top face interior points (k = z0+c) lie inside the prediction's corner box: distance
      min(in-plane distance to the rim, sz); counted iff the in-plane distance to the rim is <= tol.
    Reflecting z swaps the two boxes, so the prediction's surface scores the same, and
    NSD = counted gt area / total gt area.
    """
    a, b, c = size
    sx, sy, sz = spacing
    assert sz > tol and c >= 2
    total, face, edge, corner = box_areas(size, spacing)
    bottom = (a - 1) * (b - 1) * face["z"] + 2 * (a - 1) * edge["x"] + 2 * (b - 1) * edge["y"] + 4 * corner
    far_x = sum(min(k, a - k) * sx > tol for k in range(1, a))
    far_y = sum(min(k, b - k) * sy > tol for k in range(1, b))
    top_far = far_x * far_y * face["z"]
    return (total - bottom - top_far) / total


def assert_rounded(scores):
    for dsc, nsd in scores.values():
        assert dsc == round(dsc, 4) and nsd == round(nsd, 4)


# ---------------------------------------------------------------------------------------------- organ_scores


def test_cubes_shifted_within_tolerance():
    # 10^3 cube; prediction shifted by d voxels along x. Overlap (10-d)*100 voxels, so
    # DSC = 2 (10-d) 100 / 2000 = (10-d)/10. Every gt surface point p has p + d e_x on the prediction's
    # surface, so every distance is <= d * sx; with d * sx <= tolerance, NSD = 1.
    shape = (24, 20, 20)
    gt = box(shape, (5, 5, 5), (10, 10, 10), GALLBLADDER)  # tolerance 2 mm
    for d, expected_dsc in ((1, 0.9), (2, 0.8)):
        pred = box(shape, (5 + d, 5, 5), (10, 10, 10), GALLBLADDER)
        scores = organ_scores(pred, gt, (1.0, 1.0, 1.0), labels=[GALLBLADDER])
        assert scores == {GALLBLADDER: (expected_dsc, 1.0)}


def test_slab_shifted_beyond_tolerance_gives_derived_fraction():
    # 12 x 12 x 3 slab, shifted one slice along z, isotropic 3 mm, gallbladder (2 mm): shift 3 mm > 2 mm.
    # DSC = 2 * (2/3 of 432) / (2 * 432) = 2/3 -> 0.6667 (also a rounding check).
    # NSD: see nsd_box_shifted_one_slice; with 3 mm in-plane every top face interior point is far too, so
    # counted = side faces + vertical edges + top rim. Faces 9 mm^2, edges 1.5*sqrt(18) = 6.364, corners
    # sqrt(243)/8 = 1.949: total = 2*121*9 + 4*11*2*9 + 96*6.364 + 8*1.949 = 3596.5; bottom = 1089 + 44*6.364
    # + 4*1.949 = 1376.9; far top interior = 1089; NSD = (3596.5 - 1376.9 - 1089) / 3596.5 = 0.3144.
    spacing, size = (3.0, 3.0, 3.0), (12, 12, 3)
    gt = box((18, 18, 9), (3, 3, 3), size, GALLBLADDER)
    pred = box((18, 18, 9), (3, 3, 4), size, GALLBLADDER)
    expected = nsd_box_shifted_one_slice(size, spacing, NSD_TOLERANCE_MM[GALLBLADDER])
    raw = surface_dice(pred == GALLBLADDER, gt == GALLBLADDER, spacing, NSD_TOLERANCE_MM[GALLBLADDER])
    assert raw == pytest.approx(expected, abs=1e-6)
    dsc, nsd = organ_scores(pred, gt, spacing, labels=[GALLBLADDER])[GALLBLADDER]
    assert dsc == 0.6667
    assert nsd == round(expected, 4) == 0.3144


def test_anisotropic_spacing_same_shift_inside_fine_axis_outside_coarse_axis():
    # Spacing (1, 1, 3) mm, gallbladder tolerance 2 mm, 12 x 12 x 4 box.
    # One voxel along x (fine axis): every distance <= 1 mm -> NSD 1; DSC = 2*11/24 = 0.9167.
    # One voxel along z (coarse axis): 3 mm > 2 mm -> the derived fraction; DSC = 2*3/8 = 0.75. With 1 mm
    # in-plane the top face interior points within 2 voxels of the rim still count (far: 7 x 7 of 11 x 11).
    # Faces 1 (z) and 3 (x, y) mm^2, edges along x/y sqrt(10)/2 = 1.581, along z 3*sqrt(2)/2 = 2.121, corners
    # sqrt(19)/8 = 0.545: total = 242 + 396 + 88*1.581 + 12*2.121 + 8*0.545 = 806.9; bottom = 121 + 44*1.581
    # + 4*0.545 = 192.8; far top = 49; NSD = (806.9 - 192.8 - 49) / 806.9 = 0.7004.
    spacing, size, shape = (1.0, 1.0, 3.0), (12, 12, 4), (18, 18, 10)
    gt = box(shape, (3, 3, 3), size, GALLBLADDER)
    along_x = box(shape, (4, 3, 3), size, GALLBLADDER)
    along_z = box(shape, (3, 3, 4), size, GALLBLADDER)
    assert organ_scores(along_x, gt, spacing, labels=[GALLBLADDER])[GALLBLADDER] == (0.9167, 1.0)
    expected = nsd_box_shifted_one_slice(size, spacing, 2.0)
    dsc, nsd = organ_scores(along_z, gt, spacing, labels=[GALLBLADDER])[GALLBLADDER]
    assert (dsc, nsd) == (0.75, round(expected, 4)) == (0.75, 0.7004)
    # The same voxel shift with the coarse axis first: x now 3 mm, z 1 mm -> swapped verdicts.
    spacing_t = (3.0, 1.0, 1.0)
    gt_t, along_x_t, along_z_t = (np.ascontiguousarray(m.transpose(2, 1, 0)) for m in (gt, along_x, along_z))
    assert organ_scores(along_x_t, gt_t, spacing_t, labels=[GALLBLADDER])[GALLBLADDER] == (0.9167, 1.0)
    assert organ_scores(along_z_t, gt_t, spacing_t, labels=[GALLBLADDER])[GALLBLADDER] == (0.75, round(expected, 4))


def test_empty_rules():
    shape = (10, 10, 10)
    empty = np.zeros(shape, np.uint8)
    organ = box(shape, (2, 2, 2), (4, 4, 4), LIVER)
    # both empty -> (1, 1) for every organ
    assert organ_scores(empty, empty, (1, 1, 1)) == {label: (1.0, 1.0) for label in ORGANS}
    # exactly one empty -> (0, 0), either way round; the other organs are both empty -> (1, 1)
    for pred, gt in ((organ, empty), (empty, organ)):
        scores = organ_scores(pred, gt, (1, 1, 1))
        assert scores[LIVER] == (0.0, 0.0)
        assert all(scores[label] == (1.0, 1.0) for label in ORGANS if label != LIVER)


def test_slab_rule_cuts_to_gt_slices_and_leaves_out_the_top_one():
    # Aorta gt on slices 2..9, prediction on 0..15, same 6 x 6 footprint. Cut to [2:9] both are slices
    # 2..8 -> (1, 1). Without the cut DSC would be 2*8/(8+16) = 0.6667 (what the liver, no slab organ, gets).
    shape = (12, 12, 20)
    for label in SLAB_ORGANS:
        gt = box(shape, (3, 3, 2), (6, 6, 8), label)
        pred = box(shape, (3, 3, 0), (6, 6, 16), label)
        assert organ_scores(pred, gt, (1, 1, 1), labels=[label]) == {label: (1.0, 1.0)}
    gt = box(shape, (3, 3, 2), (6, 6, 8), LIVER)
    pred = box(shape, (3, 3, 0), (6, 6, 16), LIVER)
    assert organ_scores(pred, gt, (1, 1, 1), labels=[LIVER])[LIVER][0] == 0.6667

    gt = box(shape, (3, 3, 2), (6, 6, 8), AORTA)
    # Prediction missing only the top gt slice 9: identical on [2:9] -> (1, 1)
    # (were slice 9 counted: DSC 2*7/(7+8) = 0.9333).
    pred = box(shape, (3, 3, 2), (6, 6, 7), AORTA)
    assert organ_scores(pred, gt, (1, 1, 1), labels=[AORTA])[AORTA] == (1.0, 1.0)
    # Prediction only on the top slice 9 and above it: not empty in full (full DSC 2*1/(8+1) = 0.22 would
    # pass the 0.2 rule), but empty once cut -> DSC 0, NSD 0.
    pred = box(shape, (3, 3, 9), (6, 6, 5), AORTA)
    assert organ_scores(pred, gt, (1, 1, 1), labels=[AORTA])[AORTA] == (0.0, 0.0)
    # The empty checks look at the full masks first: empty prediction -> (0, 0) like any organ.
    assert organ_scores(np.zeros(shape, np.uint8), gt, (1, 1, 1), labels=[AORTA])[AORTA] == (0.0, 0.0)


def test_slab_organ_on_one_gt_slice_scores_as_nothing_to_compare():
    # gt aorta on slice 5 only: [zmin:zmax] = [5:5] is empty, both cut masks are empty (the official code
    # would divide 0 by 0); our documented guard scores it (1, 1), whatever the prediction holds.
    shape = (10, 10, 10)
    gt = box(shape, (2, 2, 5), (5, 5, 1), AORTA)
    for pred in (gt.copy(), box(shape, (2, 2, 0), (5, 5, 10), AORTA)):
        assert organ_scores(pred, gt, (1, 1, 1), labels=[AORTA])[AORTA] == (1.0, 1.0)


def test_dsc_below_0_2_forces_nsd_to_zero_even_with_close_surfaces():
    # gt: a 10 x 10 x 1 plate (100 voxels); prediction: the 10 x 10 x 10 box standing on it (1000 voxels,
    # the plate is its bottom layer). DSC = 2*100/1100 = 0.1818 < 0.2.
    # Surfaces, spacing (1, 1, 0.5), duodenum tolerance 7 mm: the plate's corner box is z in [5, 6], the
    # prediction's z in [5, 15]. A prediction point is at most 9 slices * 0.5 = 4.5 mm above the plate's top
    # face; a plate point is on the prediction's bottom face (0) or 1 slice = 0.5 mm above it. All <= 7 mm,
    # so the raw surface Dice is exactly 1 -- and the DSC rule still sets NSD to 0.
    shape, spacing = (14, 14, 18), (1.0, 1.0, 0.5)
    gt = box(shape, (2, 2, 5), (10, 10, 1), DUODENUM)
    pred = box(shape, (2, 2, 5), (10, 10, 10), DUODENUM)
    assert surface_dice(pred == DUODENUM, gt == DUODENUM, spacing, NSD_TOLERANCE_MM[DUODENUM]) == pytest.approx(1.0)
    assert organ_scores(pred, gt, spacing, labels=[DUODENUM]) == {DUODENUM: (0.1818, 0.0)}
    # Just above the threshold the surface Dice is used: 2 slices of gt in 10 -> DSC 2*200/1200 = 0.3333.
    gt2 = box(shape, (2, 2, 5), (10, 10, 2), DUODENUM)
    assert organ_scores(pred, gt2, spacing, labels=[DUODENUM]) == {DUODENUM: (0.3333, 1.0)}


def test_values_are_rounded_to_4_decimals():
    # 11 x 11 x 11 cube vs the same cube shifted by 1 along y: DSC = 2*10/22 = 0.909090.. -> 0.9091;
    # liver tolerance 5 mm, distances <= 1 mm -> NSD 1.
    shape = (16, 16, 16)
    gt = box(shape, (2, 2, 2), (11, 11, 11), LIVER)
    pred = box(shape, (2, 3, 2), (11, 11, 11), LIVER)
    scores = organ_scores(pred, gt, (1, 1, 1))
    assert scores[LIVER] == (0.9091, 1.0)
    assert_rounded(scores)


def test_crop_to_organ_box_does_not_change_surface_dice():
    # Surface Dice only sees the two surfaces (translation invariant) and zero padding keeps the box border
    # empty, so scoring inside the padded union box must equal MONAI on the full volume -- also when the
    # organ touches the volume border (MONAI pads outside the volume with background, as we do).
    from monai.metrics import compute_surface_dice

    rng = np.random.default_rng(7)
    shape = (40, 36, 30)
    for trial in range(4):
        noise = ndimage.gaussian_filter(rng.standard_normal(shape), 2.5)
        gt = noise > 0.05
        pred = np.roll(ndimage.binary_dilation(gt, iterations=trial % 2 + 1), trial, axis=trial % 3)
        if trial == 3:  # make both touch the volume border
            gt[0], pred[0] = True, True
        spacing = [(0.8, 0.8, 2.5), (1.0, 1.0, 1.0), (3.0, 0.7, 1.5), (0.7, 2.0, 0.9)][trial]
        for tol in (2.0, 5.0):
            full = compute_surface_dice(
                torch.from_numpy(pred)[None, None],
                torch.from_numpy(gt)[None, None],
                class_thresholds=[tol],
                include_background=True,
                spacing=list(spacing),
                use_subvoxels=True,
            )
            cropped = surface_dice(pred, gt, spacing, tol)
            assert cropped == pytest.approx(float(full[0, 0]), abs=1e-6)
            # and the same masks placed inside a much larger, empty volume
            big_pred, big_gt = (np.pad(m, ((5, 17), (3, 9), (11, 2))) for m in (pred, gt))
            assert surface_dice(big_pred, big_gt, spacing, tol) == pytest.approx(cropped, abs=1e-6)


def test_all_13_organs_at_once_match_one_by_one_and_ignore_other_values():
    # A label map with all 13 organs as boxes plus a value that is no organ (99): the one-pass box search
    # must give the same scores as scoring each organ on its own binary map.
    shape = (40, 40, 40)
    gt = np.zeros(shape, np.uint8)
    for label in ORGANS:
        i, j = divmod(label - 1, 4)
        gt[2 + 9 * i : 9 + 9 * i, 2 + 9 * j : 9 + 9 * j, 5 + label : 20 + label] = label
    pred = np.roll(gt, (1, 0, 1), axis=(0, 1, 2))
    pred[30:, 30:, :5] = 99
    spacing = (0.9, 1.1, 2.0)
    scores = organ_scores(pred, gt, spacing)
    assert set(scores) == set(ORGANS)
    assert_rounded(scores)
    for label in ORGANS:
        alone = organ_scores((pred == label).astype(np.uint8) * label, (gt == label).astype(np.uint8) * label,
                             spacing, labels=[label])
        assert alone[label] == scores[label]


def test_bad_inputs():
    with pytest.raises(ValueError, match="shape"):
        organ_scores(np.zeros((4, 4, 4), np.uint8), np.zeros((4, 4, 5), np.uint8), (1, 1, 1))
    with pytest.raises(ValueError, match="spacing"):
        organ_scores(np.zeros((4, 4, 4), np.uint8), np.zeros((4, 4, 4), np.uint8), (1, 1))
    with pytest.raises(KeyError):
        organ_scores(np.zeros((4, 4, 4), np.uint8), np.zeros((4, 4, 4), np.uint8), (1, 1, 1), labels=[14])
    with pytest.raises(TypeError, match="integers"):
        organ_scores(np.zeros((4, 4, 4), np.float32), np.zeros((4, 4, 4), np.uint8), (1, 1, 1))


# ------------------------------------------------------------------------------------------- files, folders


def save(path, data, spacing=(1.0, 1.0, 1.0), dtype=np.uint8):
    img = nib.Nifti1Image(np.asarray(data, dtype=dtype), np.diag([*spacing, 1.0]))
    nib.save(img, str(path))
    return path


def test_evaluate_case_uses_gt_spacing_and_rounds_float_labels(tmp_path):
    # The anisotropic z shift from above; the prediction's header claims 1 mm slices, the gt's 3 mm: the
    # gt spacing wins. The prediction is stored as float32 with values 8.9999 (rounded to 9).
    spacing, size, shape = (1.0, 1.0, 3.0), (12, 12, 4), (18, 18, 10)
    gt = box(shape, (3, 3, 3), size, GALLBLADDER)
    pred = box(shape, (3, 3, 4), size, GALLBLADDER).astype(np.float32) * (8.9999 / 9)
    gt_path = save(tmp_path / "gt.nii.gz", gt, spacing)
    pred_path = save(tmp_path / "pred.nii.gz", pred, (1.0, 1.0, 1.0), dtype=np.float32)
    data, read_spacing, _ = load_label_map(pred_path)
    assert data.dtype == np.uint8 and set(np.unique(data)) == {0, GALLBLADDER}
    assert load_label_map(gt_path)[1] == spacing
    with pytest.warns(UserWarning, match="affines"):
        scores = evaluate_case(pred_path, gt_path)
    expected = round(nsd_box_shifted_one_slice(size, spacing, 2.0), 4)
    assert scores[GALLBLADDER] == (0.75, expected)
    assert all(scores[label] == (1.0, 1.0) for label in ORGANS if label != GALLBLADDER)


def test_evaluate_case_shape_mismatch_names_both_files(tmp_path):
    gt_path = save(tmp_path / "case_gt.nii.gz", np.zeros((8, 8, 6)))
    pred_path = save(tmp_path / "case_pred.nii.gz", np.zeros((8, 8, 7)))
    with pytest.raises(ValueError) as info:
        evaluate_case(pred_path, gt_path)
    message = str(info.value)
    for text in (str(pred_path), str(gt_path), "(8, 8, 7)", "(8, 8, 6)"):
        assert text in message


def test_case_name():
    assert case_name("/x/FLARE22_Tr_0001.nii.gz") == "FLARE22_Tr_0001"
    assert case_name("FLARE22_Tr_0002.nii") == "FLARE22_Tr_0002"
    assert case_name("/x/FLARE22_Tr_0001_0000.nii.gz") == "FLARE22_Tr_0001"
    assert not is_nifti("notes.txt")


def test_evaluate_folder_writes_csv_and_json_and_counts_missing_predictions(tmp_path):
    shape = (16, 16, 16)
    gt_dir, pred_dir, out_dir = tmp_path / "gt", tmp_path / "pred", tmp_path / "out"
    gt_dir.mkdir()
    pred_dir.mkdir()
    # Case A: liver exact (1, 1); spleen cube shifted by 1 along x, 10^3 -> (0.9, 1); other organs absent in
    # both -> (1, 1). Prediction stored as .nii (uncompressed) to check the pairing.
    gt_a = box(shape, (1, 1, 1), (5, 5, 5), LIVER)
    gt_a[5:15, 5:15, 5:15] = 3
    pred_a = gt_a.copy()
    pred_a[pred_a == 3] = 0
    pred_a[6:16, 5:15, 5:15] = 3
    save(gt_dir / "FLARE22_Tr_0001.nii.gz", gt_a)
    save(pred_dir / "FLARE22_Tr_0001.nii", pred_a)
    # Case B: no prediction -> liver and spleen (0, 0), the rest (1, 1).
    save(gt_dir / "FLARE22_Tr_0002.nii.gz", gt_a)
    # A prediction without ground truth and a stray file are ignored.
    save(pred_dir / "FLARE22_Tr_0099.nii.gz", gt_a)
    (pred_dir / "readme.txt").write_text("not a case")

    summary = evaluate_folder(str(pred_dir), str(gt_dir), str(out_dir))

    with open(out_dir / "metrics.csv", newline="") as handle:
        rows = list(csv.reader(handle))
    header = ["case"] + [f"{ORGANS[label]}_{kind}" for label in ORGANS for kind in ("DSC", "NSD")]
    assert rows[0] == header
    assert [row[0] for row in rows[1:]] == ["FLARE22_Tr_0001", "FLARE22_Tr_0002"]
    a = dict(zip(header, rows[1]))
    b = dict(zip(header, rows[2]))
    assert (float(a["liver_DSC"]), float(a["liver_NSD"])) == (1.0, 1.0)
    assert (float(a["spleen_DSC"]), float(a["spleen_NSD"])) == (0.9, 1.0)
    assert float(a["pancreas_DSC"]) == 1.0 and float(b["pancreas_NSD"]) == 1.0
    assert (float(b["liver_DSC"]), float(b["liver_NSD"]), float(b["spleen_DSC"])) == (0.0, 0.0, 0.0)

    on_disk = json.loads((out_dir / "summary.json").read_text())
    assert on_disk == summary
    assert summary["num_cases"] == 2
    assert summary["missing_predictions"] == ["FLARE22_Tr_0002"]
    assert summary["unmatched_predictions"] == ["FLARE22_Tr_0099"]
    organs = summary["organs"]
    assert list(organs) == list(ORGAN_IDS)
    assert organs["liver"] == {"DSC": 0.5, "NSD": 0.5}
    assert organs["spleen"] == {"DSC": pytest.approx(0.45), "NSD": 0.5}
    assert organs["pancreas"] == {"DSC": 1.0, "NSD": 1.0}
    # 13-organ means: 11 organs at 1, liver 0.5/0.5, spleen 0.45/0.5
    assert summary["mean_DSC"] == pytest.approx((11 + 0.5 + 0.45) / 13)
    assert summary["mean_NSD"] == pytest.approx((11 + 0.5 + 0.5) / 13)
    # atomic writes leave no temporary files behind
    assert sorted(p.name for p in out_dir.iterdir()) == ["metrics.csv", "summary.json"]


def test_evaluate_folder_missing_or_empty_folder(tmp_path):
    (tmp_path / "gt").mkdir()
    (tmp_path / "pred").mkdir()
    save(tmp_path / "pred" / "c.nii.gz", np.zeros((4, 4, 4)))
    with pytest.raises(FileNotFoundError, match="gt"):
        evaluate_folder(str(tmp_path / "pred"), str(tmp_path / "gt"), str(tmp_path / "out"))
    with pytest.raises(FileNotFoundError, match="nowhere"):
        evaluate_folder(str(tmp_path / "pred"), str(tmp_path / "nowhere"), str(tmp_path / "out"))
    save(tmp_path / "gt" / "c.nii.gz", np.zeros((4, 4, 4)))
    with pytest.raises(FileNotFoundError, match="nopred"):
        evaluate_folder(str(tmp_path / "nopred"), str(tmp_path / "gt"), str(tmp_path / "out"))
