"""Geometry invariance: the same physical image stored another way gives the same physical segmentation.

Every case is reoriented to RAS (flips and axis permutations, no resampling) before any network, so a flipped or
axis-permuted copy of a volume, with its affine adjusted so that it is the same physical image, must give exactly
the same label map once both are mapped back to physical space; this holds for random weights too, and for
oblique affines (the copy flips/permutes the same oblique image). The voxel type (integer, float, NIfTI scaling)
must not matter either. The same checks on the real sample CT are in ``test_real_ct.py``.

The helpers (copies, comparison, the tiny cascade, the timeout guard) are in ``helpers.py``, shared with the other
test files of issue 5.
"""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from flare_c2f_extensions.io.images import read_ct
from flare_c2f_extensions.synthetic.phantom import make_case

from helpers import (  # noqa: F401  (no_hang: an autouse fixture)
    COPIES,
    check_invariance,
    no_hang,
    rotated,
    save,
    segment_batch,
    tiny_cascade,
    write_copies,
)

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
