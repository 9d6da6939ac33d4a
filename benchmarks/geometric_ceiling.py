"""Geometric ceiling of the cascade: push the ground truth itself through each stage's crop/resize and back.

A perfect network can at best return its training target on the stage's fixed grid; resizing that back to the
original grid loses what the grid cannot hold. This script measures that loss per organ and path on one generated
clinical-size case:

- preprocessing as the bundles do it: the label map is written as NIfTI, loaded with ``LoadImage`` and reoriented
  to RAS with ``Orientation``; every path's result is mapped back with ``Orientation.inverse`` and compared with
  the generated label map in its stored (e.g. LPS) orientation;
- ``coarse``: the whole volume to 128^3 with ``ResizeToGridd(mode="nearest")`` and back with its inverse (the
  coarse bundle's training target and ``Invertd(nearest_interp=True)``);
- ``group``: ``CropFromMask`` of each group's organs + 15 mm at 160^3, nearest, inverted by the transform;
- ``locator``: the abdomen ROI (all foreground + 10 mm) at 128^3, scored on the small organs;
- ``refiner``: a box around each small organ + 10 mm, grown to the organ's minimum size, at 64^3;
- ``+lin``: the fine paths again, but the crop's label map (the nearest-resized training target) is turned into
  one-hot probabilities and resized back *linearly* inside the box, then argmax -- how the cascade fuses;
- ``+soft``: the bundles' training target (``CropFromMask`` mode ``"soft"``: one-hot resized linearly) resized
  back linearly and argmax -- the ceiling of the stages as they are trained and fused.

DSC is plain 2|A∩B|/(|A|+|B|) on the whole volume (no FLARE slab cut, so the tube ends count too).

    python benchmarks/geometric_ceiling.py [--shape 512,512,120] [--spacing 0.8,0.8,2.5] [--seed 0]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import LoadImage, Orientation

from flare_c2f_extensions import labels as L
from flare_c2f_extensions.synthetic import phantom
from flare_c2f_extensions.transforms.boxes import box_size
from flare_c2f_extensions.transforms.crop import CropFromMask, ResizeToGridd
from flare_c2f_extensions.transforms.postprocessing import remap_labels
from flare_c2f_extensions.transforms.resizing import paste_into, resize_spatial

COARSE_SIZE, GROUP_SIZE, LOCATOR_SIZE, REFINER_SIZE = 128, 160, 128, 64  # the bundles' grids
GROUP_MARGIN_MM = 15.0  # margin_mm of bundles/flare22_fine_*/configs
LOCATOR_MARGIN_MM = 10.0  # margin_mm of bundles/flare22_small_locator/configs
REFINER_MARGIN_MM = 10.0  # margin_mm of bundles/flare22_small_refiner/configs, then grown to the minimum size
_DEFAULT_MIN_SIZE_MM = {7: 48.0, 8: 48.0, 9: 64.0, 10: 64.0}
VARIANTS = ("nearest", "lin", "soft")
GROUP_NAMES = ("solid", "digestive", "vessels")


def refiner_min_size_mm() -> dict[int, object]:
    """Minimum refiner box per small organ (mm): ``labels.REFINER_MIN_SIZE_MM`` when the package has it."""
    table = getattr(L, "REFINER_MIN_SIZE_MM", None) or _DEFAULT_MIN_SIZE_MM
    return {L.organ_id(k): v for k, v in table.items()}


def load_ras(case: phantom.Case, folder: Path):
    """The case's label map as the bundles see it: NIfTI -> ``LoadImage`` -> ``Orientation("RAS")``."""
    path = folder / "label.nii"
    nib.save(nib.Nifti1Image(np.asarray(case.label, dtype=np.uint8), case.affine), str(path))
    orient = Orientation(axcodes="RAS", labels=None)
    return orient, orient(LoadImage(image_only=True, ensure_channel_first=True)(str(path)))


def dice_table(gt: np.ndarray, pred: np.ndarray) -> dict[int, float]:
    """Plain DSC of every organ id from one 14 x 14 confusion count."""
    n = L.NUM_CLASSES
    pair = torch.from_numpy(np.ascontiguousarray(gt, dtype=np.uint8)).flatten() * n
    pair += torch.from_numpy(np.ascontiguousarray(pred, dtype=np.uint8)).flatten()
    conf = torch.bincount(pair, minlength=n * n).reshape(n, n).double()
    both = conf.sum(0) + conf.sum(1)
    return {k: float(2 * conf[k, k] / both[k]) if both[k] else 1.0 for k in L.ORGANS}


def _one_hot(local: torch.Tensor, k: int) -> torch.Tensor:
    return torch.stack([local == c for c in range(k + 1)]).float()


def crop_path(gt_ras: MetaTensor, box_labels, stage, size, margin_mm, min_size_mm=None, variant="nearest"):
    """One fine stage's geometry on the RAS grid: the box of ``box_labels`` (+margin, min size) at ``size``^3,
    the stage's organs only (``stage``, as local ids like in training), back on the RAS grid in FLARE ids.

    ``variant``: ``"nearest"``: crop with nearest (the training target) and back through the transform's own
    inverse (what ``Invertd(nearest_interp=True)`` does); ``"lin"``: the same target as one-hot probabilities,
    resized back linearly inside the box, argmax (the cascade's fusion); ``"soft"``: one-hot resized linearly both
    ways (a stage that predicts partial-volume probabilities).
    """
    cropper = CropFromMask(box_labels, size, margin_mm, min_size_mm, mode="nearest")
    box = cropper.compute_box(gt_ras, gt_ras)
    k = len(stage)
    if variant == "nearest":
        back = cropper.inverse(remap_labels(cropper.crop(gt_ras, box), stage))
        if not np.allclose(back.affine, gt_ras.affine) or back.shape != gt_ras.shape:
            raise AssertionError("crop inverse did not restore the RAS grid")
        return remap_labels(back.as_tensor()[0], stage, to_local=False), box
    if variant == "lin":
        probs = _one_hot(remap_labels(cropper.crop(gt_ras, box).as_tensor()[0], stage), k)
    elif variant == "soft":  # the bundles' training target (CropFromMask mode "soft"), fused back linearly
        probs = CropFromMask(stage, size, margin_mm, min_size_mm, mode="soft").crop(gt_ras, box).as_tensor()
    else:
        raise ValueError(f"unknown variant {variant!r}")
    lab = resize_spatial(probs, box_size(box), "trilinear").argmax(0).to(torch.uint8)
    return paste_into(gt_ras.shape[1:], box, remap_labels(lab, stage, to_local=False)), box


def coarse_path(gt_ras: MetaTensor) -> torch.Tensor:
    resize = ResizeToGridd("label", COARSE_SIZE, mode="nearest")  # as the coarse bundle trains and inverts
    return resize.inverse(resize({"label": gt_ras}))["label"].as_tensor()[0]


def measure(seed=0, shape=(512, 512, 120), spacing=(0.8, 0.8, 2.5), orientation="LPS", variants=VARIANTS):
    """DSC per path and organ, seconds per path, and the boxes, for one generated case.

    Returns ``{"dsc": {path: {organ id: DSC}}, "seconds": {path: s}, "boxes": {name: box size}, "case": Case}``;
    paths are ``coarse`` and ``group``/``locator``/``refiner`` with a ``+lin``/``+soft`` suffix for those variants.
    """
    case = phantom.make_case(seed, shape=shape, spacing=spacing, orientation=orientation)
    gt = np.ascontiguousarray(case.label)
    dsc, seconds, boxes = {}, {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        orient, gt_ras = load_ras(case, Path(tmp))
        seconds["load+RAS"] = time.perf_counter() - t0

    def score(path, ras_label, organs):
        """Back to the stored orientation through the recorded ``Orientation``, then DSC of ``organs``."""
        back = orient.inverse(MetaTensor(ras_label[None]).copy_meta_from(gt_ras))
        if not np.allclose(back.affine, case.affine) or tuple(back.shape[1:]) != gt.shape:
            raise AssertionError(f"{path}: not back on the original grid")
        table = dice_table(gt, back.as_tensor()[0].to(torch.uint8).numpy())
        dsc.setdefault(path, {}).update({k: table[k] for k in organs})

    # stage -> crops: (box name, box labels, stage labels, grid size, margin mm, min size mm)
    small, min_size = L.GROUPS["small"], refiner_min_size_mm()
    stages = {
        "group": [(g, L.GROUPS[g], L.GROUPS[g], GROUP_SIZE, GROUP_MARGIN_MM, None) for g in GROUP_NAMES],
        "locator": [("locator", None, small, LOCATOR_SIZE, LOCATOR_MARGIN_MM, None)],
        "refiner": [(L.ORGANS[k], (k,), (k,), REFINER_SIZE, REFINER_MARGIN_MM, min_size[k]) for k in small],
    }
    t = time.perf_counter()
    score("coarse", coarse_path(gt_ras), tuple(L.ORGANS))
    seconds["coarse"] = time.perf_counter() - t
    for variant in variants:
        for stage, crops in stages.items():
            path = stage + ("" if variant == "nearest" else "+" + variant)
            t = time.perf_counter()
            for name, box_labels, organs, size, margin_mm, min_mm in crops:
                lab, boxes[name] = crop_path(gt_ras, box_labels, organs, size, margin_mm, min_mm, variant)
                score(path, lab, organs)
            seconds[path] = time.perf_counter() - t
    order = ["coarse"] + [s + ("" if v == "nearest" else "+" + v) for s in stages for v in variants]
    return {"dsc": {p: dsc[p] for p in order}, "seconds": seconds,
            "boxes": {k: box_size(b) for k, b in boxes.items()}, "case": case}


def format_table(result) -> str:
    dsc, seconds = result["dsc"], result["seconds"]
    paths = list(dsc)
    width = max(9, max(len(p) for p in paths) + 1)
    lines = ["organ".ljust(22) + "".join(p.rjust(width) for p in paths)]
    for k, name in L.ORGANS.items():
        cells = [f"{dsc[p][k]:.4f}" if k in dsc[p] else "-" for p in paths]
        lines.append(f"{k:>2} {name}".ljust(22) + "".join(c.rjust(width) for c in cells))
    lines.append("min DSC".ljust(22) + "".join(f"{min(dsc[p].values()):.4f}".rjust(width) for p in paths))
    lines.append("seconds".ljust(22) + "".join(f"{seconds[p]:.1f}".rjust(width) for p in paths))
    return "\n".join(lines)


def _triple(text, cast):
    return tuple(cast(v) for v in text.split(","))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", default="512,512,120", help="stored array shape (axis 2: slices)")
    parser.add_argument("--spacing", default="0.8,0.8,2.5", help="voxel size in mm")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--orientation", default="LPS", help="stored axis codes of the generated case")
    parser.add_argument("--nearest-only", action="store_true", help="skip the one-hot linear variants")
    args = parser.parse_args(argv)
    torch.set_num_threads(min(2, torch.get_num_threads()))
    t = time.perf_counter()
    result = measure(args.seed, _triple(args.shape, int), _triple(args.spacing, float), args.orientation,
                     ("nearest",) if args.nearest_only else VARIANTS)
    case = result["case"]
    print(f"case seed {args.seed}: shape {case.info['shape']}, spacing {case.info['spacing']} mm, "
          f"{case.info['orientation']}; compared in the stored orientation after Orientation.inverse")
    print(f"grids: coarse {COARSE_SIZE}^3, group {GROUP_SIZE}^3, locator {LOCATOR_SIZE}^3, refiner {REFINER_SIZE}^3; "
          "+lin: one-hot back linearly, +soft: one-hot linearly both ways")
    print("boxes (RAS voxels): " + ", ".join(f"{k} {'x'.join(map(str, v))}" for k, v in result["boxes"].items()))
    print(format_table(result))
    print(f"seconds: crop, back to the original grid, DSC; load + RAS {result['seconds']['load+RAS']:.1f} s; "
          f"total {time.perf_counter() - t:.1f} s (with generating the case)")


if __name__ == "__main__":
    main()
