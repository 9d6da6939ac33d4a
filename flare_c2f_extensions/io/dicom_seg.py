"""A DICOM Segmentation (SEG) of a label map, referencing the CT series it was made from (written with highdicom).

One segment per organ, labelled with the organ's name and coded with its SNOMED CT code (``labels.SNOMED_CT``:
the organ as DICOM's CID 7154 codes it, with a laterality modifier for paired organs), category "Anatomical
Structure", algorithm type AUTOMATIC. highdicom builds the object by the Segmentation IOD's rules and refuses
what breaks them. Frames are those of the source slices that hold any organ (empty frames are left out).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from flare_c2f_extensions.errors import InputError
from flare_c2f_extensions.io.dicom import DicomSeries
from flare_c2f_extensions.labels import ORGANS, SNOMED_ANATOMICAL_STRUCTURE, SNOMED_CT, SNOMED_LATERALITY
from flare_c2f_extensions.version import __version__

__all__ = ["check_source", "dicom_seg", "segment_descriptions"]

SERIES_NUMBER = 9901  # a series number unlikely to clash with the scanner's
# Type 2 attributes (present, may be empty) that a SEG copies from its source images; anonymised series often lack
# them, so they are added empty to the in-memory copies (the input files are not touched).
PATIENT_STUDY_TYPE2 = (
    "PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime", "ReferringPhysicianName",
    "StudyID", "AccessionNumber",
)


def _code(value: str, meaning: str):
    from highdicom.sr import CodedConcept

    return CodedConcept(value, "SCT", meaning)


def segment_descriptions(organs: Sequence[int]) -> list:
    """highdicom segment descriptions for ``organs`` (FLARE ids), numbered 1..k in that order."""
    import highdicom as hd
    from pydicom.sr.codedict import codes

    algorithm = hd.AlgorithmIdentificationSequence(
        name="flare-c2f", version=__version__, family=codes.cid7162.ArtificialIntelligence
    )
    descriptions = []
    for number, organ in enumerate(organs, start=1):
        value, meaning, laterality = SNOMED_CT[organ]
        description = hd.seg.SegmentDescription(
            segment_number=number,
            segment_label=ORGANS[organ],
            segmented_property_category=_code(*SNOMED_ANATOMICAL_STRUCTURE),
            segmented_property_type=_code(value, meaning),
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algorithm,
        )
        if laterality is not None:
            description.SegmentedPropertyTypeModifierCodeSequence = [_code(*SNOMED_LATERALITY[laterality])]
        descriptions.append(description)
    return descriptions


def check_source(series_folder: str | os.PathLike) -> None:
    """:class:`InputError` now if the series cannot be the source of a SEG (checked before any network runs)."""
    import pydicom

    folder = Path(series_folder)
    if not folder.is_dir():
        raise InputError(
            f"{folder}: --dicom_seg needs the DICOM series (a SEG references its slices), not a NIfTI file"
        )
    first = pydicom.dcmread(str(DicomSeries.read(folder, pixels=False).files[0]), stop_before_pixels=True)
    for keyword in ("SOPClassUID", "StudyInstanceUID", "SeriesInstanceUID", "FrameOfReferenceUID"):
        if not str(first.get(keyword, "")):
            raise InputError(f"{folder}: the DICOM series has no {keyword}, which a DICOM Segmentation must reference")


def dicom_seg(labels: np.ndarray, series_folder: str | os.PathLike, organs: Sequence[int]):
    """The SEG dataset of ``labels`` (FLARE ids, in the series' array layout as ``data.read_ct`` reads it: column,
    row, slice) over the DICOM series in ``series_folder``; segments for ``organs``."""
    import highdicom as hd
    import pydicom

    folder = Path(series_folder)
    if not folder.is_dir():
        raise InputError(f"{folder}: a DICOM Segmentation needs the DICOM series it segments, not a NIfTI file")
    series = DicomSeries.read(folder, pixels=False)
    if labels.shape != series.shape:
        raise ValueError(f"{folder}: label map shape {labels.shape} differs from the series' {series.shape}")
    sources = [pydicom.dcmread(str(path)) for path in series.files]
    for source in sources:
        for keyword in PATIENT_STUDY_TYPE2:
            if keyword not in source:
                setattr(source, keyword, "")
    lut = np.zeros(256, dtype=np.uint8)
    lut[list(organs)] = np.arange(1, len(organs) + 1, dtype=np.uint8)
    frames = np.ascontiguousarray(lut[labels].transpose(2, 1, 0))  # (slice, row, column), one frame per source
    return hd.seg.Segmentation(
        source_images=sources,
        pixel_array=frames,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=segment_descriptions(organs),
        series_instance_uid=hd.UID(),
        series_number=SERIES_NUMBER,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer="flare-c2f",
        manufacturer_model_name="FLARE22 coarse-to-fine cascade",
        software_versions=__version__,
        device_serial_number="none",
        series_description="flare-c2f organs",
    )
