"""The whole flow, as the README's main command runs it, shrunk: every stage trained briefly through its own
bundle, the cascade on held-out cases, the FLARE22 evaluation and an overlay per case; one line per stage on the
terminal, the bundles' logs in a file."""

from __future__ import annotations

import json
import logging

import nibabel as nib
import numpy as np
from PIL import Image

import flare_c2f_extensions
from flare_c2f_extensions.cli.quickstart import LOG_DIR, QUICK_STAGES, logs_to_file, quickstart, training_runs
from flare_c2f_extensions.training.train import STAGES

from helpers import TINY_CHANNELS, TINY_GRID


def test_quickstart_end_to_end(tmp_path, capsys):
    tiny_stages = {
        name: (bundle, {**settings, "spatial_size": TINY_GRID}) for name, (bundle, settings) in QUICK_STAGES.items()
    }
    summary = quickstart(
        out=str(tmp_path), n_train=4, n_test=2, epochs=2, seed=3, shape=(48, 48, 32),
        network={"network_def#channels": TINY_CHANNELS}, stages=tiny_stages, workers=2,
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
        assert png.mode == "RGB" and png.width >= 900 and np.asarray(png).std() > 0
    assert (tmp_path / "evaluation" / "metrics.csv").is_file()
    assert (tmp_path / "predictions" / "segment_report.json").is_file()  # segmented by flare-c2f segment's code


    # the terminal: a line per stage (cohort, 9 trainings, cascade, evaluation, overlays) and the final table only
    terminal = capsys.readouterr().out
    stages = training_runs() + 4
    progress = [line for line in terminal.splitlines() if line.startswith("[")]
    assert len(progress) == stages == 13 and progress[-1].startswith(f"[{stages}/{stages}] draw overlays")
    assert "train refiner gallbladder" in terminal and "Epoch" not in terminal and "train_loss" not in terminal
    # the log files: one per training run (2 epochs each here, flare-c2f train's own) with every iteration, and the
    # quickstart's
    for stage in STAGES:
        log = (tmp_path / "bundles" / stage.bundle / "logs" / f"train_{stage.name}.log").read_text()
        assert "Epoch: 2/2, Iter: 1/" in log and "train_loss" in log, stage.name
        assert (tmp_path / "bundles" / stage.bundle / "logs" / f"train_{stage.name}.done.json").is_file()
    assert "evaluate" in (tmp_path / LOG_DIR / "quickstart.log").read_text()  # the cascade's and evaluation's bars

    # complete, reusable bundles: the printed command segments a new CT with them as they are, with no overrides
    command = next(line for line in terminal.splitlines() if "flare-c2f segment" in line)
    assert f"--bundles_dir {tmp_path / 'bundles'}" in command
    first = sorted((tmp_path / "data" / "imagesTs").glob("*.nii.gz"))[0]
    seg = flare_c2f_extensions.segment(str(first), bundles_dir=str(tmp_path / "bundles"), engine="torch")
    predicted = nib.load(str(tmp_path / "predictions" / first.name.replace("_0000.nii.gz", ".nii.gz")))
    assert np.array_equal(np.asarray(seg.dataobj), np.asarray(predicted.dataobj))
    assert (tmp_path / "bundles" / "flare22_cascade" / "models" / "model.pt").is_file()  # assembled for MONAI
    # trained again (monai.bundle run, MONAI Label from models/model.pt): train.json builds the network it holds
    for bundle, _ in QUICK_STAGES.values():
        config = json.loads((tmp_path / "bundles" / bundle / "configs" / "train.json").read_text())
        assert config["network_def"]["channels"] == TINY_CHANNELS and config["spatial_size"] == TINY_GRID, bundle


def test_logs_to_file_restores_the_terminal(tmp_path, capsys):
    logger = logging.getLogger("flare_c2f_test_logs")
    logger.handlers[:] = [logging.StreamHandler()]  # created before: writes to the terminal's stderr
    logger.propagate = False
    with logs_to_file(tmp_path / "run.log"):
        print("inside print")
        logger.warning("inside log")
        made_inside = logging.getLogger("flare_c2f_test_logs.inner")
        made_inside.addHandler(logging.StreamHandler(__import__("sys").stdout))
        made_inside.propagate = False
        made_inside.warning("inner log")
    print("outside print")
    logger.warning("outside log")
    made_inside.warning("inner outside")
    captured = capsys.readouterr()
    log = (tmp_path / "run.log").read_text()
    assert "inside print" in log and "inside log" in log and "inner log" in log
    assert "inside" not in captured.out.replace("outside", "") and "inside" not in captured.err.replace("outside", "")
    assert "outside print" in captured.out and "outside log" in captured.err and "inner outside" in captured.out
    assert "outside" not in log


def test_cpu_training_network_keeps_the_model_and_its_outputs():
    import torch

    from flare_c2f_extensions.cascade.networks import ResUNetASPP
    from flare_c2f_extensions.cascade.stages import default_amp
    from flare_c2f_extensions.training.train import cpu_training_network

    torch.manual_seed(0)
    plain = ResUNetASPP(spatial_dims=3, in_channels=1, out_channels=3, channels=TINY_CHANNELS)
    wrapped = cpu_training_network(ResUNetASPP(spatial_dims=3, in_channels=1, out_channels=3, channels=TINY_CHANNELS))
    wrapped.load_state_dict(plain.state_dict())
    assert wrapped.state_dict().keys() == plain.state_dict().keys()
    conv_weights = [p for p in wrapped.parameters() if p.dim() == 5]
    assert conv_weights and all(p.is_contiguous(memory_format=torch.channels_last_3d) for p in conv_weights)
    x = torch.rand(2, 1, *TINY_GRID)
    expected, got = plain(x), wrapped(x)
    assert got.dtype == torch.float32 and got.shape == expected.shape
    tolerance = 0.1 if default_amp(torch.device("cpu")) else 1e-4  # bf16 rounding where the CPU runs bf16
    assert (got - expected).abs().max() < tolerance * expected.abs().max()
    got.sum().backward()
    assert all(p.grad is not None for p in wrapped.parameters() if p.requires_grad)
