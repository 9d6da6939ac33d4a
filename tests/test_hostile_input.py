"""Hostile input: each gets a clear error naming the file, or a sane output (uint8, the input's shape and affine);
never a hang, never a partial output file, never harm to the other cases of a batch.

Every hostile case runs in a batch beside a good case (``find_images`` + ``CascadeRunner``, as the cascade bundle
runs them), and the good case must be written. Policies (``flare_c2f_extensions.io.images``): NaN voxels become air
and infinities the window's ends, with a warning (all non-finite is an error); 8-bit integer images are an error
(a label map); a 16-bit image with no air gets a warning and is segmented; an unwritable output folder fails before
any case runs. A few cases also go through ``python -m monai.bundle run`` with the cascade's inference.json.
"""

from __future__ import annotations

import gzip
import json
import logging
import os
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from flare_c2f_extensions.errors import FAILED_CASES_EXIT_STATUS, InputError
from flare_c2f_extensions.io.discovery import find_images
from flare_c2f_extensions.labels import NUM_CLASSES
from flare_c2f_extensions.runs.cascade_run import CascadeRunner
from flare_c2f_extensions.synthetic.phantom import make_case

from helpers import TINY_STAGES, assert_same_geometry, no_hang, run_cascade_cli, save, tiny_cascade, write_dicom_series  # noqa: F401

# the fixtures `cascade` (tiny, random weights) and `good` (an int16 LPS case) are in conftest.py


def run_batch(cascade, good, tmp_path: Path, write_hostile, dataset=None) -> tuple[dict, Path, Path]:
    """Put the good case and ``write_hostile(folder)`` (returns the hostile path) in one folder; segment it.

    ``dataset``: what to give the runner instead of ``find_images(folder)`` (e.g. paths it would not list).
    Checks that the good case is written with its geometry and that the output folder holds only finished files.
    """
    folder = tmp_path / "images"
    folder.mkdir()
    shutil.copy(good[0], folder / "good_0000.nii.gz")
    hostile = Path(write_hostile(folder))
    out = tmp_path / "out"
    items = find_images(folder) if dataset is None else dataset(folder, hostile)
    report = CascadeRunner(cascade, items, out, progress=False).run()
    statuses = {case["case"]: case["status"] for case in report["cases"]}
    assert statuses["good"] == "done", report
    assert_same_geometry(out / "good.nii.gz", folder / "good_0000.nii.gz")
    done = {f"{case['case']}.nii.gz" for case in report["cases"] if case["status"] == "done"}
    assert {p.name for p in out.iterdir()} == done | {"efficiency.json", "efficiency.csv"}, "partial or stray files"
    return report, out, hostile


def case_of(report: dict, name: str) -> dict:
    return next(case for case in report["cases"] if case["case"] == name)


def assert_failed(report: dict, out: Path, hostile: Path, name: str, problem: str) -> None:
    case = case_of(report, name)
    assert case["status"] == "failed", case
    assert str(hostile) in case["error"] and problem in case["error"], case["error"]
    assert not (out / f"{name}.nii.gz").exists()


def assert_sane(report: dict, out: Path, hostile: Path, name: str, warning: str | None = None) -> np.ndarray:
    case = case_of(report, name)
    assert case["status"] == "done", case
    assert_same_geometry(out / f"{name}.nii.gz", hostile)
    labels = np.asarray(nib.load(str(out / f"{name}.nii.gz")).dataobj)
    assert labels.min() >= 0 and labels.max() < NUM_CLASSES
    if warning is None:  # nothing said about the input (a stage may still say it found none of its organs)
        assert not any(str(hostile) in w for w in case.get("warnings", [])), case["warnings"]
    else:
        assert any(warning in w and str(hostile) in w for w in case.get("warnings", [])), case
    return labels


def good_labels(cascade, good, tmp_path) -> np.ndarray:
    report = CascadeRunner(cascade, [str(good[0])], tmp_path / "reference", progress=False).run()
    assert report["num_done"] == 1
    return np.asarray(nib.load(str(tmp_path / "reference" / "good.nii.gz")).dataobj)


# -- files that cannot be read -------------------------------------------------------------------------------------


def _truncated(fraction: float, suffix: str = ".nii.gz"):
    """Writes ``bad_0000<suffix>``: the good case cut to ``fraction`` of its bytes (``1.0``: to 100 bytes)."""

    def write(folder: Path) -> Path:
        source = folder / "good_0000.nii.gz"
        if suffix == ".nii":
            raw = nib.load(str(source))
            full = folder / "tmp_full.nii"
            nib.save(raw, str(full))
            data = full.read_bytes()
            full.unlink()
        else:
            data = source.read_bytes()
        path = folder / f"bad_0000{suffix}"
        path.write_bytes(data[: int(len(data) * fraction)] if fraction < 1 else data[:100])
        return path

    return write


def _huge_claim(folder: Path) -> Path:
    """A small .nii.gz whose header claims 1000^3 int16 voxels (2 GB): refused from the header, nothing allocated."""
    image = nib.Nifti1Image(np.zeros((10, 10, 10), np.int16), np.eye(4))
    header = image.header.copy()
    header.set_data_shape((1000, 1000, 1000))
    padding = b"\0" * (int(header["vox_offset"]) - header.sizeof_hdr)
    raw = header.binaryblock + padding + np.zeros(1000, np.int16).tobytes()
    path = folder / "bad_0000.nii.gz"
    path.write_bytes(gzip.compress(raw))
    return path


def _empty_file(folder: Path) -> Path:
    (folder / "bad_0000.nii.gz").write_bytes(b"")
    return folder / "bad_0000.nii.gz"


def _zeros(shape, folder: Path) -> Path:
    return save(np.zeros(shape, np.int16), np.eye(4), folder / "bad_0000.nii.gz")


def _singular(path: Path) -> Path:
    """A header whose only affine (sform; no qform) maps every voxel to one point."""
    image = nib.Nifti1Image(np.zeros((16, 16, 8), np.int16), None)
    image.header.set_qform(None, code=0)
    image.header.set_sform(np.diag([1.0, 1.0, 0.0, 1.0]), code=1)
    nib.save(image, str(path))
    return path


@pytest.mark.parametrize(
    "write, problem",
    [
        (_truncated(0.6), "cannot read the image data"),
        (_truncated(1.0), "not a readable NIfTI"),  # cut to 100 bytes: not even a whole header
        (_truncated(0.5, ".nii"), "truncated image: its header claims"),
        (_huge_claim, "more than a"),
        (_empty_file, "not a readable NIfTI"),
        (lambda folder: _zeros((16, 16), folder), "must be a 3D volume"),
        (lambda folder: _zeros((16, 16, 8, 2), folder), "must be a 3D volume"),
        (lambda folder: _singular(folder / "bad_0000.nii.gz"), "singular"),
    ],
    ids=[
        "truncated_gz", "truncated_header", "truncated_nii", "huge_claim", "empty_file", "2d", "4d", "singular_affine"
    ],
)
def test_unreadable_file_fails_clearly_and_alone(cascade, good, tmp_path, write, problem):
    report, out, hostile = run_batch(cascade, good, tmp_path, write)
    assert_failed(report, out, hostile, "bad", problem)
    assert report["num_done"] == 1 and report["num_failed"] == 1


def _listed_by_hand(folder: Path, hostile: Path) -> list[str]:
    """A dataset given as paths (what find_images would not list): the hostile one first, then the good one."""
    return [str(hostile), str(folder / "good_0000.nii.gz")]


def test_path_that_does_not_exist(cascade, good, tmp_path):
    missing = tmp_path / "nowhere" / "ghost_0000.nii.gz"
    report, out, _ = run_batch(cascade, good, tmp_path, lambda folder: missing, dataset=_listed_by_hand)
    assert_failed(report, out, missing, "ghost", "does not exist")


def test_fifo_named_like_an_image_is_refused_without_hanging(cascade, good, tmp_path):
    """A named pipe would block a reader forever; it is refused by type (and find_images does not list it)."""

    def write(folder):
        os.mkfifo(folder / "pipe_0000.nii.gz")
        return folder / "pipe_0000.nii.gz"

    report, out, hostile = run_batch(cascade, good, tmp_path, write, dataset=_listed_by_hand)
    assert_failed(report, out, hostile, "pipe", "not a regular file")
    assert [Path(i["image"]).name for i in find_images(tmp_path / "images")] == ["good_0000.nii.gz"]


def test_label_map_passed_as_an_image(cascade, good, tmp_path):
    """A uint8 label map is refused (8 bits cannot hold HU); one stored as int16 is segmented with a warning."""
    labels = make_case(5, shape=(40, 36, 24), orientation="LPS")

    def write(folder):
        save(labels.label, labels.affine, folder / "label16_0000.nii.gz", np.int16)
        return save(labels.label, labels.affine, folder / "label8_0000.nii.gz", np.uint8)

    report, out, hostile = run_batch(cascade, good, tmp_path, write)
    assert_failed(report, out, hostile, "label8", "label map")
    assert_sane(report, out, hostile.parent / "label16_0000.nii.gz", "label16", "no voxel below -500 HU")


# -- odd but readable volumes: a sane output ---------------------------------------------------------------------


def test_nan_and_inf_voxels_are_replaced_with_a_warning(cascade, good, tmp_path):
    _, image, affine = good

    def write(folder):
        hu = image.astype(np.float32)
        nan, inf = hu.copy(), hu.copy()
        nan[:5] = np.nan  # e.g. the padding of a resampled volume
        inf[:, :3] = np.inf
        inf[:, -3:] = -np.inf
        save(inf, affine, folder / "inf_0000.nii.gz", np.float32)
        save(np.full(hu.shape, np.nan, np.float32), affine, folder / "allnan_0000.nii.gz", np.float32)
        return save(nan, affine, folder / "nan_0000.nii.gz", np.float32)

    report, out, hostile = run_batch(cascade, good, tmp_path, write)
    assert_sane(report, out, hostile, "nan", "NaN voxel(s) set to -1000 HU")
    assert_sane(report, out, hostile.parent / "inf_0000.nii.gz", "inf", "infinite voxel(s)")
    assert_failed(report, out, hostile.parent / "allnan_0000.nii.gz", "allnan", "no finite voxel")


def test_nan_as_air_gives_the_same_labels_as_air(cascade, good, tmp_path):
    """The documented replacement, checked end to end: NaN where the image holds -1000 HU changes nothing."""
    _, image, affine = good
    hu = image.astype(np.float32)
    hu[:4] = -1000.0
    nan = hu.copy()
    nan[:4] = np.nan

    def write(folder):
        save(hu, affine, folder / "air_0000.nii.gz", np.float32)
        return save(nan, affine, folder / "nan_0000.nii.gz", np.float32)

    report, out, hostile = run_batch(cascade, good, tmp_path, write)
    air = assert_sane(report, out, hostile.parent / "air_0000.nii.gz", "air")
    assert np.array_equal(assert_sane(report, out, hostile, "nan", "NaN"), air)


def test_constant_images(cascade, good, tmp_path):
    _, image, affine = good

    def write(folder):
        save(np.full(image.shape, -1000, np.int16), affine, folder / "air_0000.nii.gz", np.int16)
        return save(np.zeros(image.shape, np.int16), affine, folder / "zero_0000.nii.gz", np.int16)

    report, out, hostile = run_batch(cascade, good, tmp_path, write)
    assert_sane(report, out, hostile, "zero", "no voxel below -500 HU")
    assert_sane(report, out, hostile.parent / "air_0000.nii.gz", "air")


@pytest.mark.parametrize("slices", [3, 1])
def test_tiny_field_of_view(cascade, good, tmp_path, slices):
    """A slab of a few slices is not a CT volume: refused with its size (issue 20: it used to be segmented)."""
    _, image, affine = good
    start = image.shape[2] // 2
    thin = image[:, :, start : start + slices]
    report, out, hostile = run_batch(
        cascade, good, tmp_path, lambda folder: save(thin, affine, folder / "thin_0000.nii.gz", np.int16)
    )
    case = case_of(report, "thin")
    assert case["status"] == "failed" and "too small for a CT volume" in case["error"]
    assert f"{image.shape[0]}x{image.shape[1]}x{slices}" in case["error"] and str(hostile) in case["error"]


def test_extreme_hu_behave_like_the_window_ends(cascade, good, tmp_path):
    """+-1e6 HU (float32 and int32) where the image is outside [-100, 300]: the same labels as the good image."""
    _, image, affine = good
    extreme = np.where(image > 300, 1e6, np.where(image < -100, -1e6, image.astype(np.float64)))

    def write(folder):
        save(extreme.astype(np.float32), affine, folder / "extreme_float_0000.nii.gz", np.float32)
        return save(extreme, affine, folder / "extreme_int_0000.nii.gz", np.int32)

    report, out, hostile = run_batch(cascade, good, tmp_path, write)
    reference = good_labels(cascade, good, tmp_path)
    assert np.array_equal(assert_sane(report, out, hostile, "extreme_int"), reference)
    extreme_float = hostile.parent / "extreme_float_0000.nii.gz"
    assert np.array_equal(assert_sane(report, out, extreme_float, "extreme_float"), reference)


def test_4d_with_one_frame_is_3d(cascade, good, tmp_path):
    _, image, affine = good
    write = lambda folder: save(image[..., None], affine, folder / "frame_0000.nii.gz", np.int16)  # noqa: E731
    report, out, hostile = run_batch(cascade, good, tmp_path, write)
    assert_sane(report, out, hostile, "frame")
    assert np.array_equal(np.asarray(nib.load(str(out / "frame.nii.gz")).dataobj), good_labels(cascade, good, tmp_path))


# -- DICOM series that cannot be one volume ------------------------------------------------------------------------


def _series(folder: Path, name: str, good) -> Path:
    _, image, affine = good
    return write_dicom_series(nib.Nifti1Image(image[:, :, :8].astype(np.int16), affine), folder / name)


def _gap(folder, good):
    series = _series(folder, "gap", good)
    sorted(series.iterdir())[4].unlink()
    return series


def _two_series(folder, good):
    series = _series(folder, "mixed", good)
    other = _series(folder / "tmp", "other", good)
    for path in other.iterdir():
        path.rename(series / f"B{path.name}")
    shutil.rmtree(folder / "tmp")
    return series


def _duplicate_slice(folder, good):
    series = _series(folder, "dup", good)
    shutil.copy(sorted(series.iterdir())[3], series / "copy_of_slice")
    return series


def _corrupt_slice(keep: float):
    def write(folder, good):
        series = _series(folder, "corrupt", good)
        victim = sorted(series.iterdir())[2]
        data = victim.read_bytes()
        victim.write_bytes(data[: int(len(data) * keep)] if keep < 1 else data[:400])
        return series

    return write


@pytest.mark.parametrize(
    "write, name, problem",
    [
        (_gap, "gap", "slice spacing is not uniform"),
        (_two_series, "mixed", "holds 2 DICOM series"),
        (_duplicate_slice, "dup", "at the same position"),
        (_corrupt_slice(1.0), "corrupt", "IM00002: "),  # cut inside the header
        (_corrupt_slice(0.9), "corrupt", "IM00002: "),  # cut inside the pixel data
    ],
    ids=["missing_slice", "two_series", "duplicate_slice", "truncated_slice_header", "truncated_slice_pixels"],
)
def test_broken_dicom_series_fails_clearly_and_alone(cascade, good, tmp_path, write, name, problem):
    report, out, hostile = run_batch(cascade, good, tmp_path, lambda folder: write(folder, good))
    assert_failed(report, out, hostile, name, problem)


def test_good_dicom_series_beside_bad_files(cascade, good, tmp_path):
    """A DICOM series folder is listed and segmented; its output is named after the folder."""
    report, out, hostile = run_batch(cascade, good, tmp_path, lambda folder: _series(folder, "series_0000", good))
    case = case_of(report, "series_0000")  # a folder's name is kept whole, _0000 included
    assert case["status"] == "done"
    written = nib.load(str(out / "series_0000.nii.gz"))
    assert written.shape == (40, 36, 8) and written.get_data_dtype() == np.uint8
    assert np.allclose(written.affine, good[2], atol=1e-4)


def test_dataset_dir_that_is_itself_a_series(good, tmp_path):
    """``--dataset_dir`` pointing straight at a series folder: that series is the one image."""
    series = _series(tmp_path, "patient7", good)
    (series / "README.txt").write_text("not DICOM, ignored")
    assert find_images(series) == [{"image": str(series)}]


# -- batch and output folder ---------------------------------------------------------------------------------------


def test_two_inputs_with_one_output_name(cascade, good, tmp_path):
    """``good_0000.nii`` and ``good_0000.nii.gz`` would both write ``good.nii.gz``: the first one listed wins."""
    folder = tmp_path / "images"
    folder.mkdir()
    shutil.copy(good[0], folder / "good_0000.nii.gz")
    nib.save(nib.load(str(good[0])), str(folder / "good_0000.nii"))
    out = tmp_path / "out"
    report = CascadeRunner(cascade, find_images(folder), out, progress=False).run()
    assert [case["status"] for case in report["cases"]] == ["done", "failed"]
    assert str(folder / "good_0000.nii.gz") in report["cases"][1]["error"]
    assert "already" in report["cases"][1]["error"]
    assert_same_geometry(out / "good.nii.gz", folder / "good_0000.nii")
    assert sorted(p.name for p in out.iterdir()) == ["efficiency.csv", "efficiency.json", "good.nii.gz"]


@pytest.mark.parametrize("blocker", ["file_in_place", "under_a_file"])
def test_unwritable_output_folder_fails_before_any_case(cascade, good, tmp_path, blocker, monkeypatch):
    (tmp_path / "blocker").write_text("a regular file")
    output = tmp_path / "blocker" if blocker == "file_in_place" else tmp_path / "blocker" / "out"
    monkeypatch.setattr(cascade, "segment", lambda path: pytest.fail("a case ran before the output was checked"))
    with pytest.raises(InputError, match="output folder cannot be created") as error:
        CascadeRunner(cascade, [str(good[0])], output, progress=False).run()
    assert str(output) in str(error.value)
    assert (tmp_path / "blocker").read_text() == "a regular file"


def test_find_images_policies(good, tmp_path, caplog):
    folder = tmp_path / "images"
    folder.mkdir()
    save(np.zeros((8, 8), np.int16), np.eye(4), folder / "flat_0000.nii.gz")
    with pytest.raises(InputError, match="must be a 3D volume"):  # nothing usable: an error at once
        find_images(folder)
    shutil.copy(good[0], folder / "good_0000.nii.gz")
    with caplog.at_level(logging.WARNING, "flare_c2f_extensions.inputs"):
        listed = [Path(item["image"]).name for item in find_images(folder)]
    assert listed == ["flat_0000.nii.gz", "good_0000.nii.gz"]  # the bad one fails later, on its own
    assert any("flat_0000.nii.gz" in record.getMessage() for record in caplog.records)
    with pytest.raises(InputError, match="flat_0000.nii.gz"):
        find_images(folder, strict=True)
    with pytest.raises(InputError, match="does not exist"):
        find_images(tmp_path / "nowhere")


# -- the same through the command line -----------------------------------------------------------------------------


def test_cli_batch_with_hostile_cases(good, tmp_path):
    """The bundle's command on a folder of good, DICOM and hostile inputs: the bad ones fail alone, the rest is
    written, efficiency.json says which failed and why, and the command ends with the failed-cases exit status
    (issue 14: it was 0, which told a script that all went well)."""
    _, image, affine = good
    folder = tmp_path / "imagesTs"
    folder.mkdir()
    shutil.copy(good[0], folder / "good_0000.nii.gz")
    _series(folder, "dicom", good)
    _truncated(0.6)(folder)  # bad_0000.nii.gz
    save(np.zeros((16, 16), np.int16), np.eye(4), folder / "flat_0000.nii.gz")
    nan = image.astype(np.float32)
    nan[:3] = np.nan
    save(nan, affine, folder / "nan_0000.nii.gz", np.float32)
    save(image[:, :, :3], affine, folder / "thin_0000.nii.gz", np.int16)
    save((image > 0).astype(np.uint8), affine, folder / "label_0000.nii.gz", np.uint8)
    out = tmp_path / "out"
    result = run_cascade_cli(tmp_path, out)
    assert result.returncode == FAILED_CASES_EXIT_STATUS, result.stderr[-3000:]
    report = json.loads((out / "efficiency.json").read_text())
    statuses = {case["case"]: case["status"] for case in report["cases"]}
    assert statuses == {
        "bad": "failed", "dicom": "done", "flat": "failed", "good": "done", "label": "failed", "nan": "done",
        "thin": "failed",
    }
    for case in report["cases"]:
        if case["status"] == "failed":
            assert str(folder / f"{case['case']}_0000.nii.gz") in case["error"]
    for name in ("good", "nan"):
        assert_same_geometry(out / f"{name}.nii.gz", folder / f"{name}_0000.nii.gz")
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["dicom.nii.gz", "good.nii.gz", "nan.nii.gz", "efficiency.csv", "efficiency.json"]
    )


def test_cli_unwritable_output_is_one_clear_error(good, tmp_path):
    folder = tmp_path / "imagesTs"
    folder.mkdir()
    shutil.copy(good[0], folder / "good_0000.nii.gz")
    (tmp_path / "blocker").write_text("a regular file")
    output = tmp_path / "blocker" / "out"
    result = run_cascade_cli(tmp_path, output)
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, result.stderr
    assert str(output) in errors[0] and "output folder cannot be created" in errors[0]
    assert "Traceback" not in result.stderr
