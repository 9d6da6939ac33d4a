"""The quickstart: from nothing to evaluated segmentations on a generated cohort, on the CPU, in minutes.

It drives the bundles exactly as a user would (their own configs, small networks by override), so it is
also the smallest end-to-end check of the product.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import torch

BUNDLES = Path(__file__).resolve().parents[1] / "bundles"

# Small networks and grids for a CPU run; every value is an ordinary config override.
QUICK_NETWORK = {"spatial_size": [64, 64, 64], "network_def#channels": [8, 16, 16, 32, 32]}


def run_bundle(bundle: str, configs, workflow_type, bundle_root, bundles_dir=BUNDLES, **overrides):
    """Initialise, check, run and finalise a bundle's ``ConfigWorkflow`` (configs overlay left to right)."""
    from monai.bundle import ConfigWorkflow

    config_dir = Path(bundles_dir) / bundle / "configs"
    names = [configs] if isinstance(configs, str) else list(configs)
    workflow = ConfigWorkflow(
        config_file=[str(config_dir / name) for name in names],
        meta_file=str(config_dir / "metadata.json"),
        logging_file=str(config_dir / "logging.conf"),
        workflow_type=workflow_type,
        bundle_root=str(bundle_root),
        **overrides,
    )
    workflow.initialize()
    missing = workflow.check_properties()
    if missing:
        raise RuntimeError(f"{bundle}: config lacks required properties {missing}")
    workflow.run()
    workflow.finalize()
    return workflow


def quickstart(out: str = "./quickstart", n_train: int = 8, n_test: int = 2, epochs: int = 40, seed: int = 0, shape=(96, 96, 64)) -> dict:
    """Generate a cohort, train the coarse stage briefly, segment the held-out cases, evaluate them."""
    from .metrics import evaluate_folder, format_summary
    from .phantom import write_cohort

    out = Path(out)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    logging.getLogger("ignite").setLevel(logging.WARNING)
    started = time.perf_counter()
    data = out / "data"
    if not (data / "imagesTr").is_dir():
        write_cohort(data, n=n_train, n_test=n_test, seed=seed, shape=tuple(shape))
    common = {"dataset_dir": str(data), "num_workers": 0, "device": "cpu", **QUICK_NETWORK}
    coarse = out / "flare22_coarse"
    run_bundle(
        "flare22_coarse", "train.json", "train", coarse,
        num_val=max(1, n_train // 4), batch_size=2, max_epochs=epochs, val_interval=max(1, epochs // 4),
        learning_rate=0.003, **common,
    )
    predictions = out / "predictions"
    run_bundle("flare22_coarse", "inference.json", "infer", coarse, output_dir=str(predictions), image_subdir="imagesTs", **common)
    summary = evaluate_folder(str(predictions), str(data / "labelsTs"), str(out / "evaluation"))
    summary["seconds"] = round(time.perf_counter() - started, 1)
    print(format_summary(summary))
    print(f"quickstart finished in {summary['seconds']} s; outputs in {out}")
    (out / "quickstart.json").write_text(json.dumps(summary, indent=4) + "\n")
    return summary
