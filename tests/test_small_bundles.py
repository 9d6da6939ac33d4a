"""The small-organ bundles the MONAI way: the locator (abdomen ROI, 4 small organs) and the refiner (one binary
model per small organ, chosen by the config key ``organ``).

Both must pass the metadata and network checks and train / evaluate / infer through ``ConfigWorkflow``; the
refiner must honour its organ's minimum box size, skip (and say so) where the mask lacks its organ, run from
the command line with ``--organ``, and stop with a clear error on an organ it has no model for.
"""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser, verify_metadata, verify_net_in_out

from flare_c2f_extensions.io.discovery import labelled_cases
from flare_c2f_extensions.labels import GROUPS, ORGAN_IDS, ORGANS, REFINER_MIN_SIZE_MM, label_names

from helpers import BUNDLES, TINY, TINY_TRAIN, bundle_workflow

LOCATOR, REFINER = "flare22_small_locator", "flare22_small_refiner"
SMALL = GROUPS["small"]
SMALL_NAMES = [ORGANS[label] for label in SMALL]
TRAINED_ORGANS = ("gallbladder", "right_adrenal_gland")  # the refiner models the tests train
JSON_CONFIGS = ["train.json", "inference.json", "evaluate.json", "multi_gpu_train.json", "metadata.json"]


def _configs(bundle):
    return BUNDLES / bundle / "configs"


def _load(bundle, name):
    return json.loads((_configs(bundle) / name).read_text())


def _parser(bundle, name="inference.json", **overrides):
    parser = ConfigParser()
    parser.read_config(str(_configs(bundle) / name))
    parser["bundle_root"] = str(BUNDLES / bundle)
    for key, value in overrides.items():
        parser[key] = value
    return parser


def _case(path):
    return path.name.replace("_0000.nii.gz", ".nii.gz")


def _array(path):
    return np.asarray(nib.load(str(path)).dataobj)


def _values(path):
    return set(np.unique(_array(path)).tolist())


def _save_like(array, reference, path):
    ref = nib.load(str(reference))
    nib.save(nib.Nifti1Image(np.asarray(array, dtype=np.uint8), ref.affine, ref.header), str(path))


def _run(workflow):
    workflow.initialize()
    assert not workflow.check_properties()
    workflow.run()
    workflow.finalize()


def _assert_geometry(written_path, image_path):
    written, source = nib.load(str(written_path)), nib.load(str(image_path))
    assert written.shape == source.shape
    assert np.array_equal(written.affine, source.affine)
    assert written.get_data_dtype() == np.uint8


# ---------------------------------------------------------------------------------------------------------------
# Static checks: layout, metadata, network, organ key
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bundle", [LOCATOR, REFINER])
def test_layout_and_json_format(bundle):
    root = BUNDLES / bundle
    for name in JSON_CONFIGS + ["logging.conf"]:
        assert (root / "configs" / name).is_file(), f"{bundle}: configs/{name} missing"
    assert (root / "docs" / "README.md").is_file()
    assert (root / "models" / ".gitkeep").is_file()
    assert (root / "LICENSE").read_bytes() == (BUNDLES / "flare22_coarse" / "LICENSE").read_bytes()
    for name in JSON_CONFIGS:  # JSON with 4-space indent
        text = (root / "configs" / name).read_text()
        assert text == json.dumps(json.loads(text), indent=4, ensure_ascii=False) + "\n", f"{bundle}/{name} format"


@pytest.mark.parametrize("bundle", [LOCATOR, REFINER])
def test_metadata_matches_schema(bundle, schema):
    verify_metadata(meta_file=str(_configs(bundle) / "metadata.json"), filepath=schema)


def test_metadata_describes_the_outputs():
    locator = _load(LOCATOR, "metadata.json")["network_data_format"]["outputs"]["pred"]
    assert locator["num_channels"] == 5 and locator["channel_def"] == label_names(SMALL)  # the ids written
    meta = _load(REFINER, "metadata.json")
    refiner = meta["network_data_format"]["outputs"]["pred"]
    assert refiner["num_channels"] == 2 and refiner["channel_def"] == label_names((ORGAN_IDS["gallbladder"],))
    assert "`organ`" in meta["description"] and "`organ`" in meta["pred_classes"]
    for bundle, grid in ((LOCATOR, [128, 128, 128]), (REFINER, [64, 64, 64])):
        m = _load(bundle, "metadata.json")
        assert m["network_data_format"]["inputs"]["image"]["spatial_shape"] == grid
        assert _load(bundle, "inference.json")["spatial_size"] == grid == _load(bundle, "train.json")["spatial_size"]
        assert list(m["changelog"])[0] == m["version"]


def test_locator_network_matches_metadata_at_paper_size():
    verify_net_in_out(
        net_id="network_def",
        meta_file=str(_configs(LOCATOR) / "metadata.json"),
        config_file=str(_configs(LOCATOR) / "inference.json"),
        device="cpu",
        n=1,
    )


def test_refiner_network_matches_metadata():
    """Tiny widths: the refiner's network is the locator's with 2 output channels (metadata's 64^3 input)."""
    verify_net_in_out(
        net_id="network_def",
        meta_file=str(_configs(REFINER) / "metadata.json"),
        config_file=str(_configs(REFINER) / "inference.json"),
        device="cpu",
        n=1,
        **{"network_def#channels": TINY["network_def#channels"]},
    )


def test_default_mask_folders_are_the_previous_stages_eval():
    coarse_dir = _parser(LOCATOR).get_parsed_content("coarse_dir")
    assert (BUNDLES / LOCATOR / coarse_dir).resolve() == (BUNDLES / "flare22_coarse" / "eval").resolve()
    locator_dir = _parser(REFINER).get_parsed_content("locator_dir")
    assert (BUNDLES / REFINER / locator_dir).resolve() == (BUNDLES / LOCATOR / "eval").resolve()


def test_locator_roi_is_all_foreground_and_classes_are_the_small_organs():
    for name in ("train.json", "inference.json"):
        parser = _parser(LOCATOR, name)
        assert parser.get_parsed_content("roi_labels") is None
        assert tuple(parser.get_parsed_content("labels")) == SMALL
        assert parser.get_parsed_content("num_classes") == 5
    train = _load(LOCATOR, "train.json")
    assert train["train"]["crop"]["box_labels"] == train["validate"]["crop"]["box_labels"] == "@roi_labels"
    assert train["train"]["crop"]["target_labels"] == train["validate"]["crop"]["target_labels"] == "@labels"


@pytest.mark.parametrize("organ", SMALL_NAMES)
def test_refiner_organ_key_chooses_labels_box_and_checkpoint(organ):
    label = ORGAN_IDS[organ]
    for name in ("train.json", "inference.json"):
        parser = _parser(REFINER, name, organ=organ)
        assert parser.get_parsed_content("organ_id") == label
        assert list(parser.get_parsed_content("labels")) == [label]
        assert parser.get_parsed_content("num_classes") == 2
        assert parser.get_parsed_content("model_file") == f"model_{organ}.pt"
        assert tuple(parser.get_parsed_content("min_size_mm")) == tuple(REFINER_MIN_SIZE_MM[label])
        assert parser.get_parsed_content("ckpt_path").endswith(f"/models/model_{organ}.pt")
    # the checkpoint's one name: saved by train.json, loaded by the evaluate overlay and by inference.json
    train = _load(REFINER, "train.json")
    assert "@validate#best_model_saver" in train["validate"]["handlers"]
    saver = train["validate"]["best_model_saver"]
    assert saver["_target_"] == "flare_c2f_extensions.training.checkpoints.AtomicCheckpointSaver"
    assert "@ckpt_path" in saver["save_dir"] and "@ckpt_path" in saver["key_metric_filename"]
    evaluate = _load(REFINER, "evaluate.json")
    loader = next(h for h in evaluate["validate#handlers"] if h["_target_"] == "CheckpointLoader")
    assert loader["load_path"] == "@ckpt_path"
    loader = next(h for h in _load(REFINER, "inference.json")["handlers"] if h["_target_"] == "CheckpointLoader")
    assert loader["load_path"] == "@ckpt_path"


def test_min_sizes_cover_exactly_the_small_organs():
    assert sorted(REFINER_MIN_SIZE_MM) == sorted(SMALL)
    for label, size in REFINER_MIN_SIZE_MM.items():
        assert len(size) == 3 and all(20.0 <= s <= 128.0 for s in size), (label, size)


@pytest.mark.parametrize("organ", ["galbladder", "liver", "kidney"])
def test_unknown_organ_is_a_clear_error_listing_the_known_organs(organ, cohort, tmp_path):
    workflow = bundle_workflow(
        REFINER, "inference.json", "infer", tmp_path / "bundle", dataset_dir=str(cohort), image_subdir="imagesTr",
        locator_dir=str(cohort / "labelsTr"), output_dir=str(tmp_path / "out"), organ=organ, **TINY,
    )
    with pytest.raises(Exception) as info:
        workflow.initialize()
        workflow.run()
    error, messages = info.value, []
    while error is not None:
        messages.append(str(error))
        error = error.__cause__ or error.__context__
    message = next((m for m in messages if all(name in m for name in SMALL_NAMES)), None)
    assert message is not None, f"no error lists the four small organs: {messages}"
    assert organ in message
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------------------------
# Refiner box: the organ's minimum physical size
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def roomy_case(tmp_path_factory):
    """One case whose field of view (128 x 128 x 80 mm) exceeds every minimum box size."""
    from flare_c2f_extensions.synthetic.phantom import write_cohort

    out = tmp_path_factory.mktemp("roomy")
    write_cohort(out, n=1, seed=3, shape=(64, 64, 40), spacing=2.0)
    return labelled_cases(out)[0]


def _box_extent_mm(d):
    """The crop box (image voxels), its physical size in mm and the image's voxel size, from the crop's output:
    its voxel size times its grid is the box's physical extent."""
    box = np.asarray(d["crop_box"])
    extent = d["image"].pixdim.numpy() * np.asarray(d["image"].shape[1:])
    return box, extent, extent / (box[1] - box[0])


def _organ_inside(box, case, label):
    from monai.transforms import Compose, EnsureChannelFirstd, LoadImaged, Orientationd

    gt = Compose([LoadImaged("label", image_only=True), EnsureChannelFirstd("label"), Orientationd("label", "RAS")])(
        {"label": case["label"]}
    )["label"][0].numpy()
    idx = np.argwhere(gt == label)
    return bool(idx.size) and (idx.min(0) >= box[0]).all() and (idx.max(0) < box[1]).all()


@pytest.mark.parametrize("organ", SMALL_NAMES)
def test_refiner_box_honours_the_organs_minimum_size(organ, roomy_case):
    label = ORGAN_IDS[organ]
    minimum = np.asarray(REFINER_MIN_SIZE_MM[label])
    overrides = {"organ": organ, "spatial_size": TINY["spatial_size"]}
    validate = _parser(REFINER, "train.json", **overrides).get_parsed_content("validate#preprocessing")
    infer = _parser(REFINER, "inference.json", **overrides).get_parsed_content("preprocessing")
    for d in (validate(dict(roomy_case)), infer({"image": roomy_case["image"], "locator": roomy_case["label"]})):
        assert not d["crop_skipped"]
        box, extent, _ = _box_extent_mm(d)
        assert (extent >= minimum - 1e-3).all(), (organ, extent, minimum)
        assert _organ_inside(box, roomy_case, label)
        assert tuple(d["image"].shape[1:]) == tuple(TINY["spatial_size"])


@pytest.mark.parametrize("organ", SMALL_NAMES)
def test_refiner_training_box_honours_the_organs_minimum_size(organ, roomy_case):
    """The jittered training box, five draws, also where the organ touches the border of the volume (the
    phantom's esophagus runs out of the top of the field of view): margin outside the volume does not count."""
    from monai.transforms import Compose

    label = ORGAN_IDS[organ]
    minimum = np.asarray(REFINER_MIN_SIZE_MM[label])
    parser = _parser(REFINER, "train.json", organ=organ, spatial_size=TINY["spatial_size"])
    loaded = Compose(parser.get_parsed_content("load_transforms"))(dict(roomy_case))
    crop = parser.get_parsed_content("train#crop")
    crop.set_random_state(seed=0)
    for _ in range(5):
        box, extent, _ = _box_extent_mm(crop(dict(loaded)))
        assert _organ_inside(box, roomy_case, label)
        assert (extent >= minimum - 1e-3).all(), (organ, box.tolist(), extent, minimum)


# ---------------------------------------------------------------------------------------------------------------
# Locator: train, evaluate, infer, skip
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def locator_root(cohort, tmp_path_factory):
    """One tiny training epoch of the locator; returns the bundle root holding models/model.pt."""
    root = tmp_path_factory.mktemp("locator")
    _run(bundle_workflow(LOCATOR, "train.json", "train", root, dataset_dir=str(cohort), **TINY_TRAIN))
    return root


def test_locator_train_writes_checkpoint(locator_root):
    assert [p.name for p in (locator_root / "models").glob("*.pt")] == ["model.pt"]


def test_locator_evaluate_overlay_scores_the_small_organs(locator_root, cohort):
    _run(bundle_workflow(
        LOCATOR, ["train.json", "evaluate.json"], "eval", locator_root, dataset_dir=str(cohort), **TINY_TRAIN
    ))
    predictions = sorted((locator_root / "eval" / "predictions").glob("*.nii.gz"))
    assert [p.name for p in predictions] == ["FLARE22_Tr_0004.nii.gz"]  # the validation case
    _assert_geometry(predictions[0], cohort / "imagesTr" / "FLARE22_Tr_0004_0000.nii.gz")
    assert _values(predictions[0]) <= {0, *SMALL}
    summary = json.loads((locator_root / "eval" / "summary.json").read_text())
    assert list(summary["organs"]) == SMALL_NAMES
    assert summary["num_cases"] == 1 and 0.0 <= summary["mean_DSC"] <= 1.0
    assert (locator_root / "eval" / "metrics.csv").is_file()


@pytest.fixture(scope="module")
def located(locator_root, cohort, tmp_path_factory):
    """The locator's inference on the training images, with the ground truth as the coarse masks."""
    out = tmp_path_factory.mktemp("located")
    _run(bundle_workflow(
        LOCATOR, "inference.json", "infer", locator_root, dataset_dir=str(cohort), image_subdir="imagesTr",
        coarse_dir=str(cohort / "labelsTr"), output_dir=str(out), **TINY,
    ))
    return out


def test_locator_inference_writes_small_organs_in_input_geometry(located, cohort):
    images = sorted((cohort / "imagesTr").glob("*.nii.gz"))
    codes = {nib.aff2axcodes(nib.load(str(p)).affine) for p in images}
    assert {("R", "A", "S"), ("L", "P", "S")} <= codes
    assert sorted(p.name for p in located.iterdir()) == sorted(_case(p) for p in images)
    for image in images:
        _assert_geometry(located / _case(image), image)
        assert _values(located / _case(image)) <= {0, *SMALL}


def _foreground_checkpoint(bundle, root, filename, **overrides):
    """A tiny network that predicts local id 1 everywhere: its crop box becomes visible, a skip must clear it."""
    parser = _parser(bundle, **{**TINY, **overrides})
    network = parser.get_parsed_content("network_def")
    with torch.no_grad():
        network.head.conv.conv.weight.zero_()
        network.head.conv.conv.bias.zero_()
        network.head.conv.conv.bias[1] = 10.0
    (root / "models").mkdir(parents=True, exist_ok=True)
    torch.save(network.state_dict(), root / "models" / filename)


def _listen(caplog):
    """The bundle's logging.conf replaces the root logger's handlers: listen on the package's logger."""
    logger = logging.getLogger("flare_c2f_extensions")
    logger.addHandler(caplog.handler)
    return logger


def test_locator_skips_an_empty_coarse_mask(cohort, tmp_path, caplog):
    images = sorted((cohort / "imagesTr").glob("*.nii.gz"))[:2]
    (tmp_path / "data").mkdir()
    (tmp_path / "coarse").mkdir()
    for i, image in enumerate(images):
        shutil.copyfile(image, tmp_path / "data" / image.name)
        gt = cohort / "labelsTr" / _case(image)
        _save_like(_array(gt) if i == 0 else np.zeros(_array(gt).shape), gt, tmp_path / "coarse" / _case(image))
    _foreground_checkpoint(LOCATOR, tmp_path / "bundle", "model.pt")
    out = tmp_path / "out"
    workflow = bundle_workflow(
        LOCATOR, "inference.json", "infer", tmp_path / "bundle", dataset_dir=str(tmp_path / "data"),
        coarse_dir=str(tmp_path / "coarse"), output_dir=str(out), **TINY,
    )
    logger = _listen(caplog)
    try:
        _run(workflow)
    finally:
        logger.removeHandler(caplog.handler)
    assert len([r for r in caplog.records if "stage skipped" in r.getMessage()]) == 1
    # the ROI covers all coarse foreground and is labelled with the first small organ (local 1 -> FLARE 7)
    first, gt = _array(out / _case(images[0])), _array(tmp_path / "coarse" / _case(images[0]))
    assert _values(out / _case(images[0])) == {0, SMALL[0]} and (first[gt > 0] == SMALL[0]).all()
    _assert_geometry(out / _case(images[1]), images[1])
    assert not _array(out / _case(images[1])).any()


# ---------------------------------------------------------------------------------------------------------------
# Refiner: one model per organ, train, evaluate, infer, skip, command line
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def refiner_root(cohort, tmp_path_factory):
    """One tiny training epoch per organ in ``TRAINED_ORGANS``, all in one bundle root."""
    root = tmp_path_factory.mktemp("refiner")
    for organ in TRAINED_ORGANS:
        _run(bundle_workflow(REFINER, "train.json", "train", root, dataset_dir=str(cohort), organ=organ, **TINY_TRAIN))
    return root


def test_refiner_train_writes_one_checkpoint_per_organ(refiner_root):
    written = sorted(p.name for p in (refiner_root / "models").glob("*.pt"))
    assert written == sorted(f"model_{organ}.pt" for organ in TRAINED_ORGANS)


def test_refiner_evaluate_overlay_scores_its_organ(refiner_root, cohort):
    _run(bundle_workflow(
        REFINER, ["train.json", "evaluate.json"], "eval", refiner_root, dataset_dir=str(cohort),
        organ="gallbladder", **TINY_TRAIN,
    ))
    out = refiner_root / "eval" / "gallbladder"
    predictions = sorted((out / "predictions").glob("*.nii.gz"))
    assert [p.name for p in predictions] == ["FLARE22_Tr_0004.nii.gz"]
    _assert_geometry(predictions[0], cohort / "imagesTr" / "FLARE22_Tr_0004_0000.nii.gz")
    assert _values(predictions[0]) <= {0, ORGAN_IDS["gallbladder"]}
    summary = json.loads((out / "summary.json").read_text())
    assert list(summary["organs"]) == ["gallbladder"] and summary["num_cases"] == 1
    assert (out / "metrics.csv").is_file()


@pytest.mark.parametrize("organ", TRAINED_ORGANS)
def test_refiner_inference_writes_its_organ_in_input_geometry(organ, refiner_root, cohort, tmp_path):
    images = sorted((cohort / "imagesTr").glob("*.nii.gz"))
    _run(bundle_workflow(
        REFINER, "inference.json", "infer", refiner_root, dataset_dir=str(cohort), image_subdir="imagesTr",
        locator_dir=str(cohort / "labelsTr"), output_dir=str(tmp_path), organ=organ, **TINY,
    ))
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(_case(p) for p in images)
    for image in images:
        _assert_geometry(tmp_path / _case(image), image)
        assert _values(tmp_path / _case(image)) <= {0, ORGAN_IDS[organ]}


def test_refiner_reads_the_locators_output(refiner_root, located, cohort, tmp_path):
    """The chain as files: locator output (FLARE ids 7..10) -> refiner."""
    _run(bundle_workflow(
        REFINER, "inference.json", "infer", refiner_root, dataset_dir=str(cohort), image_subdir="imagesTr",
        locator_dir=str(located), output_dir=str(tmp_path), organ="gallbladder", **TINY,
    ))
    for image in sorted((cohort / "imagesTr").glob("*.nii.gz")):
        _assert_geometry(tmp_path / _case(image), image)
        assert _values(tmp_path / _case(image)) <= {0, ORGAN_IDS["gallbladder"]}


def test_refiner_command_line_skips_an_absent_organ(cohort, tmp_path):
    """``python -m monai.bundle run --config_file configs/inference.json --organ gallbladder ...`` from the bundle."""
    label = ORGAN_IDS["gallbladder"]
    images = sorted((cohort / "imagesTr").glob("*.nii.gz"))[:2]
    (tmp_path / "data").mkdir()
    (tmp_path / "located").mkdir()
    for i, image in enumerate(images):
        shutil.copyfile(image, tmp_path / "data" / image.name)
        gt_path = cohort / "labelsTr" / _case(image)
        gt = _array(gt_path)
        if i == 1:
            gt = np.where(gt == label, 0, gt)  # every organ but the gallbladder
            assert gt.any()
        _save_like(gt, gt_path, tmp_path / "located" / _case(image))
    _foreground_checkpoint(REFINER, tmp_path / "bundle", "model_gallbladder.pt", organ="gallbladder")
    out = tmp_path / "out"
    command = [
        sys.executable, "-m", "monai.bundle", "run", "--config_file", "configs/inference.json",
        "--logging_file", "configs/logging.conf", "--organ", "gallbladder",
        "--bundle_root", str(tmp_path / "bundle"), "--dataset_dir", str(tmp_path / "data"),
        "--locator_dir", str(tmp_path / "located"), "--output_dir", str(out), "--device", "cpu",
        "--spatial_size", json.dumps(TINY["spatial_size"]),
        "--network_def#channels", json.dumps(TINY["network_def#channels"]), "--num_workers", "0",
    ]
    result = subprocess.run(command, cwd=BUNDLES / REFINER, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    skipped = [line for line in result.stdout.splitlines() if "stage skipped" in line]
    assert len(skipped) == 1 and "no gallbladder in mask" in skipped[0], result.stdout[-3000:]
    # organ present: its crop box is labelled with its FLARE id and covers the located organ
    first = _array(out / _case(images[0]))
    assert _values(out / _case(images[0])) == {0, label}
    assert (first[_array(tmp_path / "located" / _case(images[0])) == label] == label).all()
    # organ absent: all background, in the input's geometry
    _assert_geometry(out / _case(images[1]), images[1])
    assert not _array(out / _case(images[1])).any()
