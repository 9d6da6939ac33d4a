"""Issue 14: nothing lost, nothing silent. One test (or a few) for each numbered point of the issue except the
memory bound (point 5): outputs never overwrite inputs, the exit status, ``evaluate``'s fault isolation and
reorientation, every input folder entry accounted for, bad weights, finished outputs that are really finished,
compressed DICOM, qform/sform of sheared outputs, release zip bombs and case collisions, and the small items.

Tiny random-weight stages as in ``test_invariance.py``.
"""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from conftest import BUNDLES
from flare_c2f_extensions.cascade import FAILED_CASES_EXIT_STATUS, CascadeRunner, load_stage
from flare_c2f_extensions.data import InputError, find_images
from flare_c2f_extensions.phantom import make_case
from test_hostile_input import _cli
from test_invariance import TINY_STAGES, assert_same_geometry, no_hang, save, tiny_cascade  # noqa: F401

# -- 6. bad weights --------------------------------------------------------------------------------------------


def _coarse(weights: Path, channels=(4, 8, 8, 8, 8)):
    overrides = {**TINY_STAGES["coarse"], "network_def": {"channels": list(channels)}}
    return load_stage("coarse", BUNDLES / "flare22_coarse", "cpu", overrides, weights=weights)


def _state(channels) -> dict:
    torch.manual_seed(0)
    overrides = {**TINY_STAGES["coarse"], "network_def": {"channels": list(channels)}}
    stage = load_stage("coarse", BUNDLES / "flare22_coarse", "cpu", overrides, weights="/nowhere.pt", require_weights=False)
    return stage.network.state_dict()


class _NotATensor:  # a pickled object: weights_only=True must refuse it
    pass


@pytest.mark.parametrize(
    "write, problem",
    [
        (lambda p: torch.save({"model": _state((4, 8, 8, 8, 16))}, p), "does not fit the stage's network"),
        (lambda p: p.write_text("version https://git-lfs.github.com/spec/v1\noid sha256:ab\nsize 60000000\n"), "Git LFS"),
        (lambda p: p.write_bytes(b""), "empty"),
        (lambda p: (torch.save({"model": _state((4, 8, 8, 8, 8))}, p), p.write_bytes(p.read_bytes()[:3000])), "truncated"),
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


@pytest.fixture(scope="module")
def cascade():
    return tiny_cascade()


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    case = make_case(5, shape=(40, 36, 24), orientation="LPS")
    path = save(case.image, case.affine, tmp_path_factory.mktemp("good") / "good_0000.nii.gz", np.int16)
    return path, case.image, case.affine


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
    failed = _cli(tmp_path, tmp_path / "out")
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
        result = _cli(tmp_path, tmp_path / "out2")
        assert result.returncode == 0, result.stderr[-2000:]
        report = json.loads((tmp_path / "out2" / "efficiency.json").read_text())
        assert [case["status"] for case in report["cases"]] == [status]
