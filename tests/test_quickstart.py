"""The whole flow, as the README's main command runs it, shrunk: every stage trained briefly through its own
bundle, the cascade on held-out cases, the FLARE22 evaluation and an overlay per case."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
from PIL import Image

from flare_c2f_extensions.quickstart import QUICK_STAGES, quickstart

from helpers import TINY_CHANNELS, TINY_GRID


def test_quickstart_end_to_end(tmp_path):
    tiny_stages = {
        name: (bundle, {**settings, "spatial_size": TINY_GRID}) for name, (bundle, settings) in QUICK_STAGES.items()
    }
    summary = quickstart(
        out=str(tmp_path), n_train=4, n_test=2, epochs=1, seed=3, shape=(48, 48, 32),
        network={"network_def#channels": TINY_CHANNELS}, stages=tiny_stages,
    )
    assert summary["num_cases"] == 2 and summary["missing_predictions"] == []
    assert len(summary["organs"]) == 13 and 0.0 <= summary["mean_DSC"] <= 1.0
    assert json.loads((tmp_path / "quickstart.json").read_text())["mean_NSD"] == summary["mean_NSD"]
    for bundle, _ in QUICK_STAGES.values():
        assert list((tmp_path / "bundles" / bundle / "models").glob("model*.pt")), bundle
    assert len(list((tmp_path / "bundles" / "flare22_small_refiner" / "models").glob("model_*.pt"))) == 4
    for image in sorted((tmp_path / "data" / "imagesTs").glob("*.nii.gz")):
        case = image.name.replace("_0000.nii.gz", "")
        prediction = nib.load(str(tmp_path / "predictions" / f"{case}.nii.gz"))
        assert prediction.shape == nib.load(str(image)).shape
        png = Image.open(tmp_path / "overlays" / f"{case}.png")
        assert png.mode == "RGB" and png.width > png.height > 0
        assert np.asarray(png).std() > 0
    assert (tmp_path / "evaluation" / "metrics.csv").is_file()
    assert (tmp_path / "predictions" / "efficiency.json").is_file()
