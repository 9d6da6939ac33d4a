"""FLARE22 evaluation: Dice similarity coefficient (DSC) and normalised surface Dice (NSD).

The rules, per case and organ (FLARE id ``label``), with the spacing of the ground truth:

1. Both masks empty -> DSC 1, NSD 1. Exactly one empty -> DSC 0, NSD 0. These checks look at the *full*
   masks, before any cut, as the official FLARE22 evaluation does.
2. Aorta, inferior vena cava and esophagus (``labels.SLAB_ORGANS``): both masks are cut to the ground
   truth's slice range on array axis 2, ``[zmin:zmax]`` with zmin/zmax the lowest and highest slice that
   holds the organ in the ground truth. The top labelled slice ``zmax`` is left out, as in the official code.
3. DSC = 2|A∩B| / (|A| + |B|) on the (cut) masks.
4. DSC < 0.2 -> NSD 0. Otherwise NSD is the surface Dice at ``labels.NSD_TOLERANCE_MM[label]``: surfels of
   the 2x2x2 neighbourhood codes with their areas, distances from each surface to the other in mm, and
   (area of both surfaces within tolerance) / (area of both surfaces) -- DeepMind's ``surface-distance``
   definition, computed by MONAI's ``compute_surface_dice(..., use_subvoxels=True)``.
5. Each value is rounded to 4 decimals.

Guard after the cut (our choice; the official code has no answer): when the ground truth holds a slab organ
on one slice only, ``[zmin:zmax]`` is empty, so both cut masks are empty and the official formula divides 0
by 0 (NaN, which would poison every mean). We score that organ like two empty masks: DSC 1, NSD 1, because
nothing is left to compare. A cut that empties only the prediction needs no guard: DSC 0, NSD 0.

For speed every organ is scored inside the bounding box of ``pred == label | gt == label`` (found for all
labels in one pass by ``transforms.boxes.label_boxes``), padded with empty voxels. DSC only counts voxels
inside that box, and the surface Dice is translation invariant and sees nothing but the two surfaces, so the
crop changes neither as long as the padding is empty (the tests check this against the full volume).
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from flare_c2f_extensions.errors import InputError
from flare_c2f_extensions.io.discovery import case_name, is_nifti
from flare_c2f_extensions.io.files import prepare_output_dir, write_text_atomic
from flare_c2f_extensions.labels import NSD_TOLERANCE_MM, ORGANS, SLAB_ORGANS
from flare_c2f_extensions.transforms.boxes import label_boxes

logger = logging.getLogger(__name__)

__all__ = [
    "NSD_MIN_DSC",
    "DECIMALS",
    "surface_dice",
    "organ_scores",
    "load_label_map",
    "evaluate_case",
    "evaluate_folder",
    "format_summary",
    "unknown_labels",
    "MissingFolderError",
]


NSD_MIN_DSC = 0.2  # below this DSC, NSD is 0 (FLARE22)
DECIMALS = 4  # every DSC and NSD value is rounded to this many decimals (FLARE22)
_PAD = 2  # empty voxels around each organ's box


def surface_dice(mask_a: np.ndarray, mask_b: np.ndarray, spacing: Sequence[float], tolerance_mm: float) -> float:
    """Surface Dice of two boolean 3D masks at ``tolerance_mm`` (DeepMind's surfel-area definition).

    Symmetric in its two masks. Both masks empty: NaN; exactly one empty: 0. No rounding, no DSC rule:
    those belong to :func:`organ_scores`. The masks are cropped to the bounding box of their union and
    padded with empty voxels before MONAI sees them.
    """
    import torch
    from monai.metrics import compute_surface_dice

    a = np.asarray(mask_a, dtype=bool)
    b = np.asarray(mask_b, dtype=bool)
    if a.shape != b.shape or a.ndim != 3:
        raise ValueError(f"surface_dice needs two 3D masks of one shape, got {a.shape} and {b.shape}")
    box = _bbox(a | b)
    if box is None:
        return float("nan")
    a = np.pad(a[box], _PAD)
    b = np.pad(b[box], _PAD)
    spacing = [float(s) for s in spacing]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # MONAI warns about an empty mask; 0 is the right answer there
        nsd = compute_surface_dice(
            torch.from_numpy(a)[None, None],
            torch.from_numpy(b)[None, None],
            class_thresholds=[float(tolerance_mm)],
            include_background=True,
            spacing=spacing,
            use_subvoxels=True,
        )
    return float(nsd[0, 0])


def organ_scores(
    pred: np.ndarray,
    gt: np.ndarray,
    spacing: Sequence[float],
    labels: Iterable[int] | None = None,
) -> dict[int, tuple[float, float]]:
    """FLARE22 (DSC, NSD) per organ of one case, rounded to 4 decimals (rules in the module docstring).

    ``pred`` and ``gt`` are integer label maps of one 3D shape in FLARE ids (other values are background),
    ``spacing`` the ground truth's voxel size in mm along the three array axes, ``labels`` the FLARE ids to
    score (default: all 13).
    """
    pred = _as_label_map(pred)
    gt = _as_label_map(gt)
    if pred.shape != gt.shape or gt.ndim != 3:
        raise ValueError(f"pred and gt must be 3D label maps of one shape, got {pred.shape} and {gt.shape}")
    spacing = tuple(float(s) for s in spacing)
    if len(spacing) != 3 or not all(np.isfinite(s) and s > 0 for s in spacing):
        raise ValueError(f"spacing must be 3 positive numbers (mm), got {spacing}")
    labels = tuple(ORGANS) if labels is None else tuple(int(label) for label in labels)
    unknown = [label for label in labels if label not in ORGANS]
    if unknown:
        raise KeyError(f"not FLARE22 organ ids (1..{len(ORGANS)}): {unknown}")

    max_label = max(labels, default=0)
    boxes_pred = label_boxes(pred, max_label) if max_label else []
    boxes_gt = label_boxes(gt, max_label) if max_label else []

    scores = {}
    for label in labels:
        box_p, box_g = boxes_pred[label - 1], boxes_gt[label - 1]
        if box_p is None and box_g is None:
            scores[label] = (1.0, 1.0)
            continue
        if box_p is None or box_g is None:
            scores[label] = (0.0, 0.0)
            continue
        box = [slice(min(p.start, g.start), max(p.stop, g.stop)) for p, g in zip(box_p, box_g)]
        if label in SLAB_ORGANS:
            zmin, zmax = box_g[2].start, box_g[2].stop - 1  # gt's lowest and highest labelled slice
            box[2] = slice(max(box[2].start, zmin), min(box[2].stop, zmax))  # [zmin:zmax], zmax left out
            if box[2].stop <= box[2].start:  # gt on one slice: both cut masks empty (see module docstring)
                scores[label] = (1.0, 1.0)
                continue
        box = tuple(box)
        mask_p = pred[box] == label
        mask_g = gt[box] == label
        size_p, size_g = int(mask_p.sum()), int(mask_g.sum())
        dsc = 2.0 * int(np.logical_and(mask_p, mask_g).sum()) / (size_p + size_g)
        if dsc < NSD_MIN_DSC:
            nsd = 0.0
        else:
            nsd = surface_dice(mask_p, mask_g, spacing, NSD_TOLERANCE_MM[label])
        scores[label] = (round(dsc, DECIMALS), round(nsd, DECIMALS))
    return scores


class MissingFolderError(InputError, FileNotFoundError):
    """A prediction or ground-truth folder that does not exist or holds no label map (one line, as every
    :class:`~flare_c2f_extensions.errors.InputError`)."""


GRID_TOLERANCE_MM = 0.01  # two affines closer than this everywhere are the same grid (float32 headers differ a bit)
# the cascade's default max_voxels (1024x1024x512): no prediction of ours is larger, and a header claiming more is
# refused before its voxels are read (a small gzipped file can claim gigabytes)
MAX_LABEL_MAP_VOXELS = 1024 * 1024 * 512


def _label_map_header(path: str | os.PathLike):
    """``(image, 3D shape)`` of a NIfTI label map from its header alone; :class:`InputError` naming the file when
    the header is unreadable, not 3D (a 4D file with one volume counts as 3D) or claims too many voxels."""
    import nibabel as nib

    try:
        image = nib.load(str(path))
        shape = tuple(int(n) for n in image.shape)
    except Exception as error:  # nibabel raises several types for broken files
        raise InputError(f"{path}: not a readable NIfTI label map ({type(error).__name__}: {error})") from None
    if len(shape) == 4 and shape[3] == 1:
        shape = shape[:3]
    if len(shape) != 3:
        raise InputError(f"{path}: a label map must be 3D, this one has shape {shape}")
    voxels = int(np.prod(shape, dtype=np.int64))
    if voxels > MAX_LABEL_MAP_VOXELS:
        raise InputError(
            f"{path}: its header claims shape {shape}, {voxels} voxels, more than the limit of "
            f"{MAX_LABEL_MAP_VOXELS} (1024x1024x512) for a label map: refused before reading it"
        )
    return image, shape


def _label_map_voxels(path, image, shape: tuple[int, int, int]) -> np.ndarray:
    try:
        data = np.asanyarray(image.dataobj)
    except Exception as error:  # nibabel and zlib raise several types for broken files
        raise InputError(f"{path}: not a readable NIfTI label map ({type(error).__name__}: {error})") from None
    data = data.reshape(shape)
    if not np.issubdtype(data.dtype, np.integer):
        data = np.rint(data)
        data[~((data >= 0) & (data <= 255))] = 0  # also NaN
        data = data.astype(np.uint8)
    return data


def load_label_map(path: str | os.PathLike) -> tuple[np.ndarray, tuple[float, float, float], np.ndarray]:
    """Read a NIfTI label map: (integer array, voxel spacing in mm of the first 3 axes, affine).

    Float data are rounded to the nearest integer; values outside 0..255 become background (0). A file that cannot
    be read whole, that is not 3D (a 4D file with one volume counts as 3D) or whose header claims more than
    :data:`MAX_LABEL_MAP_VOXELS` voxels is an :class:`~flare_c2f_extensions.errors.InputError` naming it.
    """
    image, shape = _label_map_header(path)
    spacing = tuple(float(s) for s in image.header.get_zooms()[:3])
    return _label_map_voxels(path, image, shape), spacing, image.affine


def unknown_labels(labels: np.ndarray) -> list[int]:
    """The values of a label map that are neither background nor a FLARE22 organ id (scored as background)."""
    odd = labels[(labels < 0) | (labels > max(ORGANS))]
    return sorted(int(v) for v in np.unique(odd))


def _grid_transform(pred_shape, pred_affine, gt_shape, gt_affine, pred_path, gt_path) -> np.ndarray | None:
    """From the two headers: ``None`` when the prediction is stored on the ground truth's grid (or the same layout
    and shape with another affine, which warns), the orientation transform that puts it there when it is the same
    physical grid stored another way; :class:`InputError` when it is another grid (resampling, not scoring)."""
    import nibabel as nib

    pred_shape, gt_shape = tuple(pred_shape), tuple(gt_shape)
    if pred_shape == gt_shape and np.allclose(pred_affine, gt_affine, atol=GRID_TOLERANCE_MM, rtol=0):
        return None
    transform = nib.orientations.ornt_transform(
        nib.orientations.io_orientation(pred_affine), nib.orientations.io_orientation(gt_affine)
    )
    moved_affine = pred_affine @ nib.orientations.inv_ornt_aff(transform, pred_shape)
    moved_shape = tuple(pred_shape[int(axis)] for axis in np.argsort(transform[:, 0]))
    identity = np.array_equal(transform, [[0, 1], [1, 1], [2, 1]])
    if not identity and moved_shape == gt_shape:
        if np.allclose(moved_affine, gt_affine, atol=GRID_TOLERANCE_MM, rtol=0):
            logger.info("%s: reoriented (axis flips/permutations) to the ground truth's layout %s", pred_path, gt_path)
            return transform
    if identity and pred_shape == gt_shape:
        # the same layout and shape, other spacing or origin: scored voxel by voxel, as FLARE22's evaluation does
        warnings.warn(f"prediction {pred_path} and ground truth {gt_path} have different affines", stacklevel=4)
        return None
    raise InputError(
        f"prediction {pred_path} has shape {pred_shape} but ground truth {gt_path} has shape {gt_shape}, and "
        "no flip or permutation of its axes puts it on the ground truth's grid: resample it onto that grid first"
    )


def _score_case(pred_path, gt_path, labels) -> tuple[dict[int, tuple[float, float]], dict]:
    # both headers are checked against each other before any voxel is read
    gt_image, gt_shape = _label_map_header(gt_path)
    pred_image, pred_shape = _label_map_header(pred_path)
    transform = _grid_transform(pred_shape, pred_image.affine, gt_shape, gt_image.affine, pred_path, gt_path)
    gt = _label_map_voxels(gt_path, gt_image, gt_shape)
    spacing = tuple(float(s) for s in gt_image.header.get_zooms()[:3])
    pred = _label_map_voxels(pred_path, pred_image, pred_shape)
    if transform is not None:
        import nibabel as nib

        pred = np.ascontiguousarray(nib.orientations.apply_orientation(pred, transform))
    notes = {}
    for role, array, path in (("pred", pred, pred_path), ("gt", gt, gt_path)):
        unknown = unknown_labels(array)
        if unknown:
            notes[f"unknown_{role}_labels"] = unknown
            logger.warning("%s: label values %s are not FLARE22 organ ids: scored as background", path, unknown)
    return organ_scores(pred, gt, spacing, labels), notes


def evaluate_case(
    pred_path: str | os.PathLike, gt_path: str | os.PathLike, labels: Iterable[int] | None = None
) -> dict[int, tuple[float, float]]:
    """FLARE22 (DSC, NSD) per organ for one prediction/ground-truth pair of NIfTI files.

    Spacing comes from the ground truth header. A prediction on the ground truth's grid stored in another array
    layout (axes flipped or permuted, affine adjusted) is reoriented to it; one of the same layout and shape whose
    affine differs only warns (the official evaluation ignores the affine); any other mismatch is an
    :class:`~flare_c2f_extensions.errors.InputError` (a ``ValueError``) naming both files. Label values that are not
    organ ids are logged and scored as background.
    """
    return _score_case(pred_path, gt_path, labels)[0]


def _nifti_cases(folder: str | os.PathLike, role: str) -> dict[str, Path]:
    folder = Path(folder)
    if not folder.is_dir():
        raise MissingFolderError(f"{folder}: {role} folder does not exist")
    cases: dict[str, Path] = {}
    # .nii.gz first, so that it wins over a .nii of the same case
    for path in sorted(folder.iterdir(), key=lambda p: (not p.name.lower().endswith(".nii.gz"), p.name)):
        if path.is_file() and is_nifti(path) and not path.name.startswith("."):
            cases.setdefault(case_name(path), path)
    if not cases:
        raise MissingFolderError(f"{folder}: {role} folder holds no .nii.gz / .nii files")
    return dict(sorted(cases.items()))


def _few(names: Iterable[str], shown: int = 3) -> str:
    names = list(names)
    more = f", ... ({len(names)} in all)" if len(names) > shown else ""
    return ", ".join(names[:shown]) + more


def _check_some_prediction_matches(pred, gt, pred_cases: dict, gt_cases: dict) -> None:
    """:class:`InputError` when no prediction is named like a ground-truth case: every case would score as an empty
    prediction (mean DSC 0), which is a naming mistake, not a result."""
    if set(pred_cases) & set(gt_cases):
        return
    gt_where = gt if isinstance(gt, (str, os.PathLike)) else "the ground-truth list"
    raise InputError(
        f"no prediction in {pred} is named like a ground-truth case of {gt_where}: predictions {_few(pred_cases)}; "
        f"ground truth {_few(gt_cases)} (a prediction <case>.nii.gz pairs with the ground truth <case>.nii.gz)"
    )


def evaluate_folder(pred: str, gt: str | Sequence[str], out: str, labels: Iterable[int] | None = None) -> dict:
    """Score every ``gt/<case>.nii.gz`` against ``pred/<case>.nii.gz``; write metrics.csv and summary.json.

    ``gt`` is a folder of ground-truth label maps or a list of their paths (e.g. a bundle's validation cases);
    ``labels`` limits the scoring to some organs (e.g. a stage's group; default all 13). The folders (``out``:
    created and writable) are checked before any case is scored; when no prediction is named like a ground-truth
    case nothing is scored (:class:`~flare_c2f_extensions.errors.InputError` naming both folders and some names).

    A case without a prediction is scored as an empty prediction and listed under ``missing_predictions``. A case
    that cannot be scored (unreadable file, another grid) fails alone: its row in metrics.csv is empty with the
    reason in an ``error`` column, it is listed under ``failed_cases`` and left out of the means.
    ``out/metrics.csv`` has one row per case (``case``, then ``<organ>_DSC``, ``<organ>_NSD`` for the 13
    organs); ``out/summary.json`` the per-organ means over the scored cases, the 13-organ means, the number of
    scored cases, the missing, failed and unknown-label cases. Both files are written atomically. Returns the summary.
    """
    scored = tuple(ORGANS) if labels is None else tuple(int(label) for label in labels)
    if isinstance(gt, (str, os.PathLike)):
        gt_cases = _nifti_cases(gt, "ground truth")
    else:
        gt_cases = {case_name(path): Path(path) for path in gt}
        if not gt_cases:
            raise MissingFolderError("no ground-truth label maps given")
    pred_cases = _nifti_cases(pred, "prediction")
    _check_some_prediction_matches(pred, gt, pred_cases, gt_cases)
    prepare_output_dir(out, "evaluation output")
    missing = [case for case in gt_cases if case not in pred_cases]
    extra = [case for case in pred_cases if case not in gt_cases]

    rows: dict[str, dict[int, tuple[float, float]]] = {}
    failed: dict[str, str] = {}
    unknown: dict[str, dict] = {}
    for case in _progress(gt_cases, desc="evaluate"):
        try:
            if case in pred_cases:
                rows[case], notes = _score_case(pred_cases[case], gt_cases[case], scored)
                if notes:
                    unknown[case] = notes
            else:
                gt_map, spacing, _ = load_label_map(gt_cases[case])
                rows[case] = organ_scores(np.zeros_like(gt_map), gt_map, spacing, scored)
        except (InputError, ValueError, TypeError, OSError) as error:
            failed[case] = str(error)
            logger.error("failed: %s: %s", case, error)

    header = ["case"] + [f"{ORGANS[label]}_{kind}" for label in scored for kind in ("DSC", "NSD")]
    table = io.StringIO()
    writer = csv.writer(table, lineterminator="\n")
    writer.writerow(header + (["error"] if failed else []))
    for case in gt_cases:
        if case in failed:
            writer.writerow([case] + [""] * (len(header) - 1) + [failed[case]])
        else:
            scores = rows[case]
            writer.writerow([case] + [f"{value:.{DECIMALS}f}" for label in scored for value in scores[label]])

    organs = {}
    for label in scored:
        name = ORGANS[label]
        organs[name] = {
            "DSC": float(np.mean([scores[label][0] for scores in rows.values()])) if rows else float("nan"),
            "NSD": float(np.mean([scores[label][1] for scores in rows.values()])) if rows else float("nan"),
        }
    summary = {
        "num_cases": len(rows),
        "mean_DSC": float(np.mean([organ["DSC"] for organ in organs.values()])),
        "mean_NSD": float(np.mean([organ["NSD"] for organ in organs.values()])),
        "organs": organs,
        "missing_predictions": missing,
        "unmatched_predictions": extra,
        "failed_cases": failed,
        "unknown_labels": unknown,
        "pred_dir": str(pred),
        "gt": str(gt) if isinstance(gt, (str, os.PathLike)) else sorted(str(p) for p in gt_cases.values()),
    }

    write_text_atomic(table.getvalue(), Path(out) / "metrics.csv")
    write_text_atomic(json.dumps(summary, indent=4) + "\n", Path(out) / "summary.json")
    return summary


def _as_label_map(array: np.ndarray) -> np.ndarray:
    array = np.asarray(array)
    if array.dtype == bool:
        return array.astype(np.uint8)
    if not np.issubdtype(array.dtype, np.integer):
        raise TypeError(f"label maps must hold integers, got {array.dtype} (round them first)")
    return array


def _bbox(mask: np.ndarray) -> tuple[slice, ...] | None:
    boxes = label_boxes(mask.astype(np.uint8))
    return boxes[0] if boxes else None


def _progress(items, desc: str):
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover - tqdm is a dependency, but the bar is optional
        return items
    return tqdm(items, desc=desc, unit="case")


def format_summary(summary: dict) -> str:
    """A small table of per-organ mean DSC and NSD and the 13-organ means, for the terminal."""
    lines = [f"{'organ':<22}{'DSC':>8}{'NSD':>8}"]
    for name, organ in summary["organs"].items():
        lines.append(f"{name:<22}{organ['DSC']:>8.4f}{organ['NSD']:>8.4f}")
    mean = f"mean ({len(summary['organs'])} organs)"
    lines.append(f"{mean:<22}{summary['mean_DSC']:>8.4f}{summary['mean_NSD']:>8.4f}")
    missing = summary["missing_predictions"]
    names = f" ({_few(missing, 10)}, scored as empty)" if missing else ""
    lines.append(f"{summary['num_cases']} case(s); missing predictions: {len(missing)}{names}")
    for case, error in summary.get("failed_cases", {}).items():
        lines.append(f"failed: {case}: {error}")
    for case, notes in summary.get("unknown_labels", {}).items():
        lines.append(f"unknown label values in {case}: {notes}")
    return "\n".join(lines)
