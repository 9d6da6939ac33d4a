"""Cases on disk: finding and checking FLARE-layout NIfTI files, and writing label maps safely.

Every problem with an input is raised as :class:`InputError`, whose message starts with the offending
path, before any network runs.
"""

from __future__ import annotations

import os
import sys
import tempfile
from collections.abc import Sequence
from contextlib import contextmanager
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from monai.data import MetaTensor

NIFTI_SUFFIXES = (".nii.gz", ".nii")
HU_RANGE = (-100.0, 300.0)  # the intensity window of every stage (ScaleIntensityRanged in the bundles)
IMAGE_SUFFIX = "_0000"  # FLARE: <case>_0000.nii.gz is the image, <case>.nii.gz the label map


class InputError(ValueError):
    """An input file or folder that cannot be used; the message names it and says why."""


def input_error_in(error: BaseException | None) -> InputError | None:
    """The :class:`InputError` behind ``error``, following ``__cause__``/``__context__`` (MONAI wraps it)."""
    seen = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, InputError):
            return error
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return None


def _report_input_errors(previous_hook):
    def hook(kind, error, traceback):
        cause = input_error_in(error)
        if cause is None or os.environ.get("FLARE_C2F_TRACEBACK"):
            return previous_hook(kind, error, traceback)
        print(f"error: {cause}\n(set FLARE_C2F_TRACEBACK=1 for the full traceback)", file=sys.stderr)

    hook.reports_input_errors = True
    return hook


# `python -m monai.bundle run` buries an input error under MONAI's config-evaluation traceback; with this
# hook the command ends with just the message that names the file and the problem (exit status stays 1).
if not getattr(sys.excepthook, "reports_input_errors", False):
    sys.excepthook = _report_input_errors(sys.excepthook)


def case_name(path: str | os.PathLike) -> str:
    """FLARE case id of an image or label file: ``FLARE22_Tr_0001`` for ``.../FLARE22_Tr_0001_0000.nii.gz``."""
    name = Path(path).name
    for suffix in NIFTI_SUFFIXES:
        if name.endswith(suffix):
            name = name[: -len(suffix)]
            break
    return name[: -len(IMAGE_SUFFIX)] if name.endswith(IMAGE_SUFFIX) else name


def is_nifti(path: str | os.PathLike) -> bool:
    return str(path).endswith(NIFTI_SUFFIXES)


def check_volume(path: str | os.PathLike, what: str = "image") -> tuple[int, int, int]:
    """Read the header of ``path`` and return its 3D shape; raise :class:`InputError` if it is not a 3D NIfTI.

    A 4D file whose fourth axis has length 1 counts as 3D. Only the header is read, so this is cheap.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: {what} file does not exist")
    try:
        shape = tuple(int(s) for s in nib.load(str(path)).shape)
    except Exception as error:  # nibabel raises several types for files it cannot parse
        raise InputError(f"{path}: not a readable NIfTI {what} ({error})") from None
    if len(shape) == 4 and shape[3] == 1:
        shape = shape[:3]
    if len(shape) != 3:
        raise InputError(f"{path}: {what} must be a 3D volume, but it has shape {shape} ({len(shape)}D)")
    if min(shape) < 1:
        raise InputError(f"{path}: {what} is empty (shape {shape})")
    return shape


def _nifti_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and is_nifti(p))


def _existing_dir(folder: str | os.PathLike, what: str) -> Path:
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"{folder}: {what} folder does not exist")
    return folder


def find_images(dataset_dir: str | os.PathLike, subdir: str = "imagesTs") -> list[dict[str, str]]:
    """Images to segment: the NIfTI files in ``dataset_dir/subdir`` if that folder exists, else in ``dataset_dir``.

    Returns ``[{"image": path}, ...]`` sorted by name, each file checked to be a readable 3D NIfTI. Files
    that are not NIfTI by name are ignored; a folder with no NIfTI file is an error.
    """
    root = _existing_dir(dataset_dir, "dataset_dir")
    folder = root / subdir if subdir and (root / subdir).is_dir() else root
    images = _nifti_files(folder)
    if not images:
        raise InputError(f"{folder}: no NIfTI images (*.nii.gz, *.nii) found")
    for image in images:
        check_volume(image)
    return [{"image": str(image)} for image in images]


def labelled_cases(
    dataset_dir: str | os.PathLike, images: str = "imagesTr", labels: str = "labelsTr"
) -> list[dict[str, str]]:
    """Training pairs ``[{"image": ..., "label": ...}, ...]`` from the FLARE layout, sorted by case.

    Each image ``<case>_0000.nii.gz`` needs a label ``<case>.nii.gz`` of the same shape.
    """
    root = _existing_dir(dataset_dir, "dataset_dir")
    image_dir = _existing_dir(root / images, "image")
    label_dir = _existing_dir(root / labels, "label")
    image_files = _nifti_files(image_dir)
    if not image_files:
        raise InputError(f"{image_dir}: no NIfTI images (*.nii.gz, *.nii) found")
    label_files = {case_name(p): p for p in _nifti_files(label_dir)}
    cases = []
    for image in image_files:
        label = label_files.get(case_name(image))
        if label is None:
            raise InputError(f"{image}: no label map {case_name(image)}.nii.gz in {label_dir}")
        image_shape, label_shape = check_volume(image), check_volume(label, "label map")
        if image_shape != label_shape:
            raise InputError(f"{label}: label map shape {label_shape} differs from its image's {image_shape} ({image})")
        cases.append({"image": str(image), "label": str(label)})
    return cases


def attach_masks(cases: Sequence[dict], mask_dir: str | os.PathLike, key: str = "coarse") -> list[dict]:
    """Add ``case[key] = mask_dir/<case>.nii.gz`` (e.g. the coarse stage's label maps) to each case.

    Each mask must exist and have its image's shape.
    """
    mask_dir = _existing_dir(mask_dir, f"{key} mask")
    paired = []
    for case in cases:
        mask = mask_dir / f"{case_name(case['image'])}.nii.gz"
        if not mask.is_file():
            raise InputError(f"{mask}: {key} mask for {case['image']} does not exist")
        image_shape, mask_shape = check_volume(case["image"]), check_volume(mask, f"{key} mask")
        if image_shape != mask_shape:
            raise InputError(f"{mask}: {key} mask shape {mask_shape} differs from its image's {image_shape}")
        paired.append({**case, key: str(mask)})
    return paired


def split_cases(cases: Sequence[dict], num_val: int) -> tuple[list[dict], list[dict]]:
    """Deterministic split: the last ``num_val`` cases validate, the rest train."""
    num_val = int(num_val)
    if not 0 < num_val < len(cases):
        raise InputError(f"num_val={num_val} leaves no case to train or to validate among {len(cases)} cases")
    return list(cases[:-num_val]), list(cases[-num_val:])


@contextmanager
def atomic_path(path: str | os.PathLike):
    """Yield a temporary path beside ``path``; on success it replaces ``path``, on any error it is removed.

    So ``path`` is either the old file, no file, or the whole new file: never a partial one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = "".join(path.suffixes[-2:]) or ".tmp"  # keep .nii.gz so writers pick the format
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    os.close(fd)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


def write_nifti_atomic(image: nib.Nifti1Image, path: str | os.PathLike) -> Path:
    with atomic_path(path) as tmp:
        nib.save(image, tmp)
    return Path(path)


def write_text_atomic(text: str, path: str | os.PathLike) -> Path:
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as handle:
        handle.write(text)
    return Path(path)


def save_label_map(labels: np.ndarray, reference: str | os.PathLike, output_dir: str | os.PathLike) -> Path:
    """Write ``labels`` as ``output_dir/<case>.nii.gz`` (uint8) with exactly the reference image's affine.

    ``labels`` must have the reference image's 3D shape; the header (qform/sform) is the reference's.
    """
    reference_image = nib.load(str(reference))
    shape = tuple(reference_image.shape[:3])
    labels = np.asarray(labels)
    if labels.ndim == 4 and labels.shape[0] == 1:
        labels = labels[0]
    if labels.shape != shape:
        raise ValueError(f"{reference}: prediction shape {labels.shape} differs from the image's {shape}")
    header = reference_image.header.copy()
    header.set_data_shape(shape)
    out = nib.Nifti1Image(np.rint(labels).astype(np.uint8), reference_image.affine, header)
    out.set_data_dtype(np.uint8)
    out.header.set_slope_inter(1, 0)
    qform, qcode = reference_image.get_qform(coded=True)
    sform, scode = reference_image.get_sform(coded=True)
    out.set_qform(reference_image.affine if qform is None else qform, int(qcode) if qform is not None else 1)
    out.set_sform(reference_image.affine if sform is None else sform, int(scode) if sform is not None else 1)
    return write_nifti_atomic(out, Path(output_dir) / f"{case_name(reference)}.nii.gz")


class SaveLabelMapd:
    """Dictionary transform: write ``data[key]`` as a FLARE-named uint8 label map beside nothing else.

    The reference image (for name, shape and affine) is the file the prediction came from, read from
    ``data[key].meta["filename_or_obj"]``; the prediction must already be back in that image's grid
    (``Invertd`` before this). The data passes through unchanged.
    """

    def __init__(self, keys: str | Sequence[str] = "pred", output_dir: str | os.PathLike = "./eval"):
        self.keys = [keys] if isinstance(keys, str) else list(keys)
        self.output_dir = output_dir

    def __call__(self, data: dict) -> dict:
        for key in self.keys:
            prediction = data[key]
            reference = prediction.meta["filename_or_obj"]
            array = prediction.detach().cpu().numpy() if hasattr(prediction, "detach") else np.asarray(prediction)
            save_label_map(array, reference, self.output_dir)
        return data


def read_ct(path: str | os.PathLike, device: torch.device | str = "cpu") -> tuple[MetaTensor, np.ndarray]:
    """Read a CT once: (1, X, Y, Z) float32 in [0, 1] on ``device``, reoriented to RAS, with its RAS affine.

    Also returns the orientation transform that takes a RAS array back to the file's array layout. HU are
    clipped to [-100, 300] and scaled to [0, 1], as ``ScaleIntensityRanged`` does in the stage bundles.
    """
    check_volume(path)
    try:
        nifti = nib.load(str(path))
        data = np.asarray(nifti.dataobj, dtype=np.float32)
    except Exception as error:
        raise InputError(f"{path}: cannot read the image data ({error})") from None
    data = data.reshape(data.shape[:3])
    if not np.isfinite(data).all():
        raise InputError(f"{path}: image holds NaN or infinite voxels")
    ornt = nib.orientations.io_orientation(nifti.affine)
    ras = nib.orientations.apply_orientation(data, ornt)
    ras_affine = nifti.affine @ nib.orientations.inv_ornt_aff(ornt, data.shape)
    back = nib.orientations.ornt_transform(nib.orientations.axcodes2ornt("RAS"), ornt)
    tensor = torch.from_numpy(np.ascontiguousarray(ras)).to(device)
    low, high = HU_RANGE
    tensor = ((tensor.clamp_(low, high) - low) / (high - low))[None]
    return MetaTensor(tensor, affine=torch.as_tensor(ras_affine, dtype=torch.float64)), back
