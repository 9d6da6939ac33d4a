"""Geometry invariance: the same physical image stored another way gives the same physical segmentation.

Every case is reoriented to RAS (flips and axis permutations, no resampling) before any network, so a flipped or
axis-permuted copy of a volume, with its affine adjusted so that it is the same physical image, must give exactly
the same label map once both are mapped back to physical space; this holds for random weights too, and for
oblique affines (the copy flips/permutes the same oblique image). The voxel type (integer, float, NIfTI scaling)
must not matter either. The same checks on the real sample CT are in ``test_real_ct.py``.

The helpers here (copies, comparison, the tiny cascade, the timeout guard) are shared by the other two test files
of issue 5.
"""

from __future__ import annotations

import signal
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from conftest import BUNDLES
from flare_c2f_extensions.cascade import Cascade, CascadeRunner
from flare_c2f_extensions.discovery import find_images
from flare_c2f_extensions.images import read_ct
from flare_c2f_extensions.phantom import make_case

TINY_NET = {"network_def": {"channels": [4, 8, 8, 8, 8]}}
TINY_STAGES = {
    name: {**TINY_NET, "spatial_size": [32, 32, 32]}
    for name in ("coarse", "solid", "digestive", "vessels", "locator", "refiner")
}
TEST_TIMEOUT_S = 120


# -- shared helpers ----------------------------------------------------------------------------------------------


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


# -- tests ---------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cascade():
    return tiny_cascade()


@pytest.fixture(scope="module")
def phantom():
    """One synthetic CT (int16 HU, RAS, anisotropic voxels, odd sizes so no axis can be confused)."""
    case = make_case(11, shape=(44, 40, 28))
    return case.image, case.affine


@pytest.mark.parametrize("oblique", [False, True], ids=["axis_aligned", "oblique"])
def test_read_ct_gives_the_same_ras_volume_for_every_copy(phantom, oblique, tmp_path):
    data, affine = phantom
    affine = rotated(affine) if oblique else affine
    images = write_copies(data, affine, tmp_path)
    reference, reference_back = read_ct(images["original"])
    for name in COPIES:
        volume, back = read_ct(images[name])
        assert torch.equal(volume.as_tensor(), reference.as_tensor()), name
        # NIfTI stores affines in float32: a copy's affine is the same up to float32 rounding (~1e-5 mm)
        assert np.allclose(volume.affine.numpy(), reference.affine.numpy(), atol=1e-4), name
        stored = np.asarray(nib.load(str(images[name])).dataobj)
        ras = volume[0].numpy() * 400.0 - 100.0  # back to clipped HU
        assert np.allclose(nib.orientations.apply_orientation(ras, back), np.clip(stored, -100, 300), atol=1e-3), name


@pytest.mark.parametrize("oblique", [False, True], ids=["axis_aligned", "oblique"])
def test_flipped_and_permuted_copies_segment_identically(cascade, phantom, oblique, tmp_path):
    data, affine = phantom
    check_invariance(cascade, data, rotated(affine) if oblique else affine, tmp_path)


def _stored_variants(data: np.ndarray, affine: np.ndarray, folder: Path) -> dict[str, Path]:
    """The same HU as int16, int32, float32, float64, uint16 + scl_inter, int16 + scl_slope, and uncompressed .nii."""
    hu = data.astype(np.float64)
    paths = {
        "int16": save(hu, affine, folder / "int16_0000.nii.gz", np.int16),
        "int32": save(hu, affine, folder / "int32_0000.nii.gz", np.int32),
        "float32": save(hu.astype(np.float32), affine, folder / "float32_0000.nii.gz", np.float32),
        "float64": save(hu, affine, folder / "float64_0000.nii.gz", np.float64),
        "uint16_scaled": save(hu + 1024, affine, folder / "uint16_scaled_0000.nii.gz", np.uint16, (1.0, -1024.0)),
        "int16_scaled": save((hu + 1024) * 2, affine, folder / "int16_scaled_0000.nii.gz", np.int16, (0.5, -1024.0)),
        "uncompressed": save(hu.astype(np.float32), affine, folder / "uncompressed_0000.nii", np.float32),
    }
    for name in ("uint16_scaled", "int16_scaled"):  # the stored numbers really differ, only the scaling agrees
        stored = nib.load(str(paths[name]))
        assert not np.array_equal(stored.dataobj.get_unscaled(), data)
        assert np.array_equal(np.asarray(stored.dataobj), hu)
    return paths


def test_voxel_type_and_scaling_give_the_same_volume(phantom, tmp_path):
    data, affine = phantom
    paths = _stored_variants(data, affine, tmp_path)
    reference, _ = read_ct(paths["int16"])
    for name, path in paths.items():
        volume, _ = read_ct(path)
        assert volume.dtype == torch.float32
        assert torch.equal(volume.as_tensor(), reference.as_tensor()), name
        assert np.array_equal(volume.affine.numpy(), reference.affine.numpy()), name


def test_voxel_type_and_scaling_give_the_same_labels(cascade, phantom, tmp_path):
    """End to end for a few storages (the volumes are equal, so the label maps must be too)."""
    data, affine = phantom
    paths = _stored_variants(data, affine, tmp_path / "all")
    folder = tmp_path / "images"
    folder.mkdir()
    for name in ("int16", "float64", "uint16_scaled", "uncompressed"):
        paths[name].rename(folder / paths[name].name)
    out = tmp_path / "out"
    report = segment_batch(cascade, folder, out)
    assert report["num_done"] == 4
    reference = np.asarray(nib.load(str(out / "int16.nii.gz")).dataobj)
    for path in sorted(out.glob("*.nii.gz")):
        assert np.array_equal(np.asarray(nib.load(str(path)).dataobj), reference), path.name
