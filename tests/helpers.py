"""Helpers the test modules share: the tiny network and grid, writers of NIfTI and DICOM test images, copies of one
physical image stored another way, the tiny random cascade and its batch runs, and a guard against hangs.

Tests import from here (and fixtures from conftest), never from each other.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from flare_c2f_extensions.cascade.pipeline import Cascade
from flare_c2f_extensions.cli.quickstart import bundle_workflow  # noqa: F401  (the tests run bundles the quickstart's way)
from flare_c2f_extensions.io.discovery import find_images
from flare_c2f_extensions.paths import STAGE_BUNDLES
from flare_c2f_extensions.runs.cascade_run import CascadeRunner
from flare_c2f_extensions.synthetic.phantom import make_case

REPO = Path(__file__).resolve().parents[1]
BUNDLES = REPO / "bundles"
# The MONAI bundle metadata schema is not in the repository; point this variable at a local copy to check the
# bundles' metadata against it (CI sets it). Without it the schema checks skip and say how to enable them.
SCHEMA_ENV = "FLARE_C2F_METADATA_SCHEMA"

# Tiny network and grid for CPU tests; set through config overrides only, as a user would.
TINY_CHANNELS = [4, 8, 8, 8, 8]
TINY_GRID = [32, 32, 32]
TINY = {"spatial_size": TINY_GRID, "network_def#channels": TINY_CHANNELS, "num_workers": 0}  # one bundle's run
TINY_TRAIN = {**TINY, "batch_size": 2, "num_val": 1, "max_epochs": 1, "val_interval": 1}
TINY_STAGES = {name: {"network_def": {"channels": TINY_CHANNELS}, "spatial_size": TINY_GRID} for name in STAGE_BUNDLES}
TEST_TIMEOUT_S = 120
CLI_TIMEOUT_S = 300


@pytest.fixture(autouse=True)
def no_hang():
    """Fail a test that runs longer than ``TEST_TIMEOUT_S`` instead of hanging the run (SIGALRM, main thread)."""

    def expire(signum, frame):
        raise TimeoutError(f"test took over {TEST_TIMEOUT_S} s: a hang?")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(TEST_TIMEOUT_S)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


def tiny_cascade(seed: int = 0) -> Cascade:
    """Every stage with random (seeded) weights: the networks' answers are arbitrary but deterministic."""
    torch.manual_seed(seed)
    return Cascade.from_bundles(BUNDLES, device="cpu", stage_overrides=TINY_STAGES, require_weights=False)


def save(data: np.ndarray, affine: np.ndarray, path: Path, dtype=None, slope_inter=None) -> Path:
    """Write a NIfTI with ``affine`` in qform and sform (``dtype``/``slope_inter``: how it is stored).

    Integer ``dtype``: ``data`` is stored as it is (cast first, so that nibabel does not invent a scaling).
    """
    data = np.asarray(data)
    if dtype is not None and np.dtype(dtype).kind in "ui":
        data = data.astype(dtype)
    image = nib.Nifti1Image(data, affine)
    if dtype is not None:
        image.set_data_dtype(dtype)
    if slope_inter is not None:
        image.header.set_slope_inter(*slope_inter)
    image.set_qform(affine, 1)
    image.set_sform(affine, 1)
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(image, str(path))
    return path


def flipped(data: np.ndarray, affine: np.ndarray, axes) -> tuple[np.ndarray, np.ndarray]:
    """The same physical image with the array reversed along ``axes`` (voxel i -> n-1-i)."""
    affine = np.array(affine, dtype=np.float64)
    for axis in axes:
        data = np.flip(data, axis)
        affine[:3, 3] += affine[:3, axis] * (data.shape[axis] - 1)
        affine[:3, axis] *= -1
    return np.ascontiguousarray(data), affine


def permuted(data: np.ndarray, affine: np.ndarray, order) -> tuple[np.ndarray, np.ndarray]:
    """The same physical image with array axes in ``order`` (new axis k is old axis ``order[k]``)."""
    affine = np.array(affine, dtype=np.float64)
    affine[:, :3] = affine[:, list(order)]
    return np.ascontiguousarray(np.transpose(data, order)), affine


def rotated(affine: np.ndarray, degrees=(4.0, -3.0, 5.0)) -> np.ndarray:
    """``affine`` turned about the world origin by small angles about x, y and z: an oblique acquisition."""
    ax, ay, az = np.deg2rad(degrees)
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    turn = np.eye(4)
    turn[:3, :3] = rz @ ry @ rx
    return turn @ np.asarray(affine, dtype=np.float64)


# Copies of one image: (name, how). Flips of one and of all axes, a cyclic permutation, a swap plus flip.
COPIES = {
    "flip_x": lambda d, a: flipped(d, a, (0,)),
    "flip_all": lambda d, a: flipped(d, a, (0, 1, 2)),
    "permute_zxy": lambda d, a: permuted(d, a, (2, 0, 1)),
    "swap_xy_flip_z": lambda d, a: flipped(*permuted(d, a, (1, 0, 2)), (2,)),
}


def write_copies(data: np.ndarray, affine: np.ndarray, folder: Path, dtype=np.int16) -> dict[str, Path]:
    """The original and every copy of :data:`COPIES` as ``folder/<name>_0000.nii.gz``."""
    paths = {"original": save(data, affine, folder / "original_0000.nii.gz", dtype)}
    for name, make in COPIES.items():
        paths[name] = save(*make(data, affine), folder / f"{name}_0000.nii.gz", dtype)
    return paths


def physical(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """A label map in the closest canonical (RAS) layout: array and affine, comparable across storages."""
    canonical = nib.as_closest_canonical(nib.load(str(path)))
    return np.asarray(canonical.dataobj), canonical.affine


def assert_same_physical_labels(reference: Path, other: Path) -> None:
    ref_labels, ref_affine = physical(reference)
    labels, affine = physical(other)
    assert labels.shape == ref_labels.shape, f"{other.name}: canonical shape differs"
    # the same grid up to the float32 rounding of NIfTI affines
    assert np.allclose(affine, ref_affine, atol=1e-4), f"{other.name}: not the same physical grid"
    differing = int(np.count_nonzero(labels != ref_labels))
    assert differing == 0, f"{other.name}: {differing} voxels differ from {reference.name} in physical space"


def assert_same_geometry(output: Path, image: Path) -> None:
    """The label map has exactly the image's 3D shape and affine, as uint8."""
    written, source = nib.load(str(output)), nib.load(str(image))
    assert written.shape == source.shape[:3]
    assert np.array_equal(written.affine, source.affine)
    assert written.get_data_dtype() == np.uint8


def segment_batch(cascade: Cascade, folder: Path, out: Path) -> dict:
    """Run the batch runner on the images of ``folder`` (or ``folder/imagesTs``), as the cascade bundle does;
    every case must succeed."""
    report = CascadeRunner(cascade, find_images(folder), out, progress=False).run()
    assert report["num_failed"] == 0, report
    return report


def check_invariance(cascade: Cascade, data: np.ndarray, affine: np.ndarray, tmp_path: Path) -> dict[str, Path]:
    """Segment the image and all its copies in one batch; all label maps agree in physical space."""
    images = write_copies(data, affine, tmp_path / "images")
    out = tmp_path / "out"
    segment_batch(cascade, tmp_path / "images", out)
    outputs = {name: out / f"{name}.nii.gz" for name in images}
    for name, image in images.items():
        assert_same_geometry(outputs[name], image)
    labels = np.asarray(nib.load(str(outputs["original"])).dataobj)
    assert len(np.unique(labels)) > 3, "a trivial label map would prove nothing"
    for name in COPIES:
        assert_same_physical_labels(outputs["original"], outputs[name])
    return outputs



DICOM_SLOPE, DICOM_INTERCEPT = 0.5, -1024.0  # int16 storage: raw = (HU + 1024) * 2, exact for integer HU


def write_dicom_series(
    image: nib.Nifti1Image, folder: Path, reverse_numbers: bool = False, shuffle_names: bool = False
) -> Path:
    """Write ``image`` as a CT DICOM series: one int16 file per slice along array axis 2, rescaled with
    ``DICOM_SLOPE``/``DICOM_INTERCEPT``; array axis 0 runs along a row (columns), axis 1 down the rows.

    ``reverse_numbers``: InstanceNumber runs against the slice positions; ``shuffle_names``: file names do not
    follow the slice order. Positions and directions are written as 16-character decimal strings, as DICOM has them.
    """
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid
    from pydicom.valuerep import format_number_as_ds

    def ds_values(values):
        return [format_number_as_ds(float(v)) for v in values]

    folder.mkdir(parents=True, exist_ok=True)
    hu = np.asarray(image.dataobj, dtype=np.float64)
    raw = np.rint((hu - DICOM_INTERCEPT) / DICOM_SLOPE)
    assert raw.min() >= -32768 and raw.max() <= 32767 and np.array_equal(raw * DICOM_SLOPE + DICOM_INTERCEPT, hu)
    raw = raw.astype(np.int16)
    lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ image.affine
    along_row, down_column = lps[:3, 0], lps[:3, 1]
    column_spacing, row_spacing = np.linalg.norm(along_row), np.linalg.norm(down_column)
    orientation = ds_values([*(along_row / column_spacing), *(down_column / row_spacing)])
    study, series = generate_uid(), generate_uid()
    n = raw.shape[2]
    names = list(range(n))
    if shuffle_names:
        random.Random(0).shuffle(names)
    for k in range(n):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.Modality, ds.PatientName, ds.PatientID = "CT", "Sample^CT", "sample"
        ds.InstanceNumber = n - k if reverse_numbers else k + 1
        ds.ImagePositionPatient = ds_values(lps[:3, :3] @ np.array([0.0, 0.0, k]) + lps[:3, 3])
        ds.ImageOrientationPatient = orientation
        ds.PixelSpacing = ds_values([row_spacing, column_spacing])
        ds.SliceThickness = format_number_as_ds(float(np.linalg.norm(lps[:3, 2])))
        ds.Rows, ds.Columns = raw.shape[1], raw.shape[0]
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleSlope, ds.RescaleIntercept, ds.RescaleType = DICOM_SLOPE, DICOM_INTERCEPT, "HU"
        ds.PixelData = np.ascontiguousarray(raw[:, :, k].T).tobytes()
        try:
            ds.save_as(folder / f"IM{names[k]:05d}", enforce_file_format=True)  # pydicom 3
        except TypeError:
            ds.save_as(folder / f"IM{names[k]:05d}", write_like_original=False)  # pydicom 2
    return folder


def write_phantom(path: Path, seed: int = 3, orientation: str = "LPS") -> Path:
    case = make_case(seed, shape=(48, 48, 32), orientation=orientation)
    image = nib.Nifti1Image(case.image, case.affine)
    image.set_qform(case.affine, 1)
    image.set_sform(case.affine, 1)
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(image, str(path))
    return path


def run_cascade_cli(dataset_dir: Path, output_dir: Path) -> subprocess.CompletedProcess:
    bundle = BUNDLES / "flare22_cascade"
    command = [
        sys.executable, "-m", "monai.bundle", "run",
        "--config_file", str(bundle / "configs" / "inference.json"),
        "--bundle_root", str(bundle), "--dataset_dir", str(dataset_dir), "--output_dir", str(output_dir),
        "--device", "cpu", "--require_weights", "False", "--progress", "False",
        "--stage_overrides", repr(TINY_STAGES),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # one thread, as conftest sets for the tests
    return subprocess.run(command, capture_output=True, text=True, timeout=CLI_TIMEOUT_S, cwd=bundle, env=env)
