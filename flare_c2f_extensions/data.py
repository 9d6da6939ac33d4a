"""Cases on disk: finding and checking FLARE-layout images, reading CTs, and writing label maps safely.

An image is a NIfTI file (``.nii.gz``, ``.nii``) or a DICOM series folder (one series, one file per slice).
Every problem with an input is raised as :class:`InputError`, whose message starts with the offending
path, before any network runs.

How unusual inputs are handled (:func:`read_ct`):

- any orientation, oblique affines and permuted axes: the CT is reoriented to the closest RAS array layout
  (flips and axis permutations only, no resampling) and the label map is put back into the file's own layout,
  so the output has exactly the input's shape and affine;
- integer and float voxel types, NIfTI ``scl_slope``/``scl_inter`` and DICOM RescaleSlope/RescaleIntercept
  (per slice) are applied: the networks see Hounsfield units;
- NaN voxels become air (-1000 HU) and infinite voxels the window's ends, with a warning that names the file and
  counts them; an image with no finite voxel is an error;
- 8-bit integer images (label maps, windowed screenshots) are an error: a CT in HU needs more than 8 bits;
  an image with no voxel below -500 HU (no air: a label map in 16 bits, an MR, a normalised image) gets a
  warning and is segmented anyway;
- a volume that is not 3D (2D, or 4D with more than one frame), empty, with a non-invertible affine, truncated
  or unreadable is an error naming the file.
"""

from __future__ import annotations

import logging
import os
import sys
import tempfile
import warnings
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from monai.data import MetaTensor

logger = logging.getLogger(__name__)

# With pydicom installed (DICOM input), MONAI's LoadImage also builds its nvImageCodec DICOM reader and warns
# on every machine without that plugin: noise, the plain pydicom decoders are used.
warnings.filterwarnings("ignore", message="NvImgCodecPydicomReader: nvImageCodec decoder plugin did not register")

NIFTI_SUFFIXES = (".nii.gz", ".nii")
HU_RANGE = (-100.0, 300.0)  # the intensity window of every stage (ScaleIntensityRanged in the bundles)
AIR_HU = -1000.0  # what NaN voxels become
NO_AIR_HU = -500.0  # an abdominal CT in HU always holds voxels below this (air around the body, gas, lung)
MAX_VOXELS = 2**31  # larger than any CT (512 x 512 x 3000 is 0.8e9); a header claiming more is broken
MAX_GZIP_RATIO = 1100  # deflate's best is about 1032:1 (all zeros)
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


class InputWarnings(logging.Handler):
    """``with InputWarnings() as warned: read_ct(...)``: the warnings reading an input logged (``warned.messages``),
    e.g. for a batch report; they are still logged as usual."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())

    def as_dict(self) -> dict:
        return {"warnings": list(self.messages)} if self.messages else {}

    def __enter__(self):
        logger.addHandler(self)
        return self

    def __exit__(self, *exc):
        logger.removeHandler(self)
        return False


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
    """FLARE case id of an image or label file: ``FLARE22_Tr_0001`` for ``.../FLARE22_Tr_0001_0000.nii.gz``.

    A DICOM series folder's case id is the folder's name as it is (``.../patient7`` -> ``patient7``).
    """
    if Path(path).is_dir():
        return Path(path).name
    name = Path(path).name
    for suffix in NIFTI_SUFFIXES:
        if name.endswith(suffix):
            name = name[: -len(suffix)]
            break
    return name[: -len(IMAGE_SUFFIX)] if name.endswith(IMAGE_SUFFIX) else name


def is_nifti(path: str | os.PathLike) -> bool:
    return str(path).endswith(NIFTI_SUFFIXES)


def _check_affine(path, affine: np.ndarray) -> np.ndarray:
    affine = np.asarray(affine, dtype=np.float64)
    if affine.shape != (4, 4) or not np.isfinite(affine).all():
        raise InputError(f"{path}: the voxel-to-world affine is not finite: {affine.tolist()}")
    if abs(np.linalg.det(affine[:3, :3])) < 1e-9:
        raise InputError(f"{path}: the voxel-to-world affine is singular (zero voxel size?): {affine.tolist()}")
    return affine


def _check_shape(path, shape: tuple[int, ...], what: str) -> tuple[int, int, int]:
    if len(shape) == 4 and shape[3] == 1:
        shape = shape[:3]
    if len(shape) != 3:
        raise InputError(f"{path}: {what} must be a 3D volume, but it has shape {shape} ({len(shape)}D)")
    if min(shape) < 1:
        raise InputError(f"{path}: {what} is empty (shape {shape})")
    if int(np.prod(shape, dtype=np.int64)) > MAX_VOXELS:
        raise InputError(f"{path}: {what} shape {shape} is implausibly large (over {MAX_VOXELS} voxels)")
    return shape


def _check_size(path: Path, nifti, shape, what: str) -> None:
    """Refuse a file too small for the voxels its header claims, before anything is allocated or decompressed.

    ``.nii``: header offset + voxel bytes must fit in the file. ``.nii.gz``: deflate cannot compress more than about
    1032:1, so a claim over :data:`MAX_GZIP_RATIO` times the file size is a truncated or corrupt file.
    """
    try:
        needed = int(np.prod(shape, dtype=np.int64)) * nifti.get_data_dtype().itemsize
        size = path.stat().st_size
        offset = int(nifti.dataobj.offset)
    except Exception:  # unusual image types: leave it to the reader
        return
    if str(path).endswith(".gz"):
        if needed > MAX_GZIP_RATIO * size:
            raise InputError(
                f"{path}: truncated or corrupt {what}: its header claims {needed} bytes of voxels, more than a "
                f"{size}-byte gzip file can hold"
            )
    elif size < offset + needed:
        raise InputError(
            f"{path}: truncated {what}: its header claims {offset + needed} bytes, the file has {size}"
        )


def _check_path(path: Path, what: str) -> None:
    if not path.exists():
        raise InputError(f"{path}: {what} file does not exist")
    if not (path.is_file() or is_dicom_series(path)):
        kind = "a folder with no DICOM files" if path.is_dir() else "not a regular file"
        raise InputError(f"{path}: {what} is {kind} (expected a NIfTI file or a DICOM series folder)")


def check_volume(path: str | os.PathLike, what: str = "image") -> tuple[int, int, int]:
    """Read the header of ``path`` and return its 3D shape; raise :class:`InputError` if it is not a 3D image.

    ``path`` is a NIfTI file or a DICOM series folder. A 4D NIfTI whose fourth axis has length 1 counts as 3D.
    Only headers are read, so this is cheap.
    """
    return image_geometry(path, what).shape


def _nifti_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and is_nifti(p))


def _existing_dir(folder: str | os.PathLike, what: str) -> Path:
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"{folder}: {what} folder does not exist")
    return folder


def _image_candidates(folder: Path) -> list[Path]:
    """NIfTI files and DICOM series folders in ``folder``, by name; ``[folder]`` if it is itself a DICOM series."""
    images = _nifti_files(folder) + [p for p in folder.iterdir() if p.is_dir() and is_dicom_series(p)]
    if not images and is_dicom_series(folder):
        return [folder]
    return sorted(images, key=lambda p: p.name)


def find_images(
    dataset_dir: str | os.PathLike, subdir: str = "imagesTs", strict: bool | None = None
) -> list[dict[str, str]]:
    """Images to segment in ``dataset_dir/subdir`` if that folder exists, else in ``dataset_dir``.

    An image is a NIfTI file (``*.nii.gz``, ``*.nii``) or a DICOM series folder (a subfolder holding DICOM
    files; its case name is the folder's name); a folder that is itself a DICOM series is one image. Other
    files are ignored; a folder with no image is an error. Returns ``[{"image": path}, ...]`` sorted by name.

    Each image's header is checked. ``strict=True``: any bad image is an error. ``strict=False``: bad images are
    listed anyway, with a warning, so that a batch runner reports each as failed while the others run.
    ``None`` (default): an error only when every image is bad (nothing could be done), else as ``False``.
    """
    root = _existing_dir(dataset_dir, "dataset_dir")
    folder = root / subdir if subdir and (root / subdir).is_dir() else root
    images = _image_candidates(folder)
    if not images:
        raise InputError(f"{folder}: no NIfTI images (*.nii.gz, *.nii) or DICOM series folders found")
    problems = []
    for image in images:
        try:
            check_volume(image)
        except InputError as error:
            problems.append(error)
    if problems and (strict or (strict is None and len(problems) == len(images))):
        more = f" (and {len(problems) - 1} more bad image(s))" if len(problems) > 1 else ""
        raise InputError(f"{problems[0]}{more}")
    for problem in problems:
        logger.warning("%s (listed anyway: it will fail on its own, the other images are not affected)", problem)
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


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def prepare_output_dir(path: str | os.PathLike, what: str = "output") -> Path:
    """Create ``path`` if needed and check that files can be written in it; :class:`InputError` if not.

    Meant to run before any work, so that an unusable output folder fails fast with one clear message.
    """
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise InputError(f"{path}: {what} folder cannot be created: a file is in its place") from None
    except OSError as error:
        raise InputError(f"{path}: {what} folder cannot be created ({error.strerror or error})") from None
    try:
        fd, probe = tempfile.mkstemp(prefix=".write-test-", dir=path)
        os.close(fd)
        os.unlink(probe)
    except OSError as error:
        raise InputError(f"{path}: {what} folder is not writable ({error.strerror or error})") from None
    return path


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
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; the result gets a new file's usual permissions
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


def save_label_map(
    labels: np.ndarray, reference: str | os.PathLike | Geometry, output_dir: str | os.PathLike
) -> Path:
    """Write ``labels`` as ``output_dir/<case>.nii.gz`` (uint8) with exactly the reference image's geometry.

    ``reference``: the image the labels belong to (a NIfTI file or a DICOM series folder) or its
    :class:`Geometry`. ``labels`` must have the reference's 3D shape. For a NIfTI reference the header
    (qform/sform and their codes) is the reference's; for a DICOM series the affine is the series' (as
    :func:`image_geometry` and MONAI's ``PydicomReader`` give it) in both qform and sform, code 1 (scanner).
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
    out = nib.Nifti1Image(np.rint(labels).astype(np.uint8), geometry.affine, header)
    out.set_data_dtype(np.uint8)
    out.header.set_slope_inter(1, 0)
    if reference_header is not None:
        qform, qcode = reference_header.get_qform(coded=True)
        sform, scode = reference_header.get_sform(coded=True)
        out.set_qform(geometry.affine if qform is None else qform, int(qcode) if qform is not None else 1)
        out.set_sform(geometry.affine if sform is None else sform, int(scode) if sform is not None else 1)
    else:
        out.set_qform(geometry.affine, 1)
        out.set_sform(geometry.affine, 1)
        out.header.set_xyzt_units("mm")
    return write_nifti_atomic(out, Path(output_dir) / f"{case_name(geometry.source)}.nii.gz")


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


# ---------------------------------------------------------------------------------------------------------------
# Geometry and reading: NIfTI files and DICOM series folders
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Geometry:
    """Where an image's voxels are: its 3D ``shape`` and voxel-to-world ``affine`` (RAS+, mm) in its own array
    layout. ``header``: the NIfTI header for a NIfTI image (qform/sform codes), ``None`` for a DICOM series."""

    source: str
    shape: tuple[int, int, int]
    affine: np.ndarray
    header: nib.Nifti1Header | None = None


def image_geometry(path: str | os.PathLike, what: str = "image") -> Geometry:
    """Shape and affine of a NIfTI file or a DICOM series folder, from headers only; :class:`InputError` if the
    image cannot be used (not 3D, unreadable header, singular affine, ...)."""
    path = Path(path)
    _check_path(path, what)
    if path.is_dir():
        series = _DicomSeries.read(path, pixels=False)
        return Geometry(str(path), series.shape, series.affine)
    try:
        nifti = nib.load(str(path))
        shape = tuple(int(s) for s in nifti.shape)
    except Exception as error:  # nibabel raises several types for files it cannot parse
        raise InputError(f"{path}: not a readable NIfTI {what} ({error})") from None
    shape = _check_shape(path, shape, what)
    _check_size(path, nifti, shape, what)
    # NIfTI-2 and friends: keep the geometry, write a fresh NIfTI-1 header
    header = nifti.header if type(nifti.header) is nib.Nifti1Header else nib.Nifti1Header()
    return Geometry(str(path), shape, _check_affine(path, nifti.affine), header)


def is_dicom_file(path: str | os.PathLike) -> bool:
    """A DICOM Part 10 file (``DICM`` after the 128-byte preamble)."""
    try:
        with open(path, "rb") as handle:
            return handle.read(132)[128:] == b"DICM"
    except OSError:
        return False


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
class _DicomSeries:
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
    def read(cls, folder: Path, pixels: bool) -> _DicomSeries:
        pydicom = _pydicom()

        def sop_class(dataset):
            meta = getattr(dataset, "file_meta", None)
            return str(meta.get("MediaStorageSOPClassUID", "")) if meta is not None else ""

        slices, others = [], []
        for path in sorted(p for p in folder.iterdir() if p.is_file() and is_dicom_file(p)):
            try:
                dataset = pydicom.dcmread(str(path), stop_before_pixels=not pixels)
            except Exception as error:
                raise InputError(f"{path}: not a readable DICOM file ({error})") from None
            if "Rows" in dataset and "Columns" in dataset:
                slices.append((path, dataset))
            else:
                others.append((path, dataset))
        if not slices:
            raise InputError(f"{folder}: no DICOM image slices in this folder")
        image_classes = {sop_class(dataset) for _, dataset in slices}
        for path, dataset in others:  # DICOMDIR, structured reports, ... are skipped; a cut-off slice is not
            if sop_class(dataset) in image_classes:
                raise InputError(f"{path}: a DICOM image without Rows/Columns: truncated or incomplete file")
        series = {str(ds.get("SeriesInstanceUID", "")) for _, ds in slices}
        if len(series) > 1:
            raise InputError(
                f"{folder}: holds {len(series)} DICOM series ({', '.join(sorted(series))}); "
                "put each series in its own folder"
            )
        first_path, first = slices[0]
        frames = int(first.get("NumberOfFrames", 1) or 1)
        if frames > 1:
            raise InputError(
                f"{first_path}: multi-frame DICOM ({frames} frames) is not supported: convert it to NIfTI"
            )
        if int(first.get("SamplesPerPixel", 1)) != 1:
            raise InputError(f"{first_path}: a colour DICOM image, not a CT")
        if int(first.get("BitsAllocated", 16)) == 8:
            raise InputError(f"{first_path}: 8-bit DICOM pixels cannot hold Hounsfield units: not a CT image")
        modality = str(first.get("Modality", "CT"))
        if modality != "CT" and pixels:  # once per read of the voxels, not at every header check
            logger.warning("%s: DICOM Modality is %s, not CT: the cascade is made for CT", folder, modality)

        rows, cols = int(first.Rows), int(first.Columns)
        orientation = _floats(first, "ImageOrientationPatient", 6, first_path)
        spacing = _floats(first, "PixelSpacing", 2, first_path)  # between rows, between columns
        if min(spacing) <= 0:
            raise InputError(f"{first_path}: DICOM PixelSpacing {list(spacing)} is not positive")
        row_dir, col_dir = orientation[:3], orientation[3:]
        normal = np.cross(row_dir, col_dir)
        unit = np.isclose(np.linalg.norm(row_dir), 1, atol=1e-2) and np.isclose(np.linalg.norm(col_dir), 1, atol=1e-2)
        if not unit or abs(row_dir @ col_dir) > 1e-2:
            raise InputError(
                f"{first_path}: DICOM ImageOrientationPatient {list(orientation)} is not two orthogonal unit vectors"
            )
        positions = []
        for path, dataset in slices:
            if (int(dataset.Rows), int(dataset.Columns)) != (rows, cols):
                raise InputError(
                    f"{path}: slice size {dataset.Rows}x{dataset.Columns} differs from {first_path}'s {rows}x{cols}"
                )
            if not np.allclose(_floats(dataset, "ImageOrientationPatient", 6, path), orientation, atol=1e-4):
                raise InputError(f"{path}: slice orientation differs from {first_path}'s: not one stack of slices")
            if not np.allclose(_floats(dataset, "PixelSpacing", 2, path), spacing, rtol=1e-4):
                raise InputError(f"{path}: PixelSpacing differs from {first_path}'s")
            positions.append(_floats(dataset, "ImagePositionPatient", 3, path))
        positions = np.asarray(positions)
        depth = positions @ normal
        order = np.argsort(depth, kind="stable")
        numbers = [_instance_number(dataset) for _, dataset in slices]
        if len(order) > 1 and None not in numbers and numbers[order[0]] > numbers[order[-1]]:
            order = order[::-1]  # keep the InstanceNumber direction, as MONAI's PydicomReader does
        slices = [slices[i] for i in order]
        positions, depth = positions[order], depth[order]
        n = len(slices)
        if n > 1:
            gaps = np.abs(np.diff(depth))
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
        else:
            thickness = first.get("SpacingBetweenSlices") or first.get("SliceThickness") or 1.0
            step = normal * abs(float(thickness))
        affine = np.eye(4)
        affine[:3, 0] = row_dir * spacing[1]  # array axis 0: the column index runs along the row direction
        affine[:3, 1] = col_dir * spacing[0]  # array axis 1: the row index runs along the column direction
        affine[:3, 2] = step
        affine[:3, 3] = positions[0]
        affine = np.diag([-1.0, -1.0, 1.0, 1.0]) @ affine  # LPS -> RAS
        shape = (cols, rows, n)
        _check_affine(folder, affine)
        _check_shape(folder, shape, "image")
        series = cls(folder, [path for path, _ in slices], shape, affine)
        if pixels:
            series.data = _dicom_voxels(slices, shape)
        return series


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
        slope = float(dataset.get("RescaleSlope", 1.0) or 1.0)
        intercept = float(dataset.get("RescaleIntercept", 0.0) or 0.0)
        data[:, :, k] = (pixels.astype(np.float64) * slope + intercept).T
    return data


def _load_nifti(path: Path):
    """``nib.load``, but a gzipped NIfTI-1 is inflated with ISA-L (``isal``), about twice as fast as zlib: on a
    512x512x300 CT the read is a visible part of the cascade's time."""
    if path.name.endswith(".gz"):
        try:
            from isal import igzip
        except ImportError:  # pragma: no cover - isal is a dependency; zlib still works
            return nib.load(str(path))
        with igzip.open(path, "rb") as handle:
            raw = handle.read()
        if len(raw) >= 4 and int.from_bytes(raw[:4], "little") == 348:  # NIfTI-1 header size
            return nib.Nifti1Image.from_bytes(raw)
    return nib.load(str(path))


def _read_voxels(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """The image's voxels in HU (float32, or int16 when stored so unscaled; 3D, the file's own layout) and its
    affine."""
    if path.is_dir():
        series = _DicomSeries.read(path, pixels=True)
        return series.data, series.affine
    geometry = image_geometry(path)
    try:
        nifti = _load_nifti(path)
        stored = nifti.get_data_dtype()
        unscaled = nifti.header.get_slope_inter() in ((None, None), (1.0, 0.0))
        if stored.kind in "ui" and stored.itemsize == 1 and unscaled:
            raise InputError(
                f"{path}: an 8-bit integer image ({stored}) cannot hold Hounsfield units: a label map, not a CT"
            )
        if stored == np.int16 and unscaled:  # the usual CT: kept in int16 (2 bytes a voxel) until read_ct scales it
            data = np.asarray(nifti.dataobj)
        else:
            data = np.asarray(nifti.dataobj, dtype=np.float32)
        del nifti
    except InputError:
        raise
    except Exception as error:
        raise InputError(f"{path}: cannot read the image data ({error})") from None
    return data.reshape(geometry.shape), geometry.affine


def _sanitise_hu(path, data: np.ndarray) -> np.ndarray:
    """Replace NaN by air and infinities by the window's ends (with a warning); warn when there is no air."""
    low, high = float(np.min(data)), float(np.max(data))
    if not (np.isfinite(low) and np.isfinite(high)):
        finite = np.isfinite(data)
        n_finite = int(np.count_nonzero(finite))
        if n_finite == 0:
            raise InputError(f"{path}: no finite voxel (all NaN or infinite)")
        n_nan = int(np.count_nonzero(np.isnan(data)))
        n_inf = data.size - n_finite - n_nan
        np.nan_to_num(data, copy=False, nan=AIR_HU, posinf=HU_RANGE[1], neginf=HU_RANGE[0])
        logger.warning(
            "%s: %d NaN voxel(s) set to %g HU (air) and %d infinite voxel(s) to the window's ends, of %d voxels",
            path, n_nan, AIR_HU, n_inf, data.size,
        )
        low, high = float(data[finite].min()), float(data[finite].max())
    if low > NO_AIR_HU:
        logger.warning(
            "%s: no voxel below %g HU (values %g to %g): not a CT in Hounsfield units? (a label map, an MR or a "
            "normalised image gives meaningless organs); segmenting it anyway", path, NO_AIR_HU, low, high,
        )
    return data


def read_ct(path: str | os.PathLike, device: torch.device | str = "cpu") -> tuple[MetaTensor, np.ndarray]:
    """Read a CT once: (1, X, Y, Z) float32 in [0, 1] on ``device``, reoriented to RAS, with its RAS affine.

    ``path``: a NIfTI file or a DICOM series folder (see the module docstring for unusual inputs). Also returns
    the orientation transform that takes a RAS array back to the file's array layout. HU are clipped to
    [-100, 300] and scaled to [0, 1], as ``ScaleIntensityRanged`` does in the stage bundles.
    """
    path = Path(path)
    _check_path(path, "image")
    data, affine = _read_voxels(path)
    data = _sanitise_hu(path, data)
    ornt = nib.orientations.io_orientation(affine)
    ras = nib.orientations.apply_orientation(data, ornt)
    ras_affine = affine @ nib.orientations.inv_ornt_aff(ornt, data.shape)
    back = nib.orientations.ornt_transform(nib.orientations.axcodes2ornt("RAS"), ornt)
    tensor = torch.from_numpy(np.ascontiguousarray(ras)).to(device)
    del data, ras
    low, high = HU_RANGE
    if tensor.dtype == torch.int16:  # clamp and shift in int16 (whole HU: exact), then one float copy
        tensor = tensor.clamp_(int(low), int(high)).sub_(int(low)).to(torch.float32)
    else:
        tensor = tensor.clamp_(low, high).sub_(low)
    tensor = tensor.div_(high - low)[None]  # in place: no full-size temporaries
    return MetaTensor(tensor, affine=torch.as_tensor(ras_affine, dtype=torch.float64)), back
