"""Label maps written with exactly their image's geometry: uint8 NIfTI, qform/sform chosen so that no reader
places the labels by an approximation, and the bundles' :class:`SaveLabelMapd` transform."""

from __future__ import annotations

import os
from collections.abc import Hashable, Mapping
from pathlib import Path

import nibabel as nib
import numpy as np
from monai.config import KeysCollection
from monai.transforms import MapTransform, SaveImaged

from flare_c2f_extensions.io.discovery import case_name
from flare_c2f_extensions.io.files import add_provenance, write_nifti_atomic
from flare_c2f_extensions.io.geometry import Geometry
from flare_c2f_extensions.io.images import image_geometry

__all__ = ["FlareSaveImaged", "SaveLabelMapd", "label_map_image", "qform_holds", "save_label_map"]


def save_label_map(
    labels: np.ndarray,
    reference: str | os.PathLike | Geometry,
    output_dir: str | os.PathLike,
    name: str | None = None,
    provenance: dict | None = None,
) -> Path:
    """Write ``labels`` as ``output_dir/<case>.nii.gz`` (uint8) with exactly the reference image's geometry
    (:func:`label_map_image`) and, given, its ``provenance`` (:func:`files.add_provenance`)."""
    out = label_map_image(labels, reference)
    if provenance is not None:
        add_provenance(out, provenance)
    source = reference.source if isinstance(reference, Geometry) else reference
    return write_nifti_atomic(out, Path(output_dir) / f"{name or case_name(source)}.nii.gz")


def label_map_image(labels: np.ndarray, reference: str | os.PathLike | Geometry) -> nib.Nifti1Image:
    """``labels`` as a uint8 NIfTI image with exactly the reference image's geometry.

    ``reference``: the image the labels belong to (a NIfTI file or a DICOM series folder) or its
    :class:`Geometry`. ``labels`` must have the reference's 3D shape. The header's qform and sform
    (:func:`_set_forms`): the reference's affine exactly in the sform, and in the qform too unless a qform cannot
    hold it (a sheared affine, e.g. a gantry-tilted series), in which case the qform code is 0 so that no reader
    places the labels by an approximation.
    """
    geometry = reference if isinstance(reference, Geometry) else image_geometry(reference)
    shape = geometry.shape
    labels = np.asarray(labels)
    if labels.ndim == 4 and labels.shape[0] == 1:
        labels = labels[0]
    if labels.shape != shape:
        raise ValueError(f"{geometry.source}: prediction shape {labels.shape} differs from the image's {shape}")
    reference_header = geometry.header
    header = reference_header.copy() if reference_header is not None else nib.Nifti1Header()
    header.set_data_shape(shape)
    if labels.dtype.kind == "f":  # only floats need rounding: np.rint would turn integers into floats first
        labels = np.rint(labels)
    out = nib.Nifti1Image(np.array(labels, dtype=np.uint8), geometry.affine, header)
    out.set_data_dtype(np.uint8)
    out.header.set_slope_inter(1, 0)
    _set_forms(out.header, geometry.affine, reference_header)
    if reference_header is None:
        out.header.set_xyzt_units("mm")
    return out


def qform_holds(affine: np.ndarray, atol_mm: float = 1e-3) -> bool:
    """Whether a NIfTI qform (rotation, voxel sizes, offset: no shear) can hold ``affine`` within ``atol_mm``."""
    header = nib.Nifti1Header()
    header.set_qform(affine, code=1)
    return bool(np.allclose(header.get_qform(), affine, atol=atol_mm, rtol=0))


def _set_forms(header: nib.Nifti1Header, affine: np.ndarray, reference: nib.Nifti1Header | None) -> None:
    """sform = ``affine`` exactly; qform = ``affine`` too when it can hold it (then the two agree), else code 0.

    Codes: the reference's where they mean something (non-zero); a form the reference left at code 0 stays 0
    unless neither form had a code; a DICOM series (no reference header) is in scanner coordinates (code 1).
    """
    qcode = int(reference["qform_code"]) if reference is not None else 1
    scode = int(reference["sform_code"]) if reference is not None else 1
    if not qform_holds(affine):
        qcode = 0
        scode = scode or 1  # the exact geometry must be somewhere: the sform
    header.set_sform(affine, code=scode)
    if reference is not None and np.array_equal(reference.get_qform(), affine):
        header["qform_code"] = qcode  # the reference's quaternion as it is: re-encoding it could move a bit
    else:
        header.set_qform(affine, code=qcode, strip_shears=True)



class SaveLabelMapd(MapTransform):
    """Dictionary transform: write ``data[key]`` as a FLARE-named uint8 label map beside nothing else.

    The reference image (for name, shape and affine) is the file the prediction came from, read from
    ``data[key].meta["filename_or_obj"]``; the prediction must already be back in that image's grid
    (``Invertd`` before this). The data passes through unchanged.
    """

    def __init__(
        self, keys: KeysCollection = "pred", output_dir: str | os.PathLike = "./eval", allow_missing_keys: bool = False
    ):
        super().__init__(keys, allow_missing_keys)
        self.output_dir = output_dir

    def __call__(self, data: Mapping[Hashable, object]) -> Mapping[Hashable, object]:
        for key in self.key_iterator(dict(data)):
            prediction = data[key]
            reference = prediction.meta["filename_or_obj"]
            array = prediction.detach().cpu().numpy() if hasattr(prediction, "detach") else np.asarray(prediction)
            save_label_map(array, reference, self.output_dir)
        return data


class FlareSaveImaged(SaveImaged):
    """:class:`SaveLabelMapd`'s writing as a ``SaveImaged``: MONAI Label drops the ``SaveImaged`` instances from a
    bundle's ``postprocessing`` and MONAI Deploy the transforms whose class name holds ``SaveImage``, and each writes
    the result itself, so a served request never writes into the bundle's ``eval/`` folder. ``monai.bundle run``
    writes ``<case>.nii.gz`` (FLARE names, uint8, the input's exact geometry) into ``output_dir``."""

    def __init__(
        self, keys: KeysCollection = "pred", output_dir: str | os.PathLike = "./eval", allow_missing_keys: bool = False
    ):
        super().__init__(keys, output_dir=output_dir, allow_missing_keys=allow_missing_keys)
        self.save_label_map = SaveLabelMapd(keys, output_dir, allow_missing_keys)

    def __call__(self, data: Mapping[Hashable, object]) -> Mapping[Hashable, object]:
        return self.save_label_map(data)
