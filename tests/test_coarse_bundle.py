"""The coarse bundle the MONAI way: metadata and network checks, a ConfigWorkflow train / evaluate / infer run."""

from __future__ import annotations

import json
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest
from monai.bundle import verify_metadata, verify_net_in_out

from helpers import BUNDLES, TINY, TINY_TRAIN, bundle_workflow

BUNDLE = "flare22_coarse"
CONFIGS = BUNDLES / BUNDLE / "configs"


def test_metadata_matches_schema(schema):
    verify_metadata(meta_file=str(CONFIGS / "metadata.json"), filepath=schema)


def test_network_matches_metadata_at_paper_size():
    verify_net_in_out(
        net_id="network_def",
        meta_file=str(CONFIGS / "metadata.json"),
        config_file=str(CONFIGS / "inference.json"),
        device="cpu",
        n=1,
    )


@pytest.fixture(scope="module")
def trained(cohort, tmp_path_factory):
    """Two training iterations of a tiny coarse network; returns the bundle root holding models/model.pt."""
    root = tmp_path_factory.mktemp("coarse")
    workflow = bundle_workflow(BUNDLE, "train.json", "train", root, dataset_dir=str(cohort), **TINY_TRAIN)
    workflow.initialize()
    assert not workflow.check_properties()
    workflow.run()
    workflow.finalize()
    return root


def test_train_writes_checkpoint(trained):
    assert (trained / "models" / "model.pt").is_file()


def test_evaluate_overlay_runs_on_checkpoint(trained, cohort):
    configs = ["train.json", "evaluate.json"]
    workflow = bundle_workflow(BUNDLE, configs, "eval", trained, dataset_dir=str(cohort), **TINY_TRAIN)
    workflow.initialize()
    assert not workflow.check_properties()
    workflow.run()
    workflow.finalize()
    predictions = sorted((trained / "eval" / "predictions").glob("*.nii.gz"))
    assert [p.name for p in predictions] == ["FLARE22_Tr_0004.nii.gz"]  # the validation case
    summary = json.loads((trained / "eval" / "summary.json").read_text())
    assert summary["num_cases"] == 1 and 0.0 <= summary["mean_DSC"] <= 1.0
    assert (trained / "eval" / "metrics.csv").is_file()


def test_inference_keeps_shape_and_affine_for_ras_and_lps(trained, cohort, tmp_path):
    images = sorted((cohort / "imagesTr").glob("*.nii.gz"))
    codes = {nib.aff2axcodes(nib.load(str(p)).affine) for p in images}
    assert {("R", "A", "S"), ("L", "P", "S")} <= codes
    workflow = bundle_workflow(
        BUNDLE, "inference.json", "infer", trained, dataset_dir=str(cohort), image_subdir="imagesTr",
        output_dir=str(tmp_path), **TINY,
    )
    workflow.initialize()
    assert not workflow.check_properties()
    workflow.run()
    workflow.finalize()
    for image in images:
        case = image.name.replace("_0000.nii.gz", ".nii.gz")
        written, source = nib.load(str(tmp_path / case)), nib.load(str(image))
        assert written.shape == source.shape
        assert np.array_equal(written.affine, source.affine)
        assert written.get_data_dtype() == np.uint8
        assert set(np.unique(np.asarray(written.dataobj))) <= set(range(14))


def _run_inference_cli(dataset_dir, tmp_path):
    """The user's command line; returns (exit status, stderr)."""
    command = [
        sys.executable, "-m", "monai.bundle", "run",
        "--config_file", str(CONFIGS / "inference.json"),
        "--logging_file", str(CONFIGS / "logging.conf"),
        "--bundle_root", str(tmp_path), "--dataset_dir", str(dataset_dir), "--device", "cpu",
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    return result.returncode, result.stderr


def _bad_inputs(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    flat = tmp_path / "flat"
    flat.mkdir()
    nib.save(nib.Nifti1Image(np.zeros((8, 8), np.int16), np.eye(4)), str(flat / "case_0000.nii.gz"))
    four_d = tmp_path / "four_d"
    four_d.mkdir()
    nib.save(nib.Nifti1Image(np.zeros((8, 8, 8, 2), np.int16), np.eye(4)), str(four_d / "case_0000.nii.gz"))
    not_nifti = tmp_path / "not_nifti"
    not_nifti.mkdir()
    (not_nifti / "case_0000.nii.gz").write_text("this is not an image")
    return {
        "missing": (tmp_path / "nowhere", "does not exist"),
        "empty": (empty, "no NIfTI images"),
        "2d": (flat, "must be a 3D volume"),
        "4d": (four_d, "must be a 3D volume"),
        "not_nifti": (not_nifti, "not a readable NIfTI"),
    }


@pytest.mark.parametrize("case", ["missing", "empty", "2d", "4d", "not_nifti"])
def test_bad_input_is_a_clear_error(case, tmp_path):
    folder, problem = _bad_inputs(tmp_path)[case]
    status, stderr = _run_inference_cli(folder, tmp_path / "run")
    assert status != 0
    last = stderr.strip().splitlines()
    message = next(line for line in last if line.startswith("error: "))
    assert problem in message and str(folder) in message
    assert "Traceback" not in stderr
    assert not (tmp_path / "run" / "eval").exists()
