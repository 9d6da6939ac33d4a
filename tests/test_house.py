"""The house's rules in code: importing the package changes nothing global, every stage bundle provides what the
cascade reads from it, and the trainable bundles' shared blocks stay equal."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from flare_c2f_extensions.cascade.configs import read_stage_config, stage_keys
from flare_c2f_extensions.errors import InputError
from flare_c2f_extensions.paths import STAGE_BUNDLES

from helpers import BUNDLES, REPO

# Third-party modules import first: some of them add warning filters of their own, which are not ours to judge.
IMPORT_SIDE_EFFECTS = """
import sys, warnings
import monai.bundle, monai.data, monai.inferers, monai.metrics, monai.networks, monai.transforms, nibabel, torch
import cc3d, PIL, pydicom, scipy.ndimage, tqdm, yaml
hook, filters = sys.excepthook, list(warnings.filters)
import pkgutil, importlib, flare_c2f_extensions
for module in pkgutil.iter_modules(flare_c2f_extensions.__path__):
    importlib.import_module("flare_c2f_extensions." + module.name)
print(sys.excepthook is hook, warnings.filters == filters, [f for f in warnings.filters if f not in filters])
flare_c2f_extensions.errors.start_run()
print(sys.excepthook is hook, warnings.filters == filters)
"""


def test_importing_the_package_changes_no_hook_and_no_warning_filter():
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    result = subprocess.run(
        [sys.executable, "-c", IMPORT_SIDE_EFFECTS], capture_output=True, text=True, env=env, cwd=REPO, check=True
    )
    imported, started = result.stdout.strip().splitlines()[-2:]
    assert imported == "True True []"
    assert started == "False False"  # a run's entry point installs both


# ---------------------------------------------------------------------------------------------------------------
# The contract between the cascade and its stage bundles
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("stage", sorted(STAGE_BUNDLES))
def test_every_stage_bundle_provides_what_the_cascade_reads(stage):
    config = json.loads((BUNDLES / STAGE_BUNDLES[stage] / "configs" / "inference.json").read_text())
    missing = [key for key in stage_keys(stage) if key not in config]
    assert not missing, f"{STAGE_BUNDLES[stage]}/configs/inference.json lacks {missing}"
    read_stage_config(BUNDLES / STAGE_BUNDLES[stage], stage=stage)  # the cascade's own check passes too


def test_a_stage_config_without_a_contract_key_is_one_clear_error(tmp_path):
    bundle = tmp_path / STAGE_BUNDLES["solid"]
    shutil.copytree(BUNDLES / STAGE_BUNDLES["solid"] / "configs", bundle / "configs")
    config = json.loads((bundle / "configs" / "inference.json").read_text())
    del config["margin_mm"]
    (bundle / "configs" / "inference.json").write_text(json.dumps(config, indent=4))
    with pytest.raises(InputError, match="lacks margin_mm"):
        read_stage_config(bundle, stage="solid")


# The trainable bundles' train.json, flattened to config ids, against the solid group's: the ids (and everything
# below them) that may differ, and why. Everything else (loss, optimizer, scheduler, network, augmentations,
# validation, handlers, checkpoints) must stay equal. The other two groups are checked whole in test_fine_bundles.
TRAIN_REFERENCE = "flare22_fine_solid"
GRID_AND_ORGANS = ("group", "labels", "num_classes", "spatial_size", "margin_mm")
INTENDED_TRAIN_DIFFERENCES = {
    # the whole volume, no box: its own data path and grid, hard labels, a random affine instead of the jittered crop
    "flare22_coarse": GRID_AND_ORGANS + (
        "imports", "jitter_margin_mm", "jitter_shift_mm", "max_epochs", "load_transforms", "label_transforms",
        "preprocessing_transforms", "loss#to_onehot_y", "train#crop", "validate#crop", "train#preprocessing",
        "validate#preprocessing", "train#postprocessing#transforms#1#argmax",
        "train#device_loader#crop", "train#device_loader#load_transforms",  # no crop; loading before the resize
    ),
    # the abdomen's box (roi_labels) around the four small organs
    "flare22_small_locator": GRID_AND_ORGANS + ("roi_labels", "train#crop", "validate#crop"),
    # one binary network per organ, chosen by `organ`, each with its own files and a minimum box size
    "flare22_small_refiner": GRID_AND_ORGANS + (
        "ckpt_path", "model_file", "organ", "organ_id", "organ_name", "small_organs", "output_dir", "state_dir",
        "jitter_margin_mm", "jitter_shift_mm", "min_size_mm", "train#crop#min_size_mm", "validate#crop#min_size_mm",
    ),
}


def _flat_ids(config, prefix: str = "") -> dict:
    if isinstance(config, dict):
        items = config.items()
    elif isinstance(config, list) and any(isinstance(v, (dict, list)) for v in config):
        items = [*enumerate(config), ("len", len(config))]
    else:
        return {prefix: config}
    flat = {}
    for key, value in items:
        flat.update(_flat_ids(value, f"{prefix}#{key}" if prefix else str(key)))
    return flat


@pytest.mark.parametrize("bundle", sorted(INTENDED_TRAIN_DIFFERENCES))
def test_trainable_bundles_share_their_training_blocks(bundle):
    config = json.loads((BUNDLES / bundle / "configs" / "train.json").read_text())
    reference = _flat_ids(json.loads((BUNDLES / TRAIN_REFERENCE / "configs" / "train.json").read_text()))
    if bundle == "flare22_coarse":  # the coarse stage's random affine stands where the others crop
        assert config["train"]["augmentation_transforms"].pop(0)["_target_"] == "RandAffined"
    flat = _flat_ids(config)
    differ = {key for key in reference.keys() | flat.keys() if reference.get(key, None) != flat.get(key, None)}
    intended = INTENDED_TRAIN_DIFFERENCES[bundle]
    drifted = sorted(key for key in differ if not any(key == i or key.startswith(i + "#") for i in intended))
    assert not drifted, f"{bundle}/configs/train.json differs from {TRAIN_REFERENCE}'s in {drifted}"


def test_no_subpackage_imports_a_layer_above_it_and_no_two_modules_import_each_other():
    """The subpackages stand in layers (benchmarks/structure.py: labels and options at the bottom, then io and
    transforms, the cascade, runs, training, the command line): an import against them, or two modules importing
    each other, is a tangle that the next change pays for."""
    import subprocess
    import sys

    result = subprocess.run([sys.executable, str(REPO / "benchmarks" / "structure.py")], capture_output=True,
                            text=True, check=True)
    assert "imports against the layers: 0\n" in result.stdout, result.stdout
    assert "pairs of modules importing each other: 0\n" in result.stdout, result.stdout
