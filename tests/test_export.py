"""Exported networks: TorchScript (monai.bundle ckpt_export) and ONNX (monai.bundle onnx_export) for every
bundle's network, each against PyTorch on a random input; the cascade from TorchScript stages."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import onnxruntime
import onnxscript  # noqa: F401  (the test extra installs onnx, onnxscript and onnxruntime; ONNX export needs it)
import pytest
import torch

from flare_c2f_extensions.cascade.export import export_checkpoint
from flare_c2f_extensions.cascade.pipeline import Cascade
from flare_c2f_extensions.labels import GROUPS, ORGANS
from flare_c2f_extensions.paths import STAGE_BUNDLES

from helpers import BUNDLES, TINY_CHANNELS, TINY_GRID

TINY = {"network_def#channels": TINY_CHANNELS, "spatial_size": TINY_GRID}
STAGES = STAGE_BUNDLES  # cascade stage -> bundle
REFINER_ORGANS = [ORGANS[label] for label in GROUPS["small"]]
TS_TOLERANCE = 1e-5  # same kernels: expected 0
ONNX_TOLERANCE = 1e-3  # onnxruntime's kernels sum in another order: about 2e-5 seen on tiny networks
PAPER_ONNX_TOLERANCE = 1e-2  # about 5e-4 seen at 128^3 and 2e-3 at 160^3 on paper-size networks (logits ~10)




def _network(bundle: str, overrides: dict):
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(BUNDLES / bundle / "configs" / "inference.json"))
    for key, value in overrides.items():
        parser[key] = value
    return parser.get_parsed_content("network_def")


@pytest.fixture(scope="module")
def bundles(tmp_path_factory):
    """A copy of the bundles with tiny random-weight checkpoints in every trainable bundle's models/."""
    root = tmp_path_factory.mktemp("bundles")
    for bundle in [*STAGES.values(), "flare22_cascade"]:
        shutil.copytree(BUNDLES / bundle, root / bundle, ignore=shutil.ignore_patterns("eval", "*.pt", "*.ts"))
    torch.manual_seed(0)
    for stage, bundle in STAGES.items():
        files = [f"model_{o}.pt" for o in REFINER_ORGANS] if stage == "refiner" else ["model.pt"]
        for name in files:
            torch.save(_network(bundle, TINY).state_dict(), root / bundle / "models" / name)
    return root


def _checkpoint(bundles, bundle):
    return bundles / bundle / "models" / ("model_gallbladder.pt" if bundle == "flare22_small_refiner" else "model.pt")


@pytest.mark.parametrize("bundle", list(STAGES.values()))
def test_exports_match_pytorch(bundle, bundles):
    result = export_checkpoint(bundles / bundle, _checkpoint(bundles, bundle), overrides=TINY)  # into models/
    print(json.dumps({k: result[k] for k in ("bundle", "max_abs_logit", "ts_max_abs_diff", "onnx_max_abs_diff")}))
    assert result["max_abs_logit"] > 0.1  # a real signal to compare
    assert result["ts_max_abs_diff"] <= TS_TOLERANCE
    assert result["onnx_max_abs_diff"] <= ONNX_TOLERANCE


def test_monai_command_lines_export_the_coarse_network(bundles, tmp_path):
    """The user's commands: ``python -m monai.bundle ckpt_export`` / ``onnx_export`` with tiny overrides."""
    root = bundles / "flare22_coarse"
    common = [
        "--ckpt_file", str(root / "models" / "model.pt"), "--meta_file", str(root / "configs" / "metadata.json"),
        "--config_file", str(root / "configs" / "inference.json"), "--bundle_root", str(root),
        "--input_shape", "[1, 1, 32, 32, 32]", "--network_def#channels", json.dumps(TINY_CHANNELS),
    ]
    ts, onnx_file = tmp_path / "model.ts", tmp_path / "model.onnx"
    for command, path, extra in (("ckpt_export", ts, []), ("onnx_export", onnx_file, [])):  # scripted, no --use_trace
        done = subprocess.run(
            [sys.executable, "-m", "monai.bundle", command, "network_def", "--filepath", str(path), *common, *extra],
            capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"},
        )
        assert done.returncode == 0, done.stderr[-3000:]
        assert path.is_file()
    network = _network("flare22_coarse", TINY)
    network.load_state_dict(torch.load(root / "models" / "model.pt", weights_only=True))
    x = torch.rand(1, 1, *TINY_GRID, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        reference = network.eval()(x)
        assert (torch.jit.load(str(ts))(x) - reference).abs().max() <= TS_TOLERANCE
    session = onnxruntime.InferenceSession(str(onnx_file), providers=["CPUExecutionProvider"])
    output = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    assert (torch.from_numpy(output) - reference).abs().max() <= ONNX_TOLERANCE


@pytest.mark.parametrize("bundle", list(STAGES.values()))
def test_plain_ckpt_export_scripts_every_stage(bundle, bundles, tmp_path):
    """``monai.bundle ckpt_export`` in its default mode (``torch.jit.script``, as the model zoo's CI runs it)."""
    from monai.bundle import ckpt_export

    root = bundles / bundle
    path = tmp_path / "model.ts"
    ckpt_export(
        net_id="network_def", filepath=str(path), ckpt_file=str(_checkpoint(bundles, bundle)),
        meta_file=str(root / "configs" / "metadata.json"), config_file=str(root / "configs" / "inference.json"),
        bundle_root=str(root), input_shape=[1, 1, *TINY_GRID], **{"network_def#channels": TINY_CHANNELS},
    )
    module = torch.jit.load(str(path))
    assert isinstance(module, torch.jit.ScriptModule)
    network = _network(bundle, TINY)
    network.load_state_dict(torch.load(_checkpoint(bundles, bundle), weights_only=True))
    x = torch.rand(1, 1, 48, 32, 64, generator=torch.Generator().manual_seed(2))  # scripted: any divisible grid
    with torch.no_grad():
        assert (module(x) - network.eval()(x)).abs().max() <= TS_TOLERANCE
    with pytest.raises(torch.jit.Error, match="must be divisible by 16"):
        module(torch.rand(1, 1, 30, 32, 32))


def test_torchscript_module_carries_metadata_and_loads_with_monai(bundles, tmp_path):
    from monai.bundle import load

    bundle = bundles / "flare22_coarse"
    if not (bundle / "models" / "model.ts").is_file():  # exported by test_exports_match_pytorch
        export_checkpoint(bundle, _checkpoint(bundles, "flare22_coarse"), ["ts"], overrides=TINY, check=False)
    module, meta, extra = load(
        name="flare22_coarse", bundle_dir=str(bundles), load_ts_module=True, device="cpu",
        config_files=["inference.json"],
    )
    assert meta["version"] == json.loads((bundle / "configs" / "metadata.json").read_text())["version"]
    assert "network_def" in json.loads(extra["inference.json"])
    assert module(torch.rand(1, 1, *TINY_GRID)).shape == (1, 14, *TINY_GRID)


def test_paper_size_network_exports(bundles, tmp_path):
    """The coarse bundle as configured: paper-width ResUNet-ASPP (15.2 M parameters) on its 128^3 grid."""
    bundle = tmp_path / "flare22_coarse"
    shutil.copytree(bundles / "flare22_coarse", bundle, ignore=shutil.ignore_patterns("*.pt", "*.ts", "*.onnx"))
    torch.manual_seed(0)
    torch.save(_network("flare22_coarse", {}).state_dict(), bundle / "models" / "model.pt")
    result = export_checkpoint(bundle, bundle / "models" / "model.pt", out_dir=tmp_path)
    assert result["input_shape"] == [1, 1, 128, 128, 128]
    keys = ("bundle", "input_shape", "max_abs_logit", "ts_max_abs_diff", "onnx_max_abs_diff")
    print(json.dumps({k: result[k] for k in keys}))
    assert result["ts_max_abs_diff"] <= TS_TOLERANCE
    assert result["onnx_max_abs_diff"] <= PAPER_ONNX_TOLERANCE


def _stage_overrides(ts: bool) -> dict:
    overrides = {stage: {"network_def": {"channels": TINY_CHANNELS}, "spatial_size": TINY_GRID} for stage in STAGES}
    if ts:
        for stage in STAGES:
            if stage == "refiner":
                overrides[stage]["model_file"] = "$'model_' + @organ_name + '.ts'"
            else:
                overrides[stage]["ckpt_path"] = "$@ckpt_dir + '/model.ts'"
    return overrides


@pytest.mark.parametrize("amp", [False, True], ids=["fp32", "bf16_autocast"])
def test_cascade_from_torchscript_stages_gives_the_same_labels(amp, bundles, cohort):
    for stage, bundle in STAGES.items():
        for checkpoint in sorted((bundles / bundle / "models").glob("*.pt")):
            if not checkpoint.with_suffix(".ts").is_file():  # most exported by test_exports_match_pytorch
                export_checkpoint(bundles / bundle, checkpoint, ["ts"], overrides=TINY, check=False)
    pytorch = Cascade.from_bundles(bundles, device="cpu", amp=amp, stage_overrides=_stage_overrides(False),
                                   engine="torch")
    scripted = Cascade.from_bundles(bundles, device="cpu", amp=amp, stage_overrides=_stage_overrides(True))  # auto
    stages = [scripted.coarse, *scripted.groups, scripted.locator, *scripted.refiners]
    assert all(isinstance(s.network, torch.jit.ScriptModule) for s in stages)
    assert not any(isinstance(s.network, torch.jit.ScriptModule) for s in [pytorch.coarse, *pytorch.groups])
    assert all(s.engine is None for s in stages)  # auto leaves an exported TorchScript module to torch
    ran = 0
    for image in sorted((cohort / "imagesTs").glob("*.nii.gz")):
        expected, got = pytorch.segment(image), scripted.segment(image)
        assert got.skipped == expected.skipped
        assert (got.labels == expected.labels).all()
        assert len(set(expected.labels.flat)) > 2  # random weights still label several organs
        ran += 7 - len(expected.skipped)  # of the 3 group stages and 4 refiners, those that ran
    assert ran > 0


def test_missing_torchscript_module_is_a_clear_error(bundles):
    from flare_c2f_extensions.cascade.stages import load_stage
    from flare_c2f_extensions.errors import InputError

    with pytest.raises(InputError, match="no TorchScript module for the coarse stage"):
        load_stage("coarse", bundles / "flare22_coarse", "cpu", {"ckpt_path": str(bundles / "nowhere.ts")})
