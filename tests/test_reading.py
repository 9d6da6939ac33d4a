"""Reading a CT fast: the tiled reorientation copy and int16 voxels viewed in the inflated file give exactly what
nibabel and a plain copy give."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import torch

from flare_c2f_extensions.io.images import TILE, c_order_copy, read_ct, read_voxels


def views(array: np.ndarray):
    """Views of a 3D array as reading makes them: Fortran order, flips, permutations, steps."""
    fortran = np.asfortranarray(array)
    return {
        "fortran": fortran,
        "fortran_flipped": fortran[::-1, ::-1, :],
        "fortran_permuted": fortran.transpose(2, 0, 1)[:, ::-1],
        "c_flipped": array[:, ::-1, ::-1],
        "c_permuted_stepped": array.transpose(1, 2, 0)[::2],
    }


@pytest.mark.parametrize("dtype", [np.int16, np.float32])
@pytest.mark.parametrize("shape", [(5, 7, 3), (TILE[0] + 3, TILE[1] * 2 + 1, TILE[2] * 3 - 2)])
def test_c_order_copy_equals_a_plain_copy(dtype, shape):
    array = np.random.default_rng(0).integers(-1000, 1000, shape).astype(dtype)
    for name, view in views(array).items():
        copy = c_order_copy(view)
        assert copy.flags.c_contiguous and copy.dtype == view.dtype, name
        assert np.array_equal(copy, view), name
        assert not np.shares_memory(copy, array), name


@pytest.mark.parametrize("suffix", [".nii.gz", ".nii"])
@pytest.mark.parametrize("dtype", ["<i2", ">i2"])
def test_int16_voxels_read_as_nibabel_reads_them(tmp_path, suffix, dtype):
    data = np.random.default_rng(1).integers(-1024, 2000, (23, 17, 9)).astype(dtype)
    affine = np.diag([-0.8, -0.8, 1.5, 1.0])  # LPS: reading flips two axes
    path = tmp_path / f"ct{suffix}"
    nib.save(nib.Nifti1Image(data, affine), str(path))
    voxels, read_affine = read_voxels(path)
    assert voxels.dtype.kind == "i" and voxels.dtype.itemsize == 2
    assert np.array_equal(voxels, np.asarray(nib.load(str(path)).dataobj))
    assert np.allclose(read_affine, affine)
    ct, _ = read_ct(path)
    ras = np.clip(data[::-1, ::-1, :].astype(np.float32), -100, 300)
    assert ct.is_contiguous()
    assert torch.equal(ct[0], torch.from_numpy((ras + 100) / 400))


def test_a_4d_file_with_one_frame_reads_as_3d(tmp_path):
    data = np.random.default_rng(2).integers(-1024, 2000, (11, 13, 7, 1)).astype(np.int16)
    path = tmp_path / "ct.nii.gz"
    nib.save(nib.Nifti1Image(data, np.eye(4)), str(path))
    voxels, _ = read_voxels(path)
    assert voxels.shape == (11, 13, 7) and np.array_equal(voxels, data[..., 0])
