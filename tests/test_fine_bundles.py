"""The three big-organ fine bundles (solid, digestive, vessels) the MONAI way.

The bundles share one set of configs that differ only in ``group``; each must pass the metadata and network
checks, train / evaluate / infer through ``ConfigWorkflow``, skip (and say so) where the coarse mask holds
none of its organs, jitter its training crop reproducibly, and stop with a clear error on a missing mask.
"""

from __future__ import annotations

import json
import logging
import shutil

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser, verify_metadata, verify_net_in_out
from monai.utils import set_determinism

from flare_c2f_extensions.errors import InputError, input_error_in
from flare_c2f_extensions.io.discovery import labelled_cases
from flare_c2f_extensions.labels import GROUPS, ORGANS, label_names

from helpers import BUNDLES, TINY, TINY_TRAIN, bundle_workflow

GROUP_OF_BUNDLE = {
    "flare22_fine_solid": "solid",
    "flare22_fine_digestive": "digestive",
    "flare22_fine_vessels": "vessels",
}
FINE = list(GROUP_OF_BUNDLE)
REFERENCE = "flare22_fine_solid"
JSON_CONFIGS = ["train.json", "inference.json", "evaluate.json", "multi_gpu_train.json"]
# metadata fields that legitimately differ between the groups
META_TEXT_FIELDS = ["name", "task", "description", "label_classes", "pred_classes", "changelog"]
PAPER_EPOCHS_FINE = 120


def _configs(bundle):
    return BUNDLES / bundle / "configs"


def _load(bundle, name):
    return json.loads((_configs(bundle) / name).read_text())


def _without_group(config):
    config = dict(config)
    config.pop("group", None)
    return config


def _case(path):
    return path.name.replace("_0000.nii.gz", ".nii.gz")


def _values(path):
    return set(np.unique(np.asarray(nib.load(str(path)).dataobj)).tolist())


# ---------------------------------------------------------------------------------------------------------------
# Static checks: one config set, metadata, network
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bundle", FINE)
def test_layout(bundle):
    root = BUNDLES / bundle
    for name in JSON_CONFIGS + ["metadata.json", "logging.conf"]:
        assert (root / "configs" / name).is_file(), f"{bundle}: configs/{name} missing"
    assert (root / "docs" / "README.md").is_file()
    assert (root / "models" / ".gitkeep").is_file()
    assert (root / "LICENSE").read_bytes() == (BUNDLES / REFERENCE / "LICENSE").read_bytes()
    assert sorted(p.name for p in (root / "configs").iterdir()) == sorted(
        p.name for p in _configs(REFERENCE).iterdir()
    )


@pytest.mark.parametrize("bundle", FINE)
def test_configs_identical_except_group(bundle):
    group = GROUP_OF_BUNDLE[bundle]
    for name in ("train.json", "inference.json"):
        config = _load(bundle, name)
        assert config["group"] == group, f"{bundle}/{name}: group {config['group']!r}, expected {group!r}"
        assert _without_group(config) == _without_group(_load(REFERENCE, name)), f"{bundle}/{name} drifted"
    for name in ("evaluate.json", "multi_gpu_train.json"):
        assert "group" not in _load(bundle, name)
        assert _load(bundle, name) == _load(REFERENCE, name), f"{bundle}/{name} drifted"
    assert (_configs(bundle) / "logging.conf").read_text() == (_configs(REFERENCE) / "logging.conf").read_text()
    for name in JSON_CONFIGS + ["metadata.json"]:  # JSON with 4-space indent
        text = (_configs(bundle) / name).read_text()
        assert text == json.dumps(json.loads(text), indent=4, ensure_ascii=False) + "\n", f"{bundle}/{name} format"


@pytest.mark.parametrize("bundle", FINE)
def test_fine_protocol_defaults(bundle):
    train = _load(bundle, "train.json")
    assert train["max_epochs"] == PAPER_EPOCHS_FINE
    assert train["spatial_size"] == [160, 160, 160]
    assert (train["margin_mm"], train["jitter_margin_mm"], train["jitter_shift_mm"]) == (15.0, 20.0, 10.0)
    assert (train["batch_size"], train["learning_rate"], train["optimizer"]["weight_decay"]) == (8, 1e-4, 1e-4)
    assert (train["lr_scheduler"]["step_size"], train["lr_scheduler"]["gamma"]) == (20, 0.5)


@pytest.mark.parametrize("bundle", FINE)
def test_metadata_differs_only_in_group_fields(bundle):
    group = GROUP_OF_BUNDLE[bundle]
    meta, reference = _load(bundle, "metadata.json"), _load(REFERENCE, "metadata.json")
    pred = meta["network_data_format"]["outputs"]["pred"]
    assert pred["num_channels"] == len(GROUPS[group]) + 1
    assert pred["channel_def"] == label_names(GROUPS[group])  # the FLARE ids the bundle writes, as MONAI Label reads
    assert list(meta["changelog"])[0] == meta["version"]
    for organ in GROUPS[group]:
        assert ORGANS[organ].replace("_", " ") in meta["label_classes"]
    stripped = []
    for m in (meta, reference):
        m = json.loads(json.dumps(m))
        for field in META_TEXT_FIELDS:
            m.pop(field)
        for field in ("num_channels", "channel_def"):
            m["network_data_format"]["outputs"]["pred"].pop(field)
        stripped.append(m)
    assert stripped[0] == stripped[1]


@pytest.mark.parametrize("bundle", FINE)
def test_metadata_matches_schema(bundle, schema):
    verify_metadata(meta_file=str(_configs(bundle) / "metadata.json"), filepath=schema)


@pytest.mark.parametrize("bundle", FINE)
def test_network_matches_metadata(bundle):
    """Tiny widths (the metadata's 160^3 input and the group's output channels still apply)."""
    verify_net_in_out(
        net_id="network_def",
        meta_file=str(_configs(bundle) / "metadata.json"),
        config_file=str(_configs(bundle) / "inference.json"),
        device="cpu",
        n=1,
        **{"network_def#channels": TINY["network_def#channels"]},
    )


def test_network_matches_metadata_at_paper_size():
    """One group at the paper's widths: the networks differ only in their output channels."""
    bundle = "flare22_fine_vessels"
    verify_net_in_out(
        net_id="network_def",
        meta_file=str(_configs(bundle) / "metadata.json"),
        config_file=str(_configs(bundle) / "inference.json"),
        device="cpu",
        n=1,
    )


@pytest.mark.parametrize("bundle", FINE)
def test_default_coarse_dir_is_the_coarse_bundles_eval(bundle):
    parser = ConfigParser()
    parser.read_config(str(_configs(bundle) / "inference.json"))
    parser["bundle_root"] = str(BUNDLES / bundle)
    coarse_dir = parser.get_parsed_content("coarse_dir")
    assert (BUNDLES / bundle / coarse_dir).resolve() == (BUNDLES / "flare22_coarse" / "eval").resolve()


# ---------------------------------------------------------------------------------------------------------------
# ConfigWorkflow: train, evaluate, infer
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module", params=FINE)
def trained(request, cohort, tmp_path_factory):
    """One tiny training epoch of a fine bundle; returns (bundle, bundle root holding models/model.pt)."""
    bundle = request.param
    root = tmp_path_factory.mktemp(bundle)
    workflow = bundle_workflow(bundle, "train.json", "train", root, dataset_dir=str(cohort), **TINY_TRAIN)
    workflow.initialize()
    assert not workflow.check_properties()
    workflow.run()
    workflow.finalize()
    return bundle, root


def test_train_writes_checkpoint(trained):
    _, root = trained
    assert (root / "models" / "model.pt").is_file()


def test_evaluate_overlay_scores_the_groups_organs(trained, cohort):
    bundle, root = trained
    group = GROUPS[GROUP_OF_BUNDLE[bundle]]
    configs = ["train.json", "evaluate.json"]
    workflow = bundle_workflow(bundle, configs, "eval", root, dataset_dir=str(cohort), **TINY_TRAIN)
    workflow.initialize()
    assert not workflow.check_properties()
    workflow.run()
    workflow.finalize()
    predictions = sorted((root / "eval" / "predictions").glob("*.nii.gz"))
    assert [p.name for p in predictions] == ["FLARE22_Tr_0004.nii.gz"]  # the validation case
    written, label = nib.load(str(predictions[0])), nib.load(str(cohort / "labelsTr" / predictions[0].name))
    assert written.shape == label.shape and np.array_equal(written.affine, label.affine)
    assert _values(predictions[0]) <= {0, *group}
    summary = json.loads((root / "eval" / "summary.json").read_text())
    assert list(summary["organs"]) == [ORGANS[label] for label in group]
    assert summary["num_cases"] == 1 and 0.0 <= summary["mean_DSC"] <= 1.0
    assert (root / "eval" / "metrics.csv").is_file()


def test_inference_from_coarse_masks_keeps_geometry(trained, cohort, tmp_path):
    bundle, root = trained
    group = GROUPS[GROUP_OF_BUNDLE[bundle]]
    images = sorted((cohort / "imagesTr").glob("*.nii.gz"))
    codes = {nib.aff2axcodes(nib.load(str(p)).affine) for p in images}
    assert {("R", "A", "S"), ("L", "P", "S")} <= codes
    workflow = bundle_workflow(
        bundle, "inference.json", "infer", root, dataset_dir=str(cohort), image_subdir="imagesTr",
        coarse_dir=str(cohort / "labelsTr"), output_dir=str(tmp_path / "out"), **TINY,
    )
    workflow.initialize()
    assert not workflow.check_properties()
    workflow.run()
    workflow.finalize()
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(_case(p) for p in images)
    for image in images:
        written, source = nib.load(str(tmp_path / "out" / _case(image))), nib.load(str(image))
        assert written.shape == source.shape
        assert np.array_equal(written.affine, source.affine)
        assert written.get_data_dtype() == np.uint8
        assert _values(tmp_path / "out" / _case(image)) <= {0, *group}


# ---------------------------------------------------------------------------------------------------------------
# Skipping, jitter, missing masks
# ---------------------------------------------------------------------------------------------------------------


def _save_like(array, reference, path):
    ref = nib.load(str(reference))
    nib.save(nib.Nifti1Image(np.asarray(array, dtype=np.uint8), ref.affine, ref.header), str(path))


@pytest.fixture(scope="module")
def skip_cases(cohort, tmp_path_factory):
    """Three images with "coarse" masks: the ground truth, all background, and every organ but the group's.

    Returns (dataset_dir, {group: coarse_dir}); the mask folders differ per group.
    """
    root = tmp_path_factory.mktemp("skip")
    images = sorted((cohort / "imagesTr").glob("*.nii.gz"))[:3]
    (root / "imagesTr").mkdir()
    for image in images:
        shutil.copyfile(image, root / "imagesTr" / image.name)
    coarse = {}
    for group, labels in GROUPS.items():
        masks = root / f"coarse_{group}"
        masks.mkdir()
        for i, image in enumerate(images):
            gt_path = cohort / "labelsTr" / _case(image)
            gt = np.asarray(nib.load(str(gt_path)).dataobj).astype(np.uint8)
            if i == 1:
                gt = np.zeros_like(gt)
            elif i == 2:
                gt = np.where(np.isin(gt, labels), 0, gt).astype(np.uint8)
                assert gt.any()
            _save_like(gt, gt_path, masks / _case(image))
        coarse[group] = masks
    return root, coarse, images


def _foreground_checkpoint(bundle, root):
    """A tiny network that predicts the group's first organ (local id 1) everywhere: any skip must clear it."""
    parser = ConfigParser()
    parser.read_config(str(_configs(bundle) / "inference.json"))
    for key, value in TINY.items():
        parser[key] = value
    network = parser.get_parsed_content("network_def")
    with torch.no_grad():
        network.head.conv.conv.weight.zero_()
        network.head.conv.conv.bias.zero_()
        network.head.conv.conv.bias[1] = 10.0
    (root / "models").mkdir(parents=True)
    torch.save(network.state_dict(), root / "models" / "model.pt")


@pytest.mark.parametrize("bundle", FINE)
def test_group_absent_from_coarse_mask_skips_and_writes_background(bundle, skip_cases, tmp_path, caplog):
    group = GROUPS[GROUP_OF_BUNDLE[bundle]]
    dataset_dir, coarse, images = skip_cases
    _foreground_checkpoint(bundle, tmp_path / "bundle")
    out = tmp_path / "out"
    workflow = bundle_workflow(
        bundle, "inference.json", "infer", tmp_path / "bundle", dataset_dir=str(dataset_dir),
        image_subdir="imagesTr", coarse_dir=str(coarse[GROUP_OF_BUNDLE[bundle]]), output_dir=str(out), **TINY,
    )
    # the bundle's logging.conf has just replaced the root logger's handlers: listen on the package's logger
    package_logger = logging.getLogger("flare_c2f_extensions")
    package_logger.addHandler(caplog.handler)
    try:
        workflow.initialize()
        assert not workflow.check_properties()
        workflow.run()
        workflow.finalize()
    finally:
        package_logger.removeHandler(caplog.handler)
    skipped = [r.getMessage() for r in caplog.records if "stage skipped" in r.getMessage()]
    assert len(skipped) == 2, skipped
    for message in skipped:
        assert all(ORGANS[label] in message for label in group), message

    # control: with the group in the mask, the crop box (which covers the group's organs) is labelled
    first = np.asarray(nib.load(str(out / _case(images[0]))).dataobj)
    gt = np.asarray(nib.load(str(coarse[GROUP_OF_BUNDLE[bundle]] / _case(images[0]))).dataobj)
    assert set(np.unique(first).tolist()) <= {0, group[0]}
    assert (first[np.isin(gt, group)] == group[0]).all()
    # skipped: all background, in the input's geometry
    for image in images[1:]:
        written, source = nib.load(str(out / _case(image))), nib.load(str(image))
        assert written.shape == source.shape and np.array_equal(written.affine, source.affine)
        assert not np.asarray(written.dataobj).any(), f"{image.name}: skipped stage wrote foreground"


def _train_preprocessing(bundle, seed):
    set_determinism(seed=seed)
    parser = ConfigParser()
    parser.read_config(str(_configs(bundle) / "train.json"))
    parser["spatial_size"] = TINY["spatial_size"]
    return parser.get_parsed_content("train#preprocessing")


@pytest.mark.parametrize("bundle", FINE)
def test_training_jitter_is_reproducible(bundle, cohort):
    case = labelled_cases(cohort)[0]
    try:
        first = _train_preprocessing(bundle, 0)(dict(case))
        again = _train_preprocessing(bundle, 0)(dict(case))
        others = [_train_preprocessing(bundle, seed)(dict(case)) for seed in (1, 2)]
    finally:
        set_determinism(seed=None)
    assert not first["crop_skipped"]
    assert np.array_equal(first["crop_box"], again["crop_box"])
    assert torch.equal(first["image"].as_tensor(), again["image"].as_tensor())
    assert torch.equal(first["label"].as_tensor(), again["label"].as_tensor())
    assert tuple(first["image"].shape[1:]) == tuple(TINY["spatial_size"])
    assert any(not np.array_equal(first["crop_box"], other["crop_box"]) for other in others)


@pytest.mark.parametrize("bundle", FINE)
def test_missing_coarse_mask_is_a_clear_error(bundle, cohort, tmp_path):
    masks = tmp_path / "coarse"
    shutil.copytree(cohort / "labelsTr", masks)
    missing = masks / "FLARE22_Tr_0002.nii.gz"
    missing.unlink()
    out = tmp_path / "out"
    workflow = bundle_workflow(
        bundle, "inference.json", "infer", tmp_path / "bundle", dataset_dir=str(cohort), image_subdir="imagesTr",
        coarse_dir=str(masks), output_dir=str(out), **TINY,
    )
    with pytest.raises(Exception) as info:
        workflow.initialize()
        workflow.run()
    error = input_error_in(info.value)
    assert isinstance(error, InputError), f"expected an InputError, got {info.value!r}"
    assert str(missing) in str(error) and "does not exist" in str(error)
    assert not out.exists()
