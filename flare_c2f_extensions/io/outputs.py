"""What ``flare-c2f segment`` writes for one case, all or nothing.

Beside the label map ``<name>.nii.gz`` (uint8 FLARE ids, exactly the input's shape and affine; its header's
``descrip`` says where the names are and a NIfTI comment extension (code 6) holds them as JSON):

- ``<name>.json``: the label names in MONAI's ``channel_def`` form, ``{"0": "background", "1": "liver", ...}``;
- ``<name>.itksnap.txt``: an ITK-SNAP label description file (Segmentation > Import Label Descriptions);
- ``<name>.ctbl``: a 3D Slicer colour table (load it, then choose it as the label map's colour table);
- ``<name>_organs/<organ>.nii.gz`` (``per_organ``): one binary mask per organ;
- ``<name>_seg.dcm`` (``dicom_seg``, DICOM input only): a DICOM Segmentation referencing the series;
- ``<name>_statistics.json`` / ``.csv`` (``statistics``): per organ voxel count, volume in ml, mean and median HU
  (of the input's voxels), whether it touches the image border;
- ``<name>_preview.png`` (``preview``): axial, coronal and sagittal slices with the organs drawn over the CT.

Everything is written into a hidden staging folder beside the outputs and moved into place only when all of it is
written, the label map last: a failure leaves the previous files (or none) and no partial ones.
"""

from __future__ import annotations

import csv
import glob
import io
import json
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path

import nibabel as nib
import numpy as np

from flare_c2f_extensions.io.discovery import NIFTI_SUFFIXES
from flare_c2f_extensions.io.files import add_provenance, write_nifti_atomic, write_text_atomic
from flare_c2f_extensions.io.images import CT
from flare_c2f_extensions.io.label_maps import label_map_image
from flare_c2f_extensions.labels import ORGANS, label_names

__all__ = [
    "case_outputs", "itksnap_labels", "named_label_image", "organ_statistics", "preview_rgb",
    "slicer_color_table",
    "statistics_csv", "stem_of", "write_case",
]

# what the statistics say of each organ's quality (pseudo_label.organ_quality): the cascade's own confidence, the
# share of voxels the largest-component step removed, and the checks it failed (empty: none)
QUALITY_COLUMNS = ("mean_confidence", "confidence_p10", "dropped_fraction", "flags")
STATISTICS_COLUMNS = ("organ", "id", "voxel_count", "volume_ml", "mean_hu", "median_hu", "touches_border")


def stem_of(target: str | os.PathLike) -> str:
    """``seg`` for ``.../seg.nii.gz``: the name every output of the case starts with."""
    name = Path(target).name
    for suffix in NIFTI_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


# -- label names --------------------------------------------------------------------------------------------------


def named_label_image(
    labels: np.ndarray, reference, organs: Sequence[int], stem: str, provenance: dict | None = None
) -> nib.Nifti1Image:
    """The label map as NIfTI (input geometry) with its names in the header: ``descrip`` (80 bytes) points at the
    sidecar, a comment extension (code 6) holds the ``channel_def`` JSON. ``provenance`` (input hash and options,
    :func:`files.output_provenance`) goes into a second comment extension, with the hash of the labels written."""
    image = label_map_image(labels, reference)
    image.header["descrip"] = f"flare-c2f FLARE22 organ ids; names: {stem}.json"[:79].encode()
    names = json.dumps(label_names(tuple(organs))).encode()
    image.header.extensions.append(nib.nifti1.Nifti1Extension("comment", names))
    return image if provenance is None else add_provenance(image, provenance)


def case_outputs(target: str | os.PathLike, per_organ=False, dicom_seg=False, statistics=False, preview=False):
    """The paths :func:`write_case` writes for these options, the label map last."""
    target = Path(target)
    stem, folder = stem_of(target), target.parent
    names = [f"{stem}.json", f"{stem}.itksnap.txt", f"{stem}.ctbl"]
    names += [f"{stem}_organs"] * bool(per_organ) + [f"{stem}_seg.dcm"] * bool(dicom_seg)
    names += [f"{stem}_statistics.json", f"{stem}_statistics.csv"] * bool(statistics)
    names += [f"{stem}_preview.png"] * bool(preview)
    return [folder / name for name in names] + [target]


def _colours(organs: Sequence[int]) -> dict[int, tuple[int, int, int]]:
    from flare_c2f_extensions.io.overlay import PALETTE

    return {organ: tuple(int(c) for c in PALETTE[organ]) for organ in organs}


def itksnap_labels(organs: Sequence[int]) -> str:
    """ITK-SNAP label description file: index, R G B, opacity, visibility, mesh visibility, "name"."""
    lines = [
        "# ITK-SNAP label description file written by flare-c2f (FLARE22 organ ids)",
        "# IDX  -R-  -G-  -B-  -A-  VIS  MSH  LABEL",
        '    0    0    0    0    0    0    0  "Clear Label"',
    ]
    for organ, (r, g, b) in _colours(organs).items():
        lines.append(f'{organ:5d} {r:4d} {g:4d} {b:4d}    1    1    1  "{ORGANS[organ]}"')
    return "\n".join(lines) + "\n"


def slicer_color_table(organs: Sequence[int], stem: str) -> str:
    """3D Slicer colour table (``.ctbl``): ``index name R G B A`` per line, background first."""
    lines = [f"# Color table file {stem}.ctbl", f"# {len(organs) + 1} values", "0 background 0 0 0 0"]
    lines += [f"{organ} {ORGANS[organ]} {r} {g} {b} 255" for organ, (r, g, b) in _colours(organs).items()]
    return "\n".join(lines) + "\n"


# -- statistics ---------------------------------------------------------------------------------------------------


def organ_statistics(
    labels: np.ndarray, hu: np.ndarray, affine: np.ndarray, organs: Sequence[int], quality: dict | None = None
) -> dict:
    """Per organ (by name): FLARE id, voxel count, volume in ml (voxel count x voxel volume), mean and median HU of
    the input's voxels inside it (``None`` when empty), whether it touches the image border; with ``quality``
    (:func:`pseudo_label.organ_quality`) also its :data:`QUALITY_COLUMNS`."""
    from flare_c2f_extensions.transforms.boxes import label_boxes

    voxel_ml = abs(float(np.linalg.det(np.asarray(affine, dtype=np.float64)[:3, :3]))) / 1000.0
    boxes = label_boxes(labels, max_label=max(ORGANS))
    result = {}
    for organ in organs:
        box = boxes[organ - 1]
        entry = {"id": organ, "voxel_count": 0, "volume_ml": 0.0, "mean_hu": None, "median_hu": None}
        entry["touches_border"] = False
        if box is not None:
            mask = labels[box] == organ
            values = hu[box][mask].astype(np.float64)
            values = values[np.isfinite(values)]
            count = int(np.count_nonzero(mask))
            entry.update(voxel_count=count, volume_ml=count * voxel_ml)
            if values.size:
                entry.update(mean_hu=float(np.mean(values)), median_hu=float(np.median(values)))
            entry["touches_border"] = any(s.start == 0 or s.stop == n for s, n in zip(box, labels.shape))
        if quality is not None:
            entry.update({key: quality[ORGANS[organ]].get(key) for key in QUALITY_COLUMNS})
        result[ORGANS[organ]] = entry
    return {"voxel_volume_ml": voxel_ml, "organs": result}


def statistics_csv(statistics: dict) -> str:
    table = io.StringIO()
    writer = csv.writer(table, lineterminator="\n")
    quality = [c for c in QUALITY_COLUMNS if any(c in entry for entry in statistics["organs"].values())]
    writer.writerow(STATISTICS_COLUMNS + tuple(quality))
    for name, entry in statistics["organs"].items():
        values = [entry.get(c) for c in STATISTICS_COLUMNS[1:] + tuple(quality)]
        values = ["; ".join(v) if isinstance(v, list) else v for v in values]
        writer.writerow([name] + ["" if v is None else v for v in values])
    return table.getvalue()


# -- preview ------------------------------------------------------------------------------------------------------


def preview_rgb(labels: np.ndarray, hu: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """``overlay.overlay_slices`` of the case, both arrays reoriented to RAS, spacing from the affine."""
    from flare_c2f_extensions.io.overlay import overlay_slices

    ornt = nib.orientations.io_orientation(affine)
    ras_affine = affine @ nib.orientations.inv_ornt_aff(ornt, labels.shape)
    spacing = tuple(float(s) for s in np.sqrt((ras_affine[:3, :3] ** 2).sum(axis=0)))
    ct = nib.orientations.apply_orientation(hu, ornt)
    ras_labels = nib.orientations.apply_orientation(labels, ornt).astype(np.int64)
    return overlay_slices(ct, ras_labels, spacing)


# -- one case, all or nothing -------------------------------------------------------------------------------------


def write_case(
    labels: np.ndarray,
    image: str | os.PathLike | CT,
    target: str | os.PathLike,
    organs: Sequence[int],
    per_organ: bool = False,
    dicom_seg: bool = False,
    statistics: bool = False,
    preview: bool = False,
    provenance: dict | None = None,
    quality: dict | None = None,
) -> list[Path]:
    """Write the outputs of one case (module docstring) beside ``target`` (the label map's path); returns their
    paths, the label map last. Atomic as a whole: staged in a hidden folder, then moved into place.
    ``image``: the CT (its path, or the :class:`~flare_c2f_extensions.io.images.CT` the cascade read: its headers
    and, for statistics and the preview, its kept voxels are used as they are). ``provenance``: what the label map's
    header records of its input and options (:func:`named_label_image`); ``quality``: each organ's quality signals
    and flags, added to its statistics."""
    ct = CT.open(image)
    target = Path(target)
    stem = stem_of(target)
    remove_abandoned_staging(target.parent, stem)
    staging = Path(tempfile.mkdtemp(prefix=f".{stem}.partial-{os.getpid()}-", dir=target.parent))
    try:
        names = _write_staged(labels, ct, staging, target.name, stem, organs, per_organ, dicom_seg,
                              statistics, preview, provenance, quality)
        return _move_into_place(staging, target.parent, names)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def remove_abandoned_staging(folder: Path, stem: str) -> None:
    """Remove the staging folders of ``stem`` that a killed run left (SIGKILL runs no clean-up): those whose process
    (the pid in the name) no longer exists. A live process's folder is left alone."""
    for staging in folder.glob(f".{glob.escape(stem)}.partial-*"):
        pid = staging.name[len(f".{stem}.partial-"):].split("-")[0]
        if staging.is_dir() and pid.isdigit() and not _process_exists(int(pid)):
            shutil.rmtree(staging, ignore_errors=True)


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # it exists, but belongs to someone else
        return True
    return True


def _write_staged(labels, ct: CT, staging: Path, label_name: str, stem: str, organs, per_organ, dicom_seg,
                  statistics, preview, provenance, quality) -> list[str]:
    names = []
    geometry = ct.geometry

    def text(name: str, content: str):
        write_text_atomic(content, staging / name)
        names.append(name)

    text(f"{stem}.json", json.dumps(label_names(tuple(organs)), indent=4) + "\n")
    text(f"{stem}.itksnap.txt", itksnap_labels(organs))
    text(f"{stem}.ctbl", slicer_color_table(organs, stem))
    if per_organ:
        folder = staging / f"{stem}_organs"
        folder.mkdir()
        for organ in organs:
            mask = label_map_image((labels == organ).astype(np.uint8), geometry)
            write_nifti_atomic(mask, folder / f"{ORGANS[organ]}.nii.gz")
        names.append(folder.name)
    if dicom_seg:
        from flare_c2f_extensions.io.dicom_seg import dicom_seg as make_seg

        make_seg(labels, ct.path, organs).save_as(staging / f"{stem}_seg.dcm")
        names.append(f"{stem}_seg.dcm")
    if statistics or preview:
        hu, affine = ct.hu(), ct.affine
        if statistics:
            stats = organ_statistics(labels, hu, affine, organs, quality)
            text(f"{stem}_statistics.json", json.dumps(stats, indent=4) + "\n")
            text(f"{stem}_statistics.csv", statistics_csv(stats))
        if preview:
            from PIL import Image

            Image.fromarray(preview_rgb(labels, hu, affine)).save(staging / f"{stem}_preview.png", format="PNG")
            names.append(f"{stem}_preview.png")
        del hu
    write_nifti_atomic(named_label_image(labels, geometry, organs, stem, provenance), staging / label_name)
    names.append(label_name)
    return names


def _move_into_place(staging: Path, folder: Path, names: Sequence[str]) -> list[Path]:
    """``os.replace`` each staged name into ``folder`` (same file system: each move is atomic); an existing
    folder of the same name (per-organ masks of an earlier run) is moved aside first and removed."""
    moved = []
    for name in names:
        source, destination = staging / name, folder / name
        if source.is_dir() and destination.is_dir():
            os.replace(destination, staging / f".old-{name}")
        os.replace(source, destination)
        moved.append(destination)
    return moved
