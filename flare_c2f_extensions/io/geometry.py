"""Where an image's voxels are (:class:`Geometry`) and the checks every volume's header must pass."""

from __future__ import annotations

from dataclasses import dataclass

import nibabel as nib
import numpy as np

from flare_c2f_extensions.errors import InputError

__all__ = ["MAX_VOXELS", "Geometry", "check_affine", "check_shape"]

MAX_VOXELS = 2**31  # larger than any CT (512 x 512 x 3000 is 0.8e9); a header claiming more is broken


@dataclass(frozen=True)
class Geometry:
    """Where an image's voxels are: its 3D ``shape`` and voxel-to-world ``affine`` (RAS+, mm) in its own array
    layout. ``header``: the NIfTI header for a NIfTI image (qform/sform codes), ``None`` for a DICOM series."""

    source: str
    shape: tuple[int, int, int]
    affine: np.ndarray
    header: nib.Nifti1Header | None = None



def check_affine(path, affine: np.ndarray) -> np.ndarray:
    affine = np.asarray(affine, dtype=np.float64)
    if affine.shape != (4, 4) or not np.isfinite(affine).all():
        raise InputError(f"{path}: the voxel-to-world affine is not finite: {affine.tolist()}")
    if abs(np.linalg.det(affine[:3, :3])) < 1e-9:
        raise InputError(f"{path}: the voxel-to-world affine is singular (zero voxel size?): {affine.tolist()}")
    return affine


def check_shape(path, shape: tuple[int, ...], what: str) -> tuple[int, int, int]:
    if len(shape) == 4 and shape[3] == 1:
        shape = shape[:3]
    if len(shape) != 3:
        raise InputError(f"{path}: {what} must be a 3D volume, but it has shape {shape} ({len(shape)}D)")
    if min(shape) < 1:
        raise InputError(f"{path}: {what} is empty (shape {shape})")
    if int(np.prod(shape, dtype=np.int64)) > MAX_VOXELS:
        raise InputError(f"{path}: {what} shape {shape} is implausibly large (over {MAX_VOXELS} voxels)")
    return shape
