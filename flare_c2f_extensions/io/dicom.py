"""DICOM series folders: recognising DICOM files by content, and reading one series (its geometry, and its voxels
in Hounsfield units) with each check naming the slice at fault."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from flare_c2f_extensions.errors import INPUT_LOGGER, InputError
from flare_c2f_extensions.io.geometry import check_affine, check_shape

__all__ = ["DicomSeries", "is_dicom_file", "is_dicom_series"]

logger = logging.getLogger(INPUT_LOGGER)


def is_dicom_file(path: str | os.PathLike) -> bool:
    """A DICOM file, by content: ``DICM`` after the 128-byte preamble (Part 10), or, as some exporters write it
    without the preamble, a data set that starts with a tag of group 0002 (file meta) or 0008 (identification)."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(132)
    except OSError:
        return False
    if head[128:132] == b"DICM":
        return True
    if head[:4] == b"DICM":  # the prefix without the preamble
        return True
    return _starts_like_a_dataset(head)


def _starts_like_a_dataset(head: bytes) -> bool:
    if len(head) < 8:
        return False
    group, element = int.from_bytes(head[0:2], "little"), int.from_bytes(head[2:4], "little")
    if group not in (0x0002, 0x0008) or element > 0x0100:
        return False
    vr = head[4:6]
    if vr.isalpha() and vr.isupper():  # explicit VR little endian
        return True
    return int.from_bytes(head[4:8], "little") < 1024  # implicit VR: a short first element's length


def is_dicom_series(folder: str | os.PathLike) -> bool:
    """A folder holding at least one DICOM file (checked by content, not by name)."""
    folder = Path(folder)
    if not folder.is_dir():
        return False
    try:
        return any(p.is_file() and is_dicom_file(p) for p in folder.iterdir())
    except OSError:
        return False


def _pydicom():
    try:
        import pydicom
    except ImportError:  # pragma: no cover - a dependency of the package
        raise InputError("reading DICOM needs pydicom: pip install pydicom") from None
    return pydicom


def _floats(dataset, keyword: str, count: int, path) -> np.ndarray:
    value = dataset.get(keyword)
    try:
        values = np.asarray([float(v) for v in value], dtype=np.float64)
    except (TypeError, ValueError):
        values = np.asarray([])
    if values.shape != (count,) or not np.isfinite(values).all():
        raise InputError(f"{path}: DICOM {keyword} is missing or invalid ({value!r}): the slice cannot be placed")
    return values


@dataclass
class DicomSeries:
    """One DICOM series in a folder, slices in order: geometry always, HU voxels when read with ``pixels``.

    Array layout as MONAI's ``PydicomReader`` (``swap_ij=True``) gives it: axis 0 the column index, axis 1 the row
    index, axis 2 the slices; slices ordered by their position along the slice normal, in the direction of
    increasing InstanceNumber (PydicomReader's order) when InstanceNumbers are present; the affine from
    ImagePositionPatient, ImageOrientationPatient and PixelSpacing, converted from DICOM's LPS to RAS.
    """

    folder: Path
    files: list[Path]
    shape: tuple[int, int, int]
    affine: np.ndarray
    data: np.ndarray | None = None  # float32 HU (RescaleSlope/RescaleIntercept applied per slice)

    @classmethod
    def read(cls, folder: Path, pixels: bool) -> DicomSeries:
        slices = _read_slices(folder, pixels)
        first = slices[0][1]
        row_dir, col_dir, spacing = _slice_plane(slices)
        normal = np.cross(row_dir, col_dir)
        slices, positions = _ordered_slices(slices, normal)
        step = _slice_step(folder, slices, positions, normal)
        affine = _series_affine(row_dir * spacing[1], col_dir * spacing[0], step, positions[0])
        shape = (int(first.Columns), int(first.Rows), len(slices))
        check_affine(folder, affine)
        check_shape(folder, shape, "image")
        series = cls(folder, [path for path, _ in slices], shape, affine)
        if pixels:
            series.data = _dicom_voxels(slices, shape)
        return series


_DicomSeries = DicomSeries  # the name before the split of data.py (dicom_seg.py, tests)


def _sop_class(dataset) -> str:
    meta = getattr(dataset, "file_meta", None)
    found = meta.get("MediaStorageSOPClassUID", "") if meta is not None else ""
    return str(found or dataset.get("SOPClassUID", ""))


def _read_slices(folder: Path, pixels: bool) -> list[tuple[Path, object]]:
    """The image slices of the folder's one series as (path, data set), checked to be one single-frame CT series."""
    pydicom = _pydicom()
    slices, others = [], []
    for path in sorted(p for p in folder.iterdir() if p.is_file() and is_dicom_file(p)):
        try:  # force: files without the 128-byte preamble are DICOM too (is_dicom_file checked the content)
            dataset = pydicom.dcmread(str(path), stop_before_pixels=not pixels, force=True)
            _complete_file_meta(dataset)
        except Exception as error:
            raise InputError(f"{path}: not a readable DICOM file ({error})") from None
        (slices if "Rows" in dataset and "Columns" in dataset else others).append((path, dataset))
    if not slices:
        raise InputError(f"{folder}: no DICOM image slices in this folder")
    image_classes = {_sop_class(dataset) for _, dataset in slices}
    for path, dataset in others:  # DICOMDIR, structured reports, ... are skipped; a cut-off slice is not
        if _sop_class(dataset) in image_classes:
            raise InputError(f"{path}: a DICOM image without Rows/Columns: truncated or incomplete file")
    series = {str(ds.get("SeriesInstanceUID", "")) for _, ds in slices}
    if len(series) > 1:
        raise InputError(
            f"{folder}: holds {len(series)} DICOM series ({', '.join(sorted(series))}); "
            "put each series in its own folder"
        )
    _check_ct_pixels(folder, *slices[0], pixels)
    return slices


def _check_ct_pixels(folder: Path, first_path: Path, first, pixels: bool) -> None:
    frames = int(first.get("NumberOfFrames", 1) or 1)
    if frames > 1:
        raise InputError(f"{first_path}: multi-frame DICOM ({frames} frames) is not supported: convert it to NIfTI")
    if int(first.get("SamplesPerPixel", 1)) != 1:
        raise InputError(f"{first_path}: a colour DICOM image, not a CT")
    if int(first.get("BitsAllocated", 16)) == 8:
        raise InputError(f"{first_path}: 8-bit DICOM pixels cannot hold Hounsfield units: not a CT image")
    modality = str(first.get("Modality", "CT"))
    if modality != "CT" and pixels:  # once per read of the voxels, not at every header check
        logger.warning("%s: DICOM Modality is %s, not CT: the cascade is made for CT", folder, modality)


def _slice_plane(slices) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The row and column directions and the pixel spacing (between rows, between columns) that every slice
    shares; :class:`InputError` if a slice differs in size, orientation or spacing."""
    first_path, first = slices[0]
    rows, cols = int(first.Rows), int(first.Columns)
    orientation = _floats(first, "ImageOrientationPatient", 6, first_path)
    spacing = _floats(first, "PixelSpacing", 2, first_path)
    if min(spacing) <= 0:
        raise InputError(f"{first_path}: DICOM PixelSpacing {list(spacing)} is not positive")
    row_dir, col_dir = orientation[:3], orientation[3:]
    unit = np.isclose(np.linalg.norm(row_dir), 1, atol=1e-2) and np.isclose(np.linalg.norm(col_dir), 1, atol=1e-2)
    if not unit or abs(row_dir @ col_dir) > 1e-2:
        raise InputError(
            f"{first_path}: DICOM ImageOrientationPatient {list(orientation)} is not two orthogonal unit vectors"
        )
    for path, dataset in slices:
        if (int(dataset.Rows), int(dataset.Columns)) != (rows, cols):
            raise InputError(
                f"{path}: slice size {dataset.Rows}x{dataset.Columns} differs from {first_path}'s {rows}x{cols}"
            )
        if not np.allclose(_floats(dataset, "ImageOrientationPatient", 6, path), orientation, atol=1e-4):
            raise InputError(f"{path}: slice orientation differs from {first_path}'s: not one stack of slices")
        if not np.allclose(_floats(dataset, "PixelSpacing", 2, path), spacing, rtol=1e-4):
            raise InputError(f"{path}: PixelSpacing differs from {first_path}'s")
    return row_dir, col_dir, spacing


def _ordered_slices(slices, normal: np.ndarray) -> tuple[list, np.ndarray]:
    """Slices sorted along the normal, in the InstanceNumber direction (MONAI's PydicomReader order), with their
    positions."""
    positions = np.asarray([_floats(dataset, "ImagePositionPatient", 3, path) for path, dataset in slices])
    order = np.argsort(positions @ normal, kind="stable")
    numbers = [_instance_number(dataset) for _, dataset in slices]
    if len(order) > 1 and None not in numbers and numbers[order[0]] > numbers[order[-1]]:
        order = order[::-1]  # keep the InstanceNumber direction, as MONAI's PydicomReader does
    return [slices[i] for i in order], positions[order]


def _slice_step(folder: Path, slices, positions: np.ndarray, normal: np.ndarray) -> np.ndarray:
    """The vector from one slice to the next; :class:`InputError` for duplicate or unevenly spaced slices."""
    n = len(slices)
    if n == 1:
        first = slices[0][1]
        thickness = first.get("SpacingBetweenSlices") or first.get("SliceThickness") or 1.0
        return normal * abs(float(thickness))
    gaps = np.abs(np.diff(positions @ normal))
    if gaps.min() < 1e-3:
        i = int(np.argmin(gaps))
        raise InputError(
            f"{folder}: slices {slices[i][0].name} and {slices[i + 1][0].name} are at the same position "
            "(duplicates, or several acquisitions in one folder)"
        )
    step = (positions[-1] - positions[0]) / (n - 1)
    tolerance = 0.01 * np.linalg.norm(step) + 1e-3
    deviation = np.linalg.norm(np.diff(positions, axis=0) - step, axis=1)
    if deviation.max() > tolerance:
        i = int(np.argmax(deviation))
        raise InputError(
            f"{folder}: slice spacing is not uniform ({gaps.min():.3f} to {gaps.max():.3f} mm, e.g. between "
            f"{slices[i][0].name} and {slices[i + 1][0].name}): missing slices? A volume needs even spacing"
        )
    return step


def _series_affine(axis0: np.ndarray, axis1: np.ndarray, axis2: np.ndarray, origin: np.ndarray) -> np.ndarray:
    """The RAS voxel-to-world affine from DICOM's LPS axis vectors: axis 0 runs along the row direction (the column
    index), axis 1 along the column direction (the row index), axis 2 from slice to slice."""
    affine = np.eye(4)
    affine[:3, 0], affine[:3, 1], affine[:3, 2], affine[:3, 3] = axis0, axis1, axis2, origin
    return np.diag([-1.0, -1.0, 1.0, 1.0]) @ affine  # LPS -> RAS


def _complete_file_meta(dataset) -> None:
    """A data set read without file meta (no preamble, no group 0002) gets the transfer syntax it was read with,
    which is what pydicom needs to decode its pixels."""
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

    meta = getattr(dataset, "file_meta", None)
    if meta is not None and "TransferSyntaxUID" in meta:
        return
    implicit, little = getattr(dataset, "original_encoding", (True, True))
    if meta is None:
        dataset.file_meta = meta = FileMetaDataset()
    if implicit:
        meta.TransferSyntaxUID = ImplicitVRLittleEndian
    else:
        meta.TransferSyntaxUID = ExplicitVRLittleEndian if little else ExplicitVRBigEndian


def _instance_number(dataset) -> float | None:
    try:
        return float(dataset.get("InstanceNumber"))
    except (TypeError, ValueError):
        return None


def _dicom_voxels(slices, shape) -> np.ndarray:
    data = np.empty(shape, dtype=np.float32)
    for k, (path, dataset) in enumerate(slices):
        try:
            pixels = dataset.pixel_array
        except Exception as error:
            raise InputError(f"{path}: cannot decode the DICOM pixel data ({error})") from None
        if pixels.shape != (shape[1], shape[0]):
            raise InputError(f"{path}: pixel data of shape {pixels.shape}, expected {(shape[1], shape[0])}")
        slope = dataset.get("RescaleSlope", 1.0)
        slope = 1.0 if slope in (None, "") else float(slope)
        if slope == 0:
            raise InputError(f"{path}: RescaleSlope is 0: every voxel would be the same value, the intercept")
        intercept = float(dataset.get("RescaleIntercept", 0.0) or 0.0)
        data[:, :, k] = (pixels.astype(np.float64) * slope + intercept).T
    return data
