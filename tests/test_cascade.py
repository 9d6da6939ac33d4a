"""The cascade bundle: one process, every stage, batches that survive, atomic outputs, efficiency report."""

from __future__ import annotations

import json
import shutil

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.bundle import verify_metadata, verify_net_in_out

from flare_c2f_extensions.cascade.pipeline import Cascade
from flare_c2f_extensions.errors import InputError
from flare_c2f_extensions.io.discovery import find_images
from flare_c2f_extensions.io.images import read_ct
from flare_c2f_extensions.labels import NUM_CLASSES
from flare_c2f_extensions.runs.cascade_run import CascadeRunner
from flare_c2f_extensions.transforms.crop import ResizeToGridd

from helpers import BUNDLES, TINY_CHANNELS, TINY_STAGES, bundle_workflow

BUNDLE = "flare22_cascade"
CONFIGS = BUNDLES / BUNDLE / "configs"


@pytest.fixture(scope="module")
def random_cascade():
    """Every stage with random weights (speed and plumbing do not depend on them)."""
    torch.manual_seed(0)
    return Cascade.from_bundles(BUNDLES, device="cpu", stage_overrides=TINY_STAGES, require_weights=False)


def test_metadata_matches_schema(schema):
    verify_metadata(meta_file=str(CONFIGS / "metadata.json"), filepath=schema)


def test_entry_network_matches_metadata():
    verify_net_in_out(
        net_id="network_def", meta_file=str(CONFIGS / "metadata.json"), config_file=str(CONFIGS / "inference.json"),
        device="cpu", n=1, **{"network_def#channels": TINY_CHANNELS},
    )


def test_every_stage_is_loaded_once(random_cascade):
    assert [s.name for s in random_cascade.groups] == ["solid", "digestive", "vessels"]
    assert [s.labels for s in random_cascade.refiners] == [(7,), (8,), (9,), (10,)]
    assert random_cascade.locator.cropper.box_labels is None  # the abdomen ROI: all coarse foreground


def test_missing_weights_is_a_clear_error(tmp_path):
    with pytest.raises(InputError, match="no weights for the coarse stage"):
        Cascade.from_bundles(BUNDLES, device="cpu", stage_overrides={"coarse": {"bundle_root": str(tmp_path)}})


def test_cascade_input_equals_the_coarse_bundles_preprocessing(cohort):
    """The cascade reads and resizes in torch; the coarse bundle trains on MONAI transforms: same numbers."""
    from monai.bundle import ConfigParser

    image = sorted((cohort / "imagesTr").glob("*.nii.gz"))[1]  # an LPS case
    parser = ConfigParser()
    parser.read_config(str(BUNDLES / "flare22_coarse" / "configs" / "inference.json"))
    parser["spatial_size"] = [32, 32, 32]
    bundle_input = parser.get_parsed_content("preprocessing")({"image": str(image)})["image"]
    ct, _ = read_ct(image)
    cascade_input = ResizeToGridd("image", 32)({"image": ct})["image"]
    assert torch.allclose(bundle_input.as_tensor(), cascade_input.as_tensor(), atol=1e-5)
    assert np.allclose(bundle_input.affine, cascade_input.affine, atol=1e-5)


def test_output_has_the_inputs_geometry_and_only_flare_ids(random_cascade, cohort, tmp_path):
    images = sorted((cohort / "imagesTr").glob("*.nii.gz"))[:2]  # RAS and LPS
    report = CascadeRunner(random_cascade, [str(p) for p in images], tmp_path, progress=False).run()
    assert report["num_done"] == 2 and report["num_failed"] == 0
    for image in images:
        written = nib.load(str(tmp_path / image.name.replace("_0000", "")))
        source = nib.load(str(image))
        assert written.shape == source.shape
        assert np.array_equal(written.affine, source.affine)
        assert written.get_data_dtype() == np.uint8
        assert set(np.unique(np.asarray(written.dataobj))) <= set(range(NUM_CLASSES))
    case = report["cases"][0]
    assert {"coarse", "solid", "digestive", "vessels", "locator", "postprocess"} <= set(case["stage_seconds"])
    assert case["peak_rss_mb"] > 0 and case["seconds"] > 0
    assert (tmp_path / "efficiency.csv").is_file() and json.loads((tmp_path / "efficiency.json").read_text())


def test_largest_component_per_organ(random_cascade, cohort, tmp_path):
    import cc3d

    image = sorted((cohort / "imagesTs").glob("*.nii.gz"))[0]
    labels = random_cascade.segment(image).labels
    for organ in np.unique(labels)[1:]:
        assert cc3d.connected_components(labels == organ, connectivity=26).max() == 1


def test_a_bad_case_is_reported_and_the_others_finish(random_cascade, cohort, tmp_path):
    batch = tmp_path / "batch"
    batch.mkdir()
    good = sorted((cohort / "imagesTs").glob("*.nii.gz"))
    for image in good:
        shutil.copy(image, batch / image.name)
    raw = (batch / good[0].name).read_bytes()
    (batch / "FLARE22_Ts_0000_0000.nii.gz").write_bytes(raw[: len(raw) // 2])  # truncated: sorts first
    out = tmp_path / "out"
    report = CascadeRunner(random_cascade, find_images(batch), out, progress=False).run()
    statuses = {case["case"]: case["status"] for case in report["cases"]}
    assert statuses == {"FLARE22_Ts_0000": "failed", "FLARE22_Ts_0001": "done", "FLARE22_Ts_0002": "done"}
    failed = next(case for case in report["cases"] if case["status"] == "failed")
    assert "FLARE22_Ts_0000_0000.nii.gz" in failed["error"]
    assert sorted(p.name for p in out.glob("*.nii.gz")) == ["FLARE22_Ts_0001.nii.gz", "FLARE22_Ts_0002.nii.gz"]


def test_rerun_skips_finished_cases_unless_told(random_cascade, cohort, tmp_path):
    images = sorted(str(p) for p in (cohort / "imagesTs").glob("*.nii.gz"))
    CascadeRunner(random_cascade, images, tmp_path, progress=False).run()
    again = CascadeRunner(random_cascade, images, tmp_path, progress=False).run()
    assert again["num_existing"] == 2 and again["num_done"] == 0
    forced = CascadeRunner(random_cascade, images, tmp_path, overwrite=True, progress=False).run()
    assert forced["num_done"] == 2


def test_interrupted_write_leaves_no_partial_output(random_cascade, cohort, tmp_path, monkeypatch):
    """Ctrl-C in the middle of writing: the case's output does not exist, nor any temporary file."""
    image = sorted((cohort / "imagesTs").glob("*.nii.gz"))[0]
    real_save = nib.save

    def save_then_interrupt(img, filename):
        real_save(img, filename)
        with open(filename, "r+b") as handle:  # a half-written file at the temporary name
            handle.truncate(100)
        raise KeyboardInterrupt

    monkeypatch.setattr(nib, "save", save_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        CascadeRunner(random_cascade, [str(image)], tmp_path, progress=False).run()
    assert list(tmp_path.iterdir()) == []


def test_bundle_runs_the_monai_way(cohort, tmp_path):
    """inference.json through ConfigWorkflow, then the evaluate overlay scores the held-out cases."""
    workflow = bundle_workflow(
        BUNDLE, ["inference.json", "evaluate.json"], "infer", BUNDLES / BUNDLE, dataset_dir=str(cohort),
        output_dir=str(tmp_path), device="cpu", require_weights=False, progress=False, stage_overrides=TINY_STAGES,
    )
    workflow.initialize()
    assert not workflow.check_properties()
    workflow.run()
    workflow.finalize()
    written = sorted(p.name for p in tmp_path.glob("FLARE22_Ts_*.nii.gz"))
    assert written == ["FLARE22_Ts_0001.nii.gz", "FLARE22_Ts_0002.nii.gz"]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["num_cases"] == 2 and len(summary["organs"]) == 13


def test_fusion_higher_probability_wins_and_background_never_erases():
    from flare_c2f_extensions.cascade.pipeline import _fuse

    labels = torch.zeros(8, 8, 8, dtype=torch.uint8)
    confidence = torch.zeros(8, 8, 8)
    first = torch.zeros(2, 4, 4, 4)
    first[1], first[0] = 0.7, 0.3  # organ 5 everywhere in its box with p 0.7
    _fuse(first, ((0, 0, 0), (4, 4, 4)), (5,), labels, confidence)
    second = torch.zeros(3, 4, 4, 4)
    second[0] = 1.0
    second[:, :2] = torch.tensor([0.1, 0.9, 0.0])[:, None, None, None]  # organ 11 with p 0.9 on half its box
    second[:, 2:3] = torch.tensor([0.4, 0.0, 0.6])[:, None, None, None]  # organ 12 with p 0.6, beyond the first box
    _fuse(second, ((2, 0, 0), (6, 4, 4)), (11, 12), labels, confidence)
    assert (labels[0:2, :4, :4] == 5).all()  # only the first stage there
    assert (labels[2:4, :4, :4] == 11).all()  # 0.9 beats 0.7
    assert (labels[4, :4, :4] == 12).all()  # 0.6 where nothing else claimed
    assert (labels[5, :4, :4] == 0).all()  # the second stage's background claims nothing
    assert torch.allclose(confidence[2:4, :4, :4], torch.tensor(0.9))


def test_boolean_options_from_a_command_line_are_parsed(tmp_path):
    """``monai.bundle run ... --require_weights false`` gives the string "false" (truthy): parsed, in any case."""
    no_weights = {**TINY_STAGES, "coarse": {**TINY_STAGES["coarse"], "bundle_root": str(tmp_path)}}
    cascade = Cascade.from_bundles(BUNDLES, device="cpu", stage_overrides=no_weights, require_weights="FALSE",
                                   amp="false")
    assert cascade.coarse.checkpoint is None and cascade.amp is False
    with pytest.raises(InputError, match="no weights for the coarse stage"):
        Cascade.from_bundles(BUNDLES, device="cpu", stage_overrides=no_weights, require_weights="True")
    with pytest.raises(InputError, match="expected true or false"):
        Cascade.from_bundles(BUNDLES, device="cpu", stage_overrides=no_weights, require_weights="maybe")
