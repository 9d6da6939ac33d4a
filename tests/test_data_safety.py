"""Issue 14: nothing lost, nothing silent. One test (or a few) for each numbered point of the issue except the
memory bound (point 5): outputs never overwrite inputs, the exit status, ``evaluate``'s fault isolation and
reorientation, every input folder entry accounted for, bad weights, finished outputs that are really finished,
compressed DICOM, qform/sform of sheared outputs, release zip bombs and case collisions, and the small items.

Tiny random-weight stages as in ``test_invariance.py``.
"""

from __future__ import annotations

import csv
import errno
import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

import flare_c2f_extensions.runs.cascade_run as cascade_run
from flare_c2f_extensions.cascade.stages import load_stage
from flare_c2f_extensions.errors import FAILED_CASES_EXIT_STATUS, InputError
from flare_c2f_extensions.io.discovery import find_images
from flare_c2f_extensions.io.images import image_geometry, read_ct
from flare_c2f_extensions.io.label_maps import qform_holds, save_label_map
from flare_c2f_extensions.runs.cascade_run import CascadeRunner
from flare_c2f_extensions.synthetic.phantom import make_case

from helpers import (  # noqa: F401
    BUNDLES,
    REPO,
    TINY_STAGES,
    assert_same_geometry,
    no_hang,
    run_cascade_cli,
    save,
    tiny_cascade,
    write_dicom_series,
)

LFS = "version https://git-lfs.github.com/spec/v1"
TINY_CHANNELS = (4, 8, 8, 8, 8)

# -- 6. bad weights --------------------------------------------------------------------------------------------


def _coarse(weights: Path, channels=(4, 8, 8, 8, 8)):
    overrides = {**TINY_STAGES["coarse"], "network_def": {"channels": list(channels)}}
    return load_stage("coarse", BUNDLES / "flare22_coarse", "cpu", overrides, weights=weights)


def _state(channels) -> dict:
    torch.manual_seed(0)
    overrides = {**TINY_STAGES["coarse"], "network_def": {"channels": list(channels)}}
    bundle = BUNDLES / "flare22_coarse"
    stage = load_stage("coarse", bundle, "cpu", overrides, weights="/nowhere.pt", require_weights=False)
    return stage.network.state_dict()


def _cut(path: Path, size: int) -> None:
    path.write_bytes(path.read_bytes()[:size])


class _NotATensor:  # a pickled object: weights_only=True must refuse it
    pass


@pytest.mark.parametrize(
    "write, problem",
    [
        (lambda p: torch.save({"model": _state((4, 8, 8, 8, 16))}, p), "does not fit the stage's network"),
        (lambda p: p.write_text(f"{LFS}\noid sha256:ab\nsize 60000000\n"), "Git LFS"),
        (lambda p: p.write_bytes(b""), "empty"),
        (lambda p: (torch.save({"model": _state(TINY_CHANNELS)}, p), _cut(p, 3000)), "truncated"),
        (lambda p: p.write_bytes(pickle.dumps({"model": _NotATensor()})), "more than tensors"),
        (lambda p: p.write_bytes(b"\x89HDF\r\n\x1a\n" + bytes(400)), "not a PyTorch checkpoint"),
        (lambda p: torch.save({"model": [1, 2, 3]}, p), "not a state dict"),
    ],
    ids=["wrong_shape", "lfs_pointer", "empty", "truncated", "pickled_object", "foreign_format", "not_a_state_dict"],
)
def test_bad_checkpoint_is_one_line_naming_stage_file_and_problem(tmp_path, write, problem):
    checkpoint = tmp_path / "model.pt"
    write(checkpoint)
    with pytest.raises(InputError) as error:
        _coarse(checkpoint)
    message = str(error.value)
    assert "\n" not in message and str(checkpoint) in message and "coarse stage" in message, message
    assert problem in message, message
    assert "weights_only=False" not in message


def test_good_checkpoint_loads_with_weights_only(tmp_path):
    state = _state((4, 8, 8, 8, 8))
    torch.save({"model": state}, tmp_path / "model.pt")
    stage = _coarse(tmp_path / "model.pt")
    assert all(torch.equal(stage.network.state_dict()[k], v) for k, v in state.items())
    torch.save(state, tmp_path / "bare.pt")  # a bare state dict loads too
    assert torch.equal(next(iter(_coarse(tmp_path / "bare.pt").network.parameters())), next(iter(state.values())))


# -- shared: a tiny cascade and a good case ---------------------------------------------------------------------


# the fixtures `cascade` (tiny, random weights) and `good` (an int16 LPS case) are in conftest.py


def _never(path):
    pytest.fail("a case ran before the output folder was checked")


# -- 1. outputs never overwrite inputs -------------------------------------------------------------------------


def test_output_that_is_an_input_is_refused_before_any_case(cascade, good, tmp_path, monkeypatch):
    folder = tmp_path / "images"
    folder.mkdir()
    shutil.copy(good[0], folder / "good.nii.gz")  # no _0000: its output path is the input itself
    before = (folder / "good.nii.gz").read_bytes()
    monkeypatch.setattr(cascade, "segment", _never)
    with pytest.raises(InputError, match="would overwrite the input") as error:
        CascadeRunner(cascade, find_images(folder), folder, overwrite=True, progress=False).run()
    assert "\n" not in str(error.value) and str(folder / "good.nii.gz") in str(error.value)
    link = tmp_path / "out"  # an output path that is a link to an input: refused too
    link.mkdir()
    (link / "good.nii.gz").symlink_to(folder / "good.nii.gz")
    with pytest.raises(InputError, match="would overwrite the input"):
        CascadeRunner(cascade, find_images(folder), link, overwrite=True, progress=False).run()
    assert (folder / "good.nii.gz").read_bytes() == before


def test_output_folder_that_holds_the_inputs_is_refused(cascade, good, tmp_path, monkeypatch):
    """FLARE names in the output's own folder: the label maps would be taken for images on the next run."""
    folder = tmp_path / "images"
    folder.mkdir()
    shutil.copy(good[0], folder / "good_0000.nii.gz")
    monkeypatch.setattr(cascade, "segment", _never)
    with pytest.raises(InputError, match="holds the input"):
        CascadeRunner(cascade, find_images(folder), folder, progress=False).run()
    assert sorted(p.name for p in folder.iterdir()) == ["good_0000.nii.gz"]


def test_output_folder_nested_in_the_input_folder_is_not_an_input(cascade, good, tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    shutil.copy(good[0], folder / "good_0000.nii.gz")
    out = folder / "labels"
    for _ in range(2):  # the second run sees the first run's outputs in the input folder and skips them
        found = find_images(folder, exclude=out)
        assert [Path(item["image"]).name for item in found] == ["good_0000.nii.gz"]
        report = CascadeRunner(cascade, found, out, progress=False).run()
    assert [case["status"] for case in report["cases"]] == ["exists"]
    assert {"path": str(out), "reason": "the output folder"} in report["ignored_inputs"]


# -- 2. exit status ---------------------------------------------------------------------------------------------


def test_bundle_exit_status_and_failed_cases_listed(good, tmp_path):
    _, image, affine = good
    folder = tmp_path / "imagesTs"
    folder.mkdir()
    for name in ("nan1", "nan2"):  # every case fails
        save(np.full(image.shape, np.nan, np.float32), affine, folder / f"{name}_0000.nii.gz", np.float32)
    failed = run_cascade_cli(tmp_path, tmp_path / "out")
    assert failed.returncode == FAILED_CASES_EXIT_STATUS, failed.stderr[-2000:]
    report = json.loads((tmp_path / "out" / "efficiency.json").read_text())  # written before the exit
    assert report["num_failed"] == 2 and report["num_done"] == 0
    assert "error: 2 of 2 case(s) failed" in failed.stderr
    for name in ("nan1", "nan2"):
        assert f"failed: {name}: {folder / name}_0000.nii.gz: no finite voxel" in failed.stderr
    assert "Traceback" not in failed.stderr

    for path in folder.iterdir():
        path.unlink()
    shutil.copy(good[0], folder / "good_0000.nii.gz")
    for status in ("done", "exists"):  # 0 when every case is done, or finished before
        result = run_cascade_cli(tmp_path, tmp_path / "out2")
        assert result.returncode == 0, result.stderr[-2000:]
        report = json.loads((tmp_path / "out2" / "efficiency.json").read_text())
        assert [case["status"] for case in report["cases"]] == [status]


# -- 4. every entry of an input folder is a case or ignored with its reason --------------------------------------


def _series(folder: Path, good, slices: int = 8) -> Path:
    _, image, affine = good
    return write_dicom_series(nib.Nifti1Image(image[:, :, :slices].astype(np.int16), affine), folder)


def test_every_input_entry_is_a_case_or_ignored_with_its_reason(cascade, good, tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    shutil.copy(good[0], folder / "UPPER_0000.NII.GZ")
    (folder / "gone_0000.nii.gz").symlink_to(tmp_path / "nowhere.nii.gz")
    (folder / "._UPPER_0000.NII.GZ").write_bytes(b"\0\5\x16\7" + bytes(100))  # macOS AppleDouble
    (folder / ".DS_Store").write_bytes(bytes(10))
    (folder / "notes.txt").write_text("not an image")
    (folder / "empty").mkdir()
    plain = _series(tmp_path / "plain", good)
    (folder / "nopreamble").mkdir()
    for path in plain.iterdir():  # DICOM files without the 128-byte preamble and "DICM"
        (folder / "nopreamble" / path.name).write_bytes(path.read_bytes()[132:])
    _series(folder / "patient1" / "study" / "ct", good)  # a series two folders deeper
    found = find_images(folder)
    assert [(Path(item["image"]).name, item.get("case")) for item in found] == [
        ("UPPER_0000.NII.GZ", None), ("nopreamble", None), ("ct", "patient1_study_ct")
    ]
    reasons = {Path(item["path"]).name: item["reason"] for item in found.ignored}
    assert set(reasons) == {"gone_0000.nii.gz", "._UPPER_0000.NII.GZ", ".DS_Store", "notes.txt", "empty"}
    assert "symbolic link" in reasons["gone_0000.nii.gz"] and "AppleDouble" in reasons["._UPPER_0000.NII.GZ"]
    assert "not a NIfTI" in reasons["notes.txt"] and "no DICOM series" in reasons["empty"]
    out = tmp_path / "out"
    report = CascadeRunner(cascade, found, out, progress=False).run()
    assert {case["case"]: case["status"] for case in report["cases"]} == {
        "UPPER": "done", "nopreamble": "done", "patient1_study_ct": "done"
    }
    assert len(report["ignored_inputs"]) == 5
    assert_same_geometry(out / "UPPER.nii.gz", folder / "UPPER_0000.NII.GZ")
    reference = nib.load(str(out / "nopreamble.nii.gz"))
    assert reference.shape == (40, 36, 8) and np.allclose(reference.affine, good[2], atol=1e-4)


# -- 7. a finished output is one that reads back as the case's label map ----------------------------------------


def test_rerun_redoes_outputs_that_are_not_finished(cascade, good, tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    for name in ("empty", "cut", "other", "fine"):
        shutil.copy(good[0], folder / f"{name}_0000.nii.gz")
    out = tmp_path / "out"
    CascadeRunner(cascade, find_images(folder), out, progress=False).run()
    finished = (out / "fine.nii.gz").read_bytes()
    (out / "empty.nii.gz").write_bytes(b"")
    (out / "cut.nii.gz").write_bytes((out / "cut.nii.gz").read_bytes()[:300])
    save(np.zeros((8, 8, 8), np.uint8), np.eye(4), out / "other.nii.gz", np.uint8)  # not this tool's
    kept = {name: (out / f"{name}.nii.gz").read_bytes() for name in ("cut", "other")}
    with pytest.raises(InputError, match="nothing was written; --overwrite replaces it"):  # issue 20: never replaced
        CascadeRunner(cascade, find_images(folder), out, progress=False).run()
    assert {name: (out / f"{name}.nii.gz").read_bytes() for name in kept} == kept
    (out / "other.nii.gz").unlink()
    (out / "cut.nii.gz").write_bytes(finished[: len(finished) // 2])  # this tool's map, damaged: its header reads
    report = CascadeRunner(cascade, find_images(folder), out, progress=False).run()
    cases = {case["case"]: case for case in report["cases"]}
    assert cases["fine"]["status"] == "exists" and (out / "fine.nii.gz").read_bytes() == finished
    assert cases["other"]["status"] == "done" and "redone" not in cases["other"]
    for name, why in (("empty", "empty"), ("cut", "cannot be read whole")):
        assert cases[name]["status"] == "done" and why in cases[name]["redone"], cases[name]
        assert_same_geometry(out / f"{name}.nii.gz", folder / f"{name}_0000.nii.gz")
    assert report["num_redone"] == 2


# -- 8. compressed DICOM --------------------------------------------------------------------------------------


def _jpeg_lossless(dataset) -> None:
    """JPEG Lossless (process 14, SV1) with libjpeg-turbo through imagecodecs: pydicom has no encoder for it."""
    import imagecodecs
    from pydicom.encaps import encapsulate
    from pydicom.uid import JPEGLosslessSV1

    raw = dataset.pixel_array.astype(np.int32) + 32768  # JPEG codes unsigned samples
    dataset.PixelRepresentation = 0
    dataset.RescaleIntercept = float(dataset.RescaleIntercept) - 32768 * float(dataset.RescaleSlope)
    frame = imagecodecs.jpeg8_encode(raw.astype(np.uint16), lossless=True, bitspersample=16)
    dataset.PixelData = encapsulate([frame])
    dataset["PixelData"].VR = "OB"
    dataset.file_meta.TransferSyntaxUID = JPEGLosslessSV1


@pytest.mark.parametrize("codec", ["RLELossless", "JPEGLSLossless", "JPEG2000Lossless", "JPEGLosslessSV1"])
def test_compressed_dicom_series_decode(good, tmp_path, codec):
    import pydicom
    from pydicom import uid
    from pydicom.pixels import get_decoder

    syntax = getattr(uid, codec)
    # the package's own dependencies decode it (pydicom for RLE, python-gdcm for the JPEG family)
    assert set(get_decoder(syntax).available_plugins) & {"pydicom", "gdcm"}
    plain = _series(tmp_path / "plain", good)
    packed = tmp_path / codec
    packed.mkdir()
    for path in sorted(plain.iterdir()):
        dataset = pydicom.dcmread(path)
        _jpeg_lossless(dataset) if codec == "JPEGLosslessSV1" else dataset.compress(syntax)
        dataset.save_as(packed / path.name, enforce_file_format=True)
    assert pydicom.dcmread(next(packed.iterdir())).file_meta.TransferSyntaxUID == syntax
    (expected, _), (decoded, _) = read_ct(plain), read_ct(packed)
    assert torch.equal(decoded, expected)


# -- 9. qform and sform ---------------------------------------------------------------------------------------


def test_sheared_output_has_qform_code_0_and_the_exact_sform(good, tmp_path):
    _, image, affine = good
    tilted = affine.copy()
    tilted[:3, 2] += 0.3 * affine[:3, 1]  # gantry tilt: slices shifted along y as z grows
    series = write_dicom_series(nib.Nifti1Image(image[:, :, :8].astype(np.int16), tilted), tmp_path / "tilted")
    geometry = image_geometry(series)
    assert not qform_holds(geometry.affine)
    header = nib.load(str(save_label_map(np.zeros(geometry.shape, np.uint8), series, tmp_path / "out"))).header
    assert int(header["qform_code"]) == 0 and int(header["sform_code"]) == 1
    assert np.allclose(header.get_sform(), geometry.affine, atol=1e-4)

    plain = nib.Nifti1Image(image.astype(np.int16), affine)  # qform code 0 in, sform code 2 (aligned)
    plain.set_qform(affine, code=0)
    plain.set_sform(affine, code=2)
    nib.save(plain, str(tmp_path / "aligned_0000.nii.gz"))
    written = nib.load(str(save_label_map(np.zeros(image.shape, np.uint8), tmp_path / "aligned_0000.nii.gz", tmp_path)))
    assert int(written.header["qform_code"]) == 0 and int(written.header["sform_code"]) == 2
    assert np.array_equal(written.affine, nib.load(str(tmp_path / "aligned_0000.nii.gz")).affine)

    normal = nib.load(str(save_label_map(np.zeros(image.shape, np.uint8), good[0], tmp_path)))  # codes 1 and 1
    assert int(normal.header["qform_code"]) == 1 and int(normal.header["sform_code"]) == 1
    assert np.allclose(normal.header.get_qform(), normal.header.get_sform(), atol=1e-4)


def test_label_map_image_rounds_floats_and_copies_integers(good):
    """Float maps are rounded; integer maps are taken as they are (no float pass over the volume), into an array of
    the image's own, so changing the caller's array afterwards changes nothing that is written."""
    _, image, _ = good
    from flare_c2f_extensions.io.label_maps import label_map_image

    soft = np.full(image.shape, 0.4, np.float32)
    soft[0, 0, 0] = 2.6
    rounded = np.asarray(label_map_image(soft, good[0]).dataobj)
    assert rounded.dtype == np.uint8 and rounded[0, 0, 0] == 3 and rounded.sum() == 3
    labels = np.zeros(image.shape, np.uint8)
    labels[1, 2, 3] = 13
    written = label_map_image(labels, good[0])
    labels[1, 2, 3] = 0
    data = np.asarray(written.dataobj)
    assert data.dtype == np.uint8 and data[1, 2, 3] == 13 and data.sum() == 13


# -- 11. the small items --------------------------------------------------------------------------------------


def test_small_items(cascade, good, tmp_path, monkeypatch):
    _, image, affine = good
    folder = tmp_path / "images"
    folder.mkdir()
    coded = np.clip(np.rint((image.astype(np.float64) + 1024) / 8), 0, 255).astype(np.uint8)
    save(coded, affine, folder / "scaled8_0000.nii.gz", np.uint8, slope_inter=(8.0, -1024.0))  # decodes to HU
    long_name = "L" * (248 - len("_0000.nii.gz"))
    shutil.copy(good[0], folder / f"{long_name}_0000.nii.gz")  # a 248-character input name
    rgb = np.zeros(image.shape, dtype=[("R", "u1"), ("G", "u1"), ("B", "u1")])
    nib.save(nib.Nifti1Image(rgb, affine), str(folder / "rgb_0000.nii.gz"))
    out = tmp_path / "out"
    report = CascadeRunner(cascade, find_images(folder), out, progress=False).run()
    cases = {case["case"]: case for case in report["cases"]}
    assert cases["scaled8"]["status"] == "done" and cases[long_name]["status"] == "done"
    assert cases["rgb"]["status"] == "failed" and "colour (RGB)" in cases["rgb"]["error"], cases["rgb"]
    assert str(folder / "rgb_0000.nii.gz") in cases["rgb"]["error"]
    assert_same_geometry(out / f"{long_name}.nii.gz", folder / f"{long_name}_0000.nii.gz")

    def full_disk(text, path):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(cascade_run, "write_text_atomic", full_disk)
    with pytest.raises(InputError, match="the report cannot be written \\(No space left on device\\)"):
        CascadeRunner(cascade, [str(good[0])], tmp_path / "full", progress=False).run()


# -- 3. evaluate --------------------------------------------------------------------------------------------------


def _label_map(path: Path, data: np.ndarray, affine: np.ndarray, dtype=np.uint8) -> Path:
    image = nib.Nifti1Image(np.asarray(data).astype(dtype), affine)
    image.set_qform(affine, 1)
    image.set_sform(affine, 1)
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(image, str(path))
    return path


def _evaluaterun_cascade_cli(*args) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "flare_c2f_extensions", "evaluate", *map(str, args)]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)


def test_evaluate_reorients_isolates_failures_and_reports_unknown_labels(tmp_path):
    case = make_case(3, shape=(40, 36, 24), orientation="LPS")
    gt, pred = tmp_path / "gt", tmp_path / "pred"
    for name in ("flipped", "permuted", "shifted", "fourd", "cut", "odd"):
        _label_map(gt / f"{name}.nii.gz", case.label, case.affine)
    # the same physical mask stored x-flipped, and with axes 0 and 1 swapped: both score 1
    flip = case.affine.copy()
    flip[:, 0] *= -1
    flip[:3, 3] = case.affine[:3, :3] @ [case.label.shape[0] - 1, 0, 0] + case.affine[:3, 3]
    _label_map(pred / "flipped.nii.gz", case.label[::-1], flip)
    _label_map(pred / "permuted.nii.gz", case.label.transpose(1, 0, 2), case.affine[:, [1, 0, 2, 3]])
    shifted = case.affine.copy()
    shifted[:3, 3] += 7.0  # another physical place, and a flipped layout: not the same grid
    shifted[:, 0] *= -1
    _label_map(pred / "shifted.nii.gz", case.label, shifted)
    _label_map(pred / "fourd.nii.gz", np.stack([case.label] * 2, -1), case.affine)
    _label_map(pred / "cut.nii.gz", case.label, case.affine)
    (pred / "cut.nii.gz").write_bytes((pred / "cut.nii.gz").read_bytes()[:400])
    odd = case.label.astype(np.int16)
    odd[odd == 1] = 77  # liver as an unknown label value
    _label_map(pred / "odd.nii.gz", odd, case.affine, np.int16)

    out = tmp_path / "out"
    result = _evaluaterun_cascade_cli("--pred", pred, "--gt", gt, "--out", out)
    assert result.returncode == FAILED_CASES_EXIT_STATUS, result.stderr[-2000:]
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["failed_cases"]) == {"shifted", "fourd", "cut"}
    assert "no flip or permutation" in summary["failed_cases"]["shifted"]
    assert "must be 3D" in summary["failed_cases"]["fourd"]
    assert str(pred / "cut.nii.gz") in summary["failed_cases"]["cut"]
    assert summary["unknown_labels"] == {"odd": {"unknown_pred_labels": [77]}}
    assert summary["num_cases"] == 3 and "Traceback" not in result.stderr
    with open(out / "metrics.csv", newline="") as handle:
        rows = {row["case"]: row for row in csv.DictReader(handle)}
    for name in ("flipped", "permuted"):
        assert all(float(v) == 1.0 for k, v in rows[name].items() if k.endswith(("_DSC", "_NSD"))), rows[name]
    assert float(rows["odd"]["liver_DSC"]) == 0.0 and float(rows["odd"]["spleen_DSC"]) == 1.0
    assert rows["cut"]["liver_DSC"] == "" and str(pred / "cut.nii.gz") in rows["cut"]["error"]


def test_evaluate_checks_folders_before_scoring(tmp_path, monkeypatch):
    from flare_c2f_extensions.evaluation import metrics

    case = make_case(3, shape=(16, 16, 8))
    _label_map(tmp_path / "gt" / "a.nii.gz", case.label, case.affine)
    _label_map(tmp_path / "pred" / "a.nii.gz", case.label, case.affine)
    (tmp_path / "blocker").write_text("a file")
    monkeypatch.setattr(metrics, "_score_case", lambda *a: pytest.fail("scored before the output was checked"))
    with pytest.raises(InputError, match="evaluation output folder cannot be created"):
        metrics.evaluate_folder(str(tmp_path / "pred"), str(tmp_path / "gt"), str(tmp_path / "blocker" / "out"))
    result = _evaluaterun_cascade_cli("--pred", tmp_path / "nopred", "--gt", tmp_path / "gt", "--out", tmp_path / "out")
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert result.returncode != 0 and len(errors) == 1 and "Traceback" not in result.stderr, result.stderr
    assert str(tmp_path / "nopred") in errors[0] and "prediction folder does not exist" in errors[0]
    assert not (tmp_path / "out").exists()


# -- 10. release zips: inflated size and names that collide when case is ignored --------------------------------


def _release_zip(path: Path, entries: dict[str, bytes]) -> tuple[Path, str]:
    import hashlib
    import zipfile

    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=9) as archive:
        archive.writestr("flare22_coarse/configs/metadata.json", json.dumps({"version": "0.1.0"}))
        for name, data in entries.items():
            archive.writestr(name, data)
    return path, hashlib.sha256(path.read_bytes()).hexdigest()


def test_verify_release_bounds_inflation_and_refuses_case_collisions(tmp_path):
    from flare_c2f_extensions.releases.bundles import MAX_INFLATE_RATIO, ReleaseError, download_release, verify_release

    zeros = {"flare22_coarse/models/model.pt": bytes(64 << 20)}
    bomb, digest = _release_zip(tmp_path / "flare22_coarse_v0.1.0.zip", zeros)
    assert bomb.stat().st_size * MAX_INFLATE_RATIO < 64 << 20
    with pytest.raises(ReleaseError, match="would inflate to 67108") as error:
        verify_release(bomb, digest)
    assert str(bomb) in str(error.value) and "zip bomb" in str(error.value)
    twins = {"flare22_coarse/docs/README.md": b"a", "flare22_coarse/docs/readme.md": b"b"}
    clash, digest = _release_zip(tmp_path / "clash" / "flare22_coarse_v0.1.0.zip", twins)
    with pytest.raises(ReleaseError, match="differ only in case"):
        verify_release(clash, digest)
    readme = {"flare22_coarse/docs/README.md": b"a" * 4000}
    fine, digest = _release_zip(tmp_path / "fine" / "flare22_coarse_v0.1.0.zip", readme)
    assert verify_release(fine, digest)["entries"] == 2  # 4000 bytes of "a" compress well, but the zip is small
    (tmp_path / "blocker").write_text("a regular file")
    with pytest.raises(ReleaseError, match="bundle folder cannot be created"):
        download_release("http://127.0.0.1:9/flare22_coarse_v0.1.0.zip", tmp_path / "blocker" / "bundles")
