"""The cascade bundle as MONAI's consumers of bundles use it (issue 19): its ``network_def`` is one module holding
every stage, ``models/model.pt`` one state dict assembled from trained stage bundles, and ``preprocessing`` /
``inferer`` / ``postprocessing`` are read by id, with the transforms named ``*LoadImage*`` / ``*SaveImage*`` removed
and ``inferer(inputs=..., network=...)`` called on a request that carries only ``image`` (MONAI Label's
``BundleInferTask``, MONAI Deploy's ``MonaiBundleInferenceOperator``). The labels through that path equal
``flare-c2f segment``'s, voxel for voxel, with the module and with its TorchScript export (``ckpt_export``).
Tiny random stages, as in ``test_segment.py``."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser
from monai.transforms import Compose, LoadImage, SaveImaged

from flare_c2f_extensions.cascade.assemble import assemble_cascade
from flare_c2f_extensions.cascade.configs import read_stage_config
from flare_c2f_extensions.cascade.networks import CASCADE_STAGES, CascadeNetwork
from flare_c2f_extensions.labels import label_names
from flare_c2f_extensions.paths import CASCADE_BUNDLE
from flare_c2f_extensions.runs.segment import Segmenter

from helpers import BUNDLES, TINY_STAGES, write_phantom


def _stage_checkpoints(bundles: Path) -> None:
    """Random tiny weights for every stage, saved where each stage bundle keeps its checkpoint."""
    torch.manual_seed(0)
    for submodule in CASCADE_STAGES:
        stage = "refiner" if submodule.startswith("refiner_") else submodule
        extra = {"organ": submodule[len("refiner_"):]} if stage == "refiner" else {}
        folder = bundles / {"coarse": "flare22_coarse", "solid": "flare22_fine_solid",
                            "digestive": "flare22_fine_digestive", "vessels": "flare22_fine_vessels",
                            "locator": "flare22_small_locator", "refiner": "flare22_small_refiner"}[stage]
        parser = read_stage_config(folder, {**TINY_STAGES[stage], **extra}, stage)
        checkpoint = Path(parser.get_parsed_content("ckpt_path"))
        checkpoint.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"model": parser.get_parsed_content("network_def").state_dict()}, checkpoint)


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A folder of stage bundles with (tiny, random) weights and the cascade bundle assembled from them."""
    bundles = tmp_path_factory.mktemp("trained") / "bundles"
    shutil.copytree(BUNDLES, bundles, ignore=shutil.ignore_patterns("models", "eval", "__pycache__"))
    _stage_checkpoints(bundles)
    assemble_cascade(bundles, stage_overrides=TINY_STAGES)
    return bundles


@pytest.fixture(scope="module")
def ct(tmp_path_factory) -> Path:
    return write_phantom(tmp_path_factory.mktemp("ct") / "case_0000.nii.gz", orientation="LPS")


def _client_parts(bundle: Path, bundle_root: str | None):
    """What a client reads from a bundle: the parser (``bundle_root`` as the client sets it, or left as the config
    has it, as MONAI Deploy does) and the parts by id, with loaders and savers removed by class name."""
    parser = ConfigParser()
    parser.read_config(str(bundle / "configs" / "inference.json"))
    parser.read_meta(str(bundle / "configs" / "metadata.json"))
    if bundle_root is not None:
        parser["bundle_root"] = bundle_root

    def without_io(transforms) -> Compose:  # Deploy's rule (class names); MONAI Label drops SaveImaged instances
        kept = [t for t in transforms.transforms if not any(n in type(t).__name__ for n in ("LoadImage", "SaveImage"))]
        assert all(isinstance(t, SaveImaged) for t in transforms.transforms if "SaveImage" in type(t).__name__)
        return Compose(kept)

    pre = without_io(parser.get_parsed_content("preprocessing"))
    post = without_io(parser.get_parsed_content("postprocessing"))
    return parser, pre, parser.get_parsed_content("inferer"), post


def _client_labels(ct: Path, pre, inferer, post, network, saved_to: Path | None = None) -> np.ndarray:
    """One request as the clients make it: only ``image`` (loaded by the client), a batch of one to the inferer.
    ``saved_to``: also run the bundle's own saver there, as ``monai.bundle run`` would."""
    data = pre({"image": LoadImage(image_only=True)(str(ct))})
    with torch.no_grad():
        data["pred"] = inferer(data["image"][None], network)[0]  # MONAI Label: positional; Deploy: by keyword
    data = post(data)
    if saved_to is not None:
        from flare_c2f_extensions.io.label_maps import FlareSaveImaged

        FlareSaveImaged("pred", saved_to)(data)
    return np.asarray(data["pred"])[0]


@pytest.fixture(scope="module")
def segmented(trained, ct) -> np.ndarray:
    segmenter = Segmenter(bundles_dir=trained, stage_overrides=TINY_STAGES, engine="torch", threads=1)
    return np.asarray(segmenter(str(ct)).dataobj)


def test_the_cascade_bundle_through_a_client_equals_segment(trained, ct, segmented, tmp_path):
    cascade = tmp_path / "elsewhere" / CASCADE_BUNDLE  # nothing beside it: no stage bundles, no repository
    shutil.copytree(trained / CASCADE_BUNDLE, cascade)
    parser, pre, inferer, post = _client_parts(cascade, str(cascade))
    assert not any("Load" in type(t).__name__ for t in pre.transforms)
    assert [type(t).__name__ for t in post.transforms] == ["Invertd"]  # the saver went with the client's rule
    network = parser.get_parsed_content("network_def")
    network.load_state_dict(torch.load(cascade / "models" / "model.pt", weights_only=True))
    labels = _client_labels(ct, pre, inferer, post, network.eval(), saved_to=tmp_path / "eval")
    assert labels.shape == segmented.shape and np.count_nonzero(segmented) > 0
    assert np.array_equal(labels, segmented)
    written = nib.load(str(tmp_path / "eval" / "case.nii.gz"))  # FLARE's name, the input's exact geometry
    assert np.array_equal(np.asarray(written.dataobj), segmented)
    assert np.array_equal(written.affine, nib.load(ct).affine)
    names = parser["_meta_"]["network_data_format"]["outputs"]["pred"]["channel_def"]
    assert names == label_names() and set(np.unique(labels).tolist()) <= {int(k) for k in names}


def test_the_torchscript_export_runs_the_same_cascade(trained, ct, segmented, tmp_path):
    from monai.bundle import ckpt_export

    cascade = trained / CASCADE_BUNDLE
    exported = tmp_path / "model.ts"
    ckpt_export(net_id="network_def", filepath=str(exported), ckpt_file=str(cascade / "models" / "model.pt"),
                meta_file=str(cascade / "configs" / "metadata.json"),
                config_file=str(cascade / "configs" / "inference.json"), bundle_root=str(cascade))
    _, pre, inferer, post = _client_parts(cascade, None)  # Deploy: bundle_root left as the config has it
    with torch.no_grad():  # Deploy calls by keyword
        image = pre({"image": LoadImage(image_only=True)(str(ct))})["image"]
        pred = inferer(inputs=image[None], network=torch.jit.load(str(exported)).eval())
    assert pred.shape[:2] == (1, 1) and pred.dtype == torch.uint8
    labels = _client_labels(ct, pre, inferer, post, torch.jit.load(str(exported)).eval())
    assert np.array_equal(labels, segmented)

    class DeployModel:  # MONAI Deploy's TorchScriptModel hands the inferer itself, the module as ``predictor``
        predictor = torch.jit.load(str(exported)).eval()

    assert np.array_equal(_client_labels(ct, pre, inferer, post, DeployModel()), segmented)


def test_assembled_checkpoint_is_one_state_dict_of_every_stage(trained):
    state = torch.load(trained / CASCADE_BUNDLE / "models" / "model.pt", weights_only=True)
    assert {key.split(".")[0] for key in state} == set(CASCADE_STAGES)
    config = json.loads((trained / CASCADE_BUNDLE / "configs" / "inference.json").read_text())
    network = CascadeNetwork(config["stage_networks"])
    network.load_state_dict(state)  # strict: the recorded arguments rebuild exactly this network
    solid = torch.load(trained / "flare22_fine_solid" / "models" / "model.pt", weights_only=True)["model"]
    assert all(torch.equal(state[f"solid.{key}"], value) for key, value in solid.items())


def test_export_takes_either_checkpoint_form_and_the_whole_cascade(trained, tmp_path):
    from flare_c2f_extensions.cascade.export import export_bundle

    tiny = {"network_def#channels": TINY_STAGES["coarse"]["network_def"]["channels"],
            "spatial_size": TINY_STAGES["coarse"]["spatial_size"]}
    wrapped = export_bundle(trained / "flare22_coarse", "ts", tmp_path / "coarse", tiny)  # saved as {"model": ...}
    assert wrapped[0]["ts_max_abs_diff"] < 1e-4
    exported = export_bundle(trained / CASCADE_BUNDLE, "ts", tmp_path / "cascade")  # one model.ts: every stage
    module = torch.jit.load(exported[0]["ts"])
    assert exported[0]["ts_max_abs_diff"] < 1e-4 and all(hasattr(module, name) for name in CASCADE_STAGES)


STAGE_BUNDLES_SERVED = ["flare22_coarse", "flare22_fine_solid", "flare22_fine_digestive", "flare22_fine_vessels",
                        "flare22_small_locator", "flare22_small_refiner"]


@pytest.mark.parametrize("bundle", STAGE_BUNDLES_SERVED)
def test_every_stage_bundle_runs_from_the_image_alone_and_names_what_it_writes(trained, ct, bundle, tmp_path):
    """A client sends only ``image`` (no coarse or locator mask): each stage bundle runs from it, through its
    TorchScript export, and writes only the ids its ``channel_def`` names (refiner: models/model.pt, its default)."""
    from monai.bundle import ckpt_export

    from flare_c2f_extensions.training.train import default_refiner_checkpoint

    folder = trained / bundle
    if bundle == "flare22_small_refiner":
        assert default_refiner_checkpoint(folder) == folder / "models" / "model.pt"
    stage = {"flare22_coarse": "coarse", "flare22_small_locator": "locator", "flare22_small_refiner": "refiner"}.get(
        bundle, bundle.split("_")[-1])
    tiny = {"network_def#channels": TINY_STAGES[stage]["network_def"]["channels"],
            "spatial_size": TINY_STAGES[stage]["spatial_size"]}
    exported = tmp_path / "model.ts"
    ckpt_export(net_id="network_def", filepath=str(exported), ckpt_file=str(folder / "models" / "model.pt"),
                key_in_ckpt="model", meta_file=str(folder / "configs" / "metadata.json"),
                config_file=str(folder / "configs" / "inference.json"), bundle_root=str(folder), **tiny)
    parser, pre, inferer, post = _client_parts(folder, None)
    for key, value in tiny.items():
        parser[key] = value
    pre = Compose([t for t in parser.get_parsed_content("preprocessing").transforms if "LoadImage" not in
                   type(t).__name__])
    post = Compose([t for t in parser.get_parsed_content("postprocessing").transforms if not isinstance(t, SaveImaged)])
    labels = _client_labels(ct, pre, parser.get_parsed_content("inferer"), post, torch.jit.load(str(exported)))
    names = parser["_meta_"]["network_data_format"]["outputs"]["pred"]["channel_def"]
    assert labels.shape == nib.load(str(ct)).shape
    assert set(np.unique(labels).tolist()) <= {int(k) for k in names} and "organ" not in json.dumps(names)


@pytest.mark.parametrize("bundle", ["flare22_fine_solid", "flare22_small_refiner"])
def test_a_stage_bundle_trains_on_the_data_a_monai_label_request_gives(cohort, bundle, tmp_path):
    """MONAI Label's ``BundleTrainTask`` hands its datastore's cases to ``train#dataset#data`` and
    ``validate#dataset#data`` and knows nothing of ``dataset_dir`` (issue 19, MONAI Label 0.8.5): the training must
    read those cases, not the folder the config names (``/data/FLARE22``, which does not exist here)."""
    from monai.bundle import ConfigWorkflow

    from flare_c2f_extensions.io.discovery import labelled_cases

    cases = labelled_cases(cohort)
    root = tmp_path / bundle
    shutil.copytree(BUNDLES / bundle / "configs", root / "configs")
    requested = {"train#dataset#data": cases[:3], "validate#dataset#data": cases[3:],
                 "spatial_size": [32, 32, 32], "network_def#channels": TINY_STAGES["solid"]["network_def"]["channels"],
                 "batch_size": 2, "num_workers": 0, "max_epochs": 1, "device": "cpu"}  # fewer epochs than val_interval
    workflow = ConfigWorkflow(config_file=str(root / "configs" / "train.json"), workflow_type="train",
                              meta_file=str(root / "configs" / "metadata.json"), logging_file=False,
                              bundle_root=str(root), init_id=None, **requested)  # MONAI Label runs no initialize
    workflow.initialize()
    loader = workflow.parser.get_parsed_content("train#trainer").data_loader
    assert sorted(item["image"] for item in loader.data) == sorted(case["image"] for case in cases[:3])
    workflow.run()
    assert list((root / "models").glob("model*.pt"))  # validated at the last epoch: the best model is saved
