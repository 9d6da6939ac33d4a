"""The names ``flare_c2f_extensions.data`` held before it was split by job, importable from here for one release.

New code imports from the modules that hold them: :mod:`.errors`, :mod:`.files`, :mod:`.geometry`,
:mod:`.discovery`, :mod:`.images`, :mod:`.dicom`, :mod:`.label_maps`.
"""

from .dicom import DicomSeries, _DicomSeries, is_dicom_file, is_dicom_series
from .discovery import (
    IMAGE_SUFFIX,
    NIFTI_SUFFIXES,
    FoundImages,
    attach_masks,
    case_name,
    find_images,
    is_nifti,
    labelled_cases,
    split_cases,
)
from .errors import InputError, InputWarnings, input_error_in
from .files import (
    atomic_path,
    finished_output,
    outputs_apart_from_inputs,
    prepare_output_dir,
    write_nifti_atomic,
    write_text_atomic,
)
from .geometry import MAX_VOXELS, Geometry
from .images import AIR_HU, HU_RANGE, NO_AIR_HU, check_volume, image_geometry, read_ct
from .images import read_voxels as _read_voxels
from .label_maps import SaveLabelMapd, label_map_image, qform_holds, save_label_map

__all__ = [
    "AIR_HU", "HU_RANGE", "IMAGE_SUFFIX", "MAX_VOXELS", "NIFTI_SUFFIXES", "NO_AIR_HU", "DicomSeries", "FoundImages",
    "Geometry", "InputError", "InputWarnings", "SaveLabelMapd", "_DicomSeries", "_read_voxels", "atomic_path",
    "attach_masks", "case_name", "check_volume", "find_images", "finished_output", "image_geometry",
    "input_error_in", "is_dicom_file", "is_dicom_series", "is_nifti", "label_map_image", "labelled_cases",
    "outputs_apart_from_inputs", "prepare_output_dir", "qform_holds", "read_ct", "save_label_map", "split_cases",
    "write_nifti_atomic", "write_text_atomic",
]
