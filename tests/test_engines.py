"""Engines: choosing one, the OpenVINO cache keyed by the checkpoint, and the same label maps from both engines
with briefly trained tiny networks (also on an oblique copy of a case); the huge-input refusal."""

from __future__ import annotations

import sys

import nibabel as nib
import numpy as np
import openvino  # noqa: E402,F401  (a dependency: the engine tests must not skip)
import pytest
import torch

from flare_c2f_extensions.cascade import engines
from flare_c2f_extensions.cascade.pipeline import Cascade, check_voxel_count
from flare_c2f_extensions.cascade.stages import coarse_amp, load_stage
from flare_c2f_extensions.cli.quickstart import QUICK_NETWORK, QUICK_STAGES, train_stages
from flare_c2f_extensions.errors import InputError
from flare_c2f_extensions.evaluation.metrics import organ_scores
from flare_c2f_extensions.labels import GROUPS

from helpers import BUNDLES, TINY_CHANNELS, TINY_GRID, TINY_STAGES

TINY_NET = {"network_def#channels": TINY_CHANNELS}
TRAINED = ("coarse", "solid", "digestive", "vessels")  # the big-organ cascade: four stages, about a minute


@pytest.fixture(autouse=True)
def engine_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FLARE_C2F_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_auto_takes_openvino_on_a_cpu_and_torch_elsewhere():
    assert engines.resolve_engine("auto", "cpu") == "openvino"
    assert engines.resolve_engine(None, "cpu") == "openvino"
    assert engines.resolve_engine("auto", "cuda") == "torch"
    assert engines.resolve_engine("torch", "cpu") == "torch"


def test_auto_keeps_torch_for_a_stage_without_weights(tmp_path):
    assert _coarse(tmp_path / "no_weights", engine="auto", require_weights=False).engine is None  # torch
    _coarse_checkpoint(tmp_path / "stage" / "models" / "model.pt", seed=1)
    assert _coarse(tmp_path / "stage", engine="auto").engine.name == "openvino"


def test_openvino_missing_or_on_a_gpu_is_a_clear_error(monkeypatch):
    with pytest.raises(engines.EngineError, match="CPU only"):
        engines.resolve_engine("openvino", "cuda")
    with pytest.raises(engines.EngineError, match="unknown engine 'onnx'"):
        engines.resolve_engine("onnx", "cpu")
    monkeypatch.setitem(sys.modules, "openvino", None)  # as if not installed: import raises ImportError
    assert engines.resolve_engine("auto", "cpu") == "torch"
    with pytest.raises(engines.EngineError, match="pip install"):
        engines.resolve_engine("openvino", "cpu")


def _coarse_checkpoint(path, seed):
    from flare_c2f_extensions.cascade.networks import ResUNetASPP

    torch.manual_seed(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(ResUNetASPP(out_channels=14, channels=TINY_CHANNELS).state_dict(), path)
    return path


def _coarse(root, engine="openvino", require_weights=True):
    overrides = {"bundle_root": str(root), "spatial_size": TINY_GRID, **TINY_NET}
    stage_dir = BUNDLES / "flare22_coarse"
    return load_stage("coarse", stage_dir, "cpu", overrides, engine=engine, amp=False, require_weights=require_weights)


def test_openvino_model_is_cached_by_checkpoint_and_never_stale(tmp_path, engine_cache):
    checkpoint = _coarse_checkpoint(tmp_path / "stage" / "models" / "model.pt", seed=1)
    x = torch.rand(1, 32, 32, 32)
    first = _coarse(tmp_path / "stage")
    assert first.network is None and first.engine is not None
    cached = sorted(p.parent.name for p in (engine_cache / "openvino").glob("*/model.xml"))
    assert len(cached) == 1
    again = _coarse(tmp_path / "stage")  # from the cache: the same IR, nothing new written
    assert sorted(p.parent.name for p in (engine_cache / "openvino").glob("*/model.xml")) == cached
    assert torch.equal(first.predict(x, False), again.predict(x, False))

    _coarse_checkpoint(checkpoint, seed=2)  # retrained: same path, other weights
    changed = _coarse(tmp_path / "stage")
    assert len(list((engine_cache / "openvino").glob("*/model.xml"))) == 2
    reference = _coarse(tmp_path / "stage", engine="torch").predict(x, False)
    assert torch.allclose(changed.predict(x, False), reference, atol=1e-4)
    assert not torch.allclose(first.predict(x, False), reference, atol=1e-3)


def test_cache_key_follows_the_checkpoint_bytes_grid_and_network(tmp_path):
    checkpoint = _coarse_checkpoint(tmp_path / "a.pt", seed=1)
    key = engines.openvino_cache_key(checkpoint, {"channels": [4, 8]}, (32, 32, 32))
    assert key == engines.openvino_cache_key(checkpoint, {"channels": [4, 8]}, (32, 32, 32))
    assert key != engines.openvino_cache_key(checkpoint, {"channels": [4, 8]}, (48, 48, 48))
    assert key != engines.openvino_cache_key(checkpoint, {"channels": [4, 16]}, (32, 32, 32))
    with open(checkpoint, "r+b") as handle:  # one byte of the weights changed
        handle.seek(-20, 2)
        byte = handle.read(1)
        handle.seek(-20, 2)
        handle.write(bytes([byte[0] ^ 1]))
    assert key != engines.openvino_cache_key(checkpoint, {"channels": [4, 8]}, (32, 32, 32))


@pytest.fixture(scope="module")
def trained(cohort, tmp_path_factory):
    """The four big-organ stages trained briefly through their bundles (tiny networks, 32^3)."""
    epochs = {"coarse": 25, "solid": 10, "digestive": 10, "vessels": 10}
    stages = {n: (QUICK_STAGES[n][0], {"spatial_size": [32, 32, 32], "max_epochs": epochs[n]}) for n in TRAINED}
    return train_stages(cohort, tmp_path_factory.mktemp("trained"), QUICK_NETWORK, stages)


def _oblique_copy(image, folder):
    """The same voxels with a rotated affine (15 degrees about z): an oblique acquisition."""
    source = nib.load(str(image))
    angle = np.deg2rad(15)
    rotation = np.eye(4)
    rotation[:2, :2] = [[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]]
    path = folder / "oblique_0000.nii.gz"
    nib.save(nib.Nifti1Image(np.asarray(source.dataobj), rotation @ source.affine), str(path))
    return path


def test_openvino_and_torch_give_the_same_label_maps(trained, cohort, tmp_path):
    cascades = {
        engine: Cascade.from_bundles(BUNDLES, device="cpu", stage_overrides=trained, small_organs=[], engine=engine)
        for engine in ("torch", "openvino")
    }
    assert {c.engine for c in cascades.values()} == {"torch", "openvino"}
    images = sorted((cohort / "imagesTs").glob("*.nii.gz"))
    labels = sorted((cohort / "labelsTs").glob("*.nii.gz"))
    big = [o for group in ("solid", "digestive", "vessels") for o in GROUPS[group]]
    for image, label in zip(images + [_oblique_copy(images[0], tmp_path)], labels + [labels[0]]):
        maps = {engine: cascade.segment(image).labels for engine, cascade in cascades.items()}
        agreement = float(np.mean(maps["torch"] == maps["openvino"]))
        assert agreement >= 0.999, f"{image.name}: {agreement:.5f} of voxels agree"
        truth = np.asarray(nib.load(str(label)).dataobj)
        spacing = nib.load(str(label)).header.get_zooms()[:3]
        dsc = {e: np.mean([s[0] for s in organ_scores(m, truth, spacing, big).values()]) for e, m in maps.items()}
        # a minute of training finds the liver and the spleen: enough that agreeing is not agreeing on background
        assert len(np.unique(maps["torch"])) >= 3 and np.mean(maps["torch"] > 0) > 0.01, np.unique(maps["torch"])
        assert abs(dsc["torch"] - dsc["openvino"]) <= 0.002


def test_coarse_stage_runs_in_f32_on_a_cpu_under_mixed_precision(cohort):
    """Its argmax places every box: bf16 rounding there would move boxes between engines (coarse_amp)."""
    assert not coarse_amp(True, torch.device("cpu")) and coarse_amp(True, torch.device("cuda"))
    assert not coarse_amp(False, torch.device("cuda"))
    torch.manual_seed(0)
    options = dict(device="cpu", amp=True, stage_overrides=TINY_STAGES, require_weights=False, small_organs=[])
    cascade = Cascade.from_bundles(BUNDLES, engine="torch", **options)
    seen = {}
    for stage in [cascade.coarse, *cascade.groups]:
        first = next(m for m in stage.network.modules() if isinstance(m, torch.nn.Conv3d))
        first.register_forward_hook(lambda module, args, out, name=stage.name: seen.update({name: out.dtype}))
    cascade.segment(sorted((cohort / "imagesTs").glob("*.nii.gz"))[0])
    assert seen == {"coarse": torch.float32, "solid": torch.bfloat16, "digestive": torch.bfloat16,
                    "vessels": torch.bfloat16}
    compiled = Cascade.from_bundles(BUNDLES, engine="openvino", **options).coarse.engine.compiled
    assert compiled.get_property("INFERENCE_PRECISION_HINT") == openvino.Type.f32


def test_an_input_over_the_voxel_limit_is_refused_from_its_header(tmp_path):
    path = tmp_path / "huge_0000.nii"
    header = nib.Nifti1Header()
    header.set_data_dtype(np.int16)
    header.set_data_shape((1024, 1024, 600))
    with open(path, "wb") as handle:  # a sparse file of the full size: no disk used, 1.2 GB if it were read
        handle.write(header.binaryblock + b"\0" * 4)
        handle.truncate(352 + 1024 * 1024 * 600 * 2)
    with pytest.raises(InputError, match=r"1024x1024x600 = 629145600 voxels, more than the cascade's limit"):
        check_voxel_count(path, 1024 * 1024 * 512)
    check_voxel_count(path, None)  # no limit: nothing checked


def test_the_cascade_checks_the_limit_before_reading(cohort, monkeypatch):
    from flare_c2f_extensions.cascade import pipeline as cascade_module

    def read_ct(*args, **kwargs):
        raise AssertionError("the voxels were read")

    monkeypatch.setattr(cascade_module, "read_ct", read_ct)
    image = sorted((cohort / "imagesTs").glob("*.nii.gz"))[0]
    expected = f"{image.name}: 48x48x32 = 73728 voxels, more than the cascade's limit of 1000"
    with pytest.raises(InputError, match=expected):
        Cascade(None, [], None, [], max_voxels=1000).segment(image)
