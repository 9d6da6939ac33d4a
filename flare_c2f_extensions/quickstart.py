"""The quickstart: from nothing to evaluated cascade segmentations of a generated cohort, on the CPU.

It drives every bundle as a user would (their own train configs, small networks and grids by override),
then runs the cascade bundle's machinery on held-out cases, scores them with the FLARE22 metrics and writes a
PNG overlay per case. It is also the smallest end-to-end check of the product.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from .paths import BUNDLES_DIR, STAGE_BUNDLES
from .labels import GROUPS, ORGANS

# Training overrides of every stage for a quick CPU run (ordinary config overrides). A high learning rate and
# small grids let each stage learn in about a minute on two cores.
QUICK_STAGES = {
    name: (STAGE_BUNDLES[name], settings)
    for name, settings in {
        "coarse": {"spatial_size": [48, 48, 48], "max_epochs": 60},
        "solid": {"spatial_size": [48, 48, 48], "max_epochs": 40},
        "digestive": {"spatial_size": [48, 48, 48], "max_epochs": 40},
        "vessels": {"spatial_size": [48, 48, 48], "max_epochs": 40},
        "locator": {"spatial_size": [48, 48, 48], "max_epochs": 40},
        "refiner": {"spatial_size": [32, 32, 32], "max_epochs": 40},
    }.items()
}
QUICK_NETWORK = {"network_def#channels": [8, 16, 32, 32, 64]}
# Elastic deformation (sigma 3 to 5, magnitude 100 to 200) crushes the small organs of 48^3 grids and halves
# what a minute of training learns, so the quickstart leaves it out.
QUICK_TRAINING = {"device": "cpu", "num_workers": 0, "batch_size": 2, "learning_rate": 0.01, "elastic_prob": 0.0}


def bundle_workflow(bundle: str, configs, workflow_type, bundle_root, bundles_dir=BUNDLES_DIR, **overrides):
    """A ``ConfigWorkflow`` of ``bundles_dir/<bundle>`` with ``configs`` (one name or a list, later ones overlay)."""
    from monai.bundle import ConfigWorkflow

    config_dir = Path(bundles_dir) / bundle / "configs"
    names = [configs] if isinstance(configs, str) else list(configs)
    return ConfigWorkflow(
        config_file=[str(config_dir / name) for name in names],
        meta_file=str(config_dir / "metadata.json"),
        logging_file=str(config_dir / "logging.conf"),
        workflow_type=workflow_type,
        bundle_root=str(bundle_root),
        **overrides,
    )


def run_bundle(bundle: str, configs, workflow_type, bundle_root, bundles_dir=BUNDLES_DIR, **overrides):
    """Initialise, check, run and finalise a bundle's ``ConfigWorkflow`` (configs overlay left to right)."""
    workflow = bundle_workflow(bundle, configs, workflow_type, bundle_root, bundles_dir, **overrides)
    workflow.initialize()
    missing = workflow.check_properties()
    if missing:
        raise RuntimeError(f"{bundle}: config lacks required properties {missing}")
    workflow.run()
    workflow.finalize()
    return workflow


def train_stages(data: Path, out: Path, network: dict, stages=QUICK_STAGES, bundles_dir=BUNDLES_DIR, epochs=None) -> dict:
    """Train every stage briefly through its bundle's train.json; returns the cascade's stage overrides.

    ``epochs`` (if given) replaces every stage's ``max_epochs``.
    """
    n_cases = len(list((data / "imagesTr").glob("*.nii.gz")))
    common = {"dataset_dir": str(data), "num_val": max(1, n_cases // 5), **QUICK_TRAINING, **network}
    stage_overrides = {}
    for name, (bundle, settings) in stages.items():
        settings = dict(settings, **({"max_epochs": epochs} if epochs else {}))
        settings["val_interval"] = settings["max_epochs"]
        root = out / bundle
        organs = [ORGANS[o] for o in GROUPS["small"]] if name == "refiner" else [None]
        for organ in organs:
            extra = {"organ": organ} if organ else {}
            started = time.perf_counter()
            run_bundle(bundle, "train.json", "train", root, bundles_dir, **common, **settings, **extra)
            print(f"trained {name}{' ' + organ if organ else ''} in {time.perf_counter() - started:.0f} s")
        grid = {"spatial_size": settings["spatial_size"]}
        stage_overrides[name] = {"bundle_root": str(root), **grid, **network}
    return stage_overrides


def quickstart(
    out: str = "./quickstart",
    n_train: int = 10,
    n_test: int = 2,
    epochs: int | None = None,
    seed: int = 0,
    shape=(96, 96, 64),
    network: dict | None = None,
    stages: dict | None = None,
) -> dict:
    """Generate a cohort, train every stage briefly, segment the held-out cases with the cascade, evaluate them,
    and draw an overlay per case. Returns the evaluation summary (with the wall time)."""
    from .cascade import Cascade, CascadeRunner
    from .data import find_images
    from .metrics import evaluate_folder, format_summary
    from .overlay import save_overlay
    from .phantom import write_cohort

    out = Path(out)
    logging.getLogger("ignite").setLevel(logging.WARNING)
    started = time.perf_counter()
    data = out / "data"
    if not (data / "imagesTs").is_dir():
        write_cohort(data, n=n_train, n_test=n_test, seed=seed, shape=tuple(shape))
    network = QUICK_NETWORK if network is None else network
    stage_overrides = train_stages(data, out / "bundles", network, stages or QUICK_STAGES, epochs=epochs)

    predictions = out / "predictions"
    cascade = Cascade.from_bundles(BUNDLES_DIR, device="cpu", stage_overrides=stage_overrides)
    CascadeRunner(cascade, find_images(data, "imagesTs"), predictions, overwrite=True).run()
    summary = evaluate_folder(str(predictions), str(data / "labelsTs"), str(out / "evaluation"))
    for image in sorted((data / "imagesTs").glob("*.nii.gz")):
        case = image.name.replace("_0000.nii.gz", "")
        save_overlay(image, predictions / f"{case}.nii.gz", out / "overlays" / f"{case}.png")
    summary["seconds"] = round(time.perf_counter() - started, 1)
    print(format_summary(summary))
    print(f"quickstart finished in {summary['seconds']} s; predictions, evaluation and overlays in {out}")
    (out / "quickstart.json").write_text(json.dumps(summary, indent=4) + "\n")
    return summary
