"""One answer whatever the thread count: the default CPU engine (OpenVINO) gives bitwise the same logits and label
maps with 1 and 2 inference threads, in f32 and bf16, from a freshly converted model and from the cache; two
``torchrun`` ranks write what one process with every core writes."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import nibabel as nib
import numpy as np
import openvino  # noqa: F401  (a dependency: these tests must not skip)
import pytest
import torch

from flare_c2f_extensions.cascade import engines
from flare_c2f_extensions.cascade.networks import ResUNetASPP
from flare_c2f_extensions.cascade.pipeline import Cascade
from flare_c2f_extensions.cascade.stages import default_amp, load_stage

from helpers import BUNDLES, CLI_TIMEOUT_S, REPO, TINY_CHANNELS, TINY_GRID, TINY_STAGES

SOLID = "liver,right_kidney,spleen,left_kidney"  # two stages (coarse, solid); liver alone hides the near-ties


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



def test_sharded_segment_equals_one_process_with_every_core(cohort, tmp_path, threads):
    """Two ``torchrun`` ranks (a thread each) against one process with every core (the default thread count; run in
    this process, as ``flare-c2f segment`` runs it, to spare a start-up)."""
    from flare_c2f_extensions.runs.segment import run_segment

    images = tmp_path / "images"  # two cases: one a rank
    images.mkdir()
    for image in sorted((cohort / "imagesTr").glob("*.nii.gz"))[:2]:
        (images / image.name).symlink_to(image)
    cores = len(os.sched_getaffinity(0))
    report = run_segment(str(images), str(tmp_path / "one"), device="cpu", threads=cores, engine="openvino",
                         require_weights=False, organs=SOLID, stage_overrides=TINY_STAGES, progress=False)
    assert report["threads"] == cores and report["engine"] == "openvino" and report["thread_invariant"] is True
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               "--log-dir", str(tmp_path / "logs"), "--redirects", "3", "-m", "flare_c2f_extensions", "segment",
               "-i", str(images), "-o", str(tmp_path / "two"), "--device", "cpu", "--engine", "openvino",
               "--require_weights", "false", "--organs", SOLID, "--stage_overrides", json.dumps(TINY_STAGES)]
    two = subprocess.run(command, capture_output=True, text=True, timeout=CLI_TIMEOUT_S, env=env)
    errors = "\n".join(p.read_text()[-3000:] for p in (tmp_path / "logs").rglob("stderr.log"))
    assert two.returncode == 0, two.stderr[-3000:] + errors
    sharded = json.loads((tmp_path / "two" / "segment_report.json").read_text())
    assert sharded["world_size"] == 2 and [rank["threads"] for rank in sharded["ranks"]] == [max(1, cores // 2)] * 2
    written = sorted(p.name for p in (tmp_path / "one").glob("FLARE22_*.nii.gz"))
    assert written == sorted(p.name for p in (tmp_path / "two").glob("FLARE22_*.nii.gz")) and len(written) == 2
    for name in written:
        expected = np.asarray(nib.load(str(tmp_path / "one" / name)).dataobj)
        got = np.asarray(nib.load(str(tmp_path / "two" / name)).dataobj)
        assert expected.any() and np.mean(expected == got) == 1.0, f"{name}: {np.mean(expected == got):.6f} agree"
