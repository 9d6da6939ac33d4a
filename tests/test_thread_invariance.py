"""One answer whatever the thread count: the default CPU engine (OpenVINO) gives bitwise the same logits and label
maps with 1 and 2 inference threads, in f32 and bf16, from a freshly converted model and from the cache."""

from __future__ import annotations

import numpy as np
import openvino  # noqa: F401  (a dependency: these tests must not skip)
import pytest
import torch

from flare_c2f_extensions import engines
from flare_c2f_extensions.cascade import Cascade
from flare_c2f_extensions.networks import ResUNetASPP
from flare_c2f_extensions.stages import default_amp, load_stage

from helpers import BUNDLES, TINY_CHANNELS, TINY_GRID, TINY_STAGES

BIG_ORGANS = ("coarse", "solid", "digestive", "vessels")


@pytest.fixture(autouse=True)
def engine_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FLARE_C2F_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture
def threads():
    """Sets torch's thread count, which OpenVINO's INFERENCE_NUM_THREADS follows; restored afterwards."""
    before = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(before)


def _checkpoint(path, out_channels, seed):
    torch.manual_seed(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(ResUNetASPP(out_channels=out_channels, channels=TINY_CHANNELS).state_dict(), path)
    return path


@pytest.mark.parametrize("amp", [False, True], ids=["f32", "bf16-where-native"])
def test_openvino_logits_are_the_same_for_one_and_two_threads(tmp_path, threads, amp):
    checkpoint = _checkpoint(tmp_path / "coarse.pt", 14, seed=3)
    overrides = {"spatial_size": TINY_GRID, "network_def#channels": TINY_CHANNELS, "ckpt_path": str(checkpoint)}
    x = torch.rand(1, *TINY_GRID, generator=torch.Generator().manual_seed(0))
    probs = {}
    for n in (1, 2, 1):  # converted, then from the cache at 2 threads, then at 1 again
        threads(n)
        stage = load_stage("coarse", BUNDLES / "flare22_coarse", "cpu", overrides, engine="openvino", amp=amp)
        assert stage.engine.compiled.get_property("INFERENCE_NUM_THREADS") == n
        probs.setdefault(n, []).append(stage.predict(x, amp))
    assert torch.equal(probs[1][0], probs[1][1])
    difference = (probs[1][0] - probs[2][0]).abs().max().item()
    assert torch.equal(probs[1][0], probs[2][0]), f"1 against 2 threads: up to {difference:.2e} apart"


def test_every_norm_of_a_converted_network_runs_on_a_planar_view():
    model = engines._convert(ResUNetASPP(out_channels=3, channels=TINY_CHANNELS).eval(), TINY_GRID)
    norms = [op for op in model.get_ordered_ops() if op.get_type_name() == "MVN"]
    assert len(norms) == 30  # three in each of the ten residual blocks
    assert {len(op.get_output_shape(0)) for op in norms} == {3}  # (N, C, voxels)
    assert engines.fixed_order_norms(model) == 0  # nothing left to rewrite


def test_default_cascade_label_maps_are_the_same_for_one_and_two_threads(cohort, tmp_path, threads):
    torch.manual_seed(0)  # random tiny weights as checkpoints: the default engine (auto) takes OpenVINO for them
    random = Cascade.from_bundles(BUNDLES, device="cpu", stage_overrides=TINY_STAGES, require_weights=False,
                                  small_organs=[], engine="torch")
    overrides = {}
    for stage in [random.coarse, *random.groups]:
        path = tmp_path / "weights" / f"{stage.name}.pt"
        path.parent.mkdir(exist_ok=True)
        torch.save(stage.network.state_dict(), path)
        overrides[stage.name] = {**TINY_STAGES[stage.name], "ckpt_path": str(path)}
    maps = {}
    for n in (1, 2):
        threads(n)
        cascade = Cascade.from_bundles(BUNDLES, device="cpu", stage_overrides=overrides, small_organs=[])
        assert cascade.engine == "openvino" and cascade.amp == default_amp(torch.device("cpu"))
        maps[n] = cascade.segment(sorted((cohort / "imagesTs").glob("*.nii.gz"))[0]).labels
    assert len(np.unique(maps[1])) > 2  # random weights: many labels, near-ties everywhere
    assert np.mean(maps[1] == maps[2]) == 1.0, f"{np.mean(maps[1] == maps[2]):.6f} of voxels agree"

