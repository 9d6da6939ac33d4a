"""Several GPUs and machines: ``configs/multi_gpu_train.json`` of every trainable bundle, and a real ``torchrun``
launch of two CPU processes (gloo) training a tiny coarse bundle."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from collections import defaultdict

import pytest
import torch

from flare_c2f_extensions.paths import STAGE_BUNDLES

from helpers import BUNDLES, TINY_TRAIN, bundle_workflow

TRAINABLE = list(STAGE_BUNDLES.values())




def _overlay(bundle):
    return json.loads((BUNDLES / bundle / "configs" / "multi_gpu_train.json").read_text())


@pytest.mark.parametrize("bundle", TRAINABLE)
def test_overlay_declares_ranks_devices_and_backend(bundle):
    overlay = _overlay(bundle)
    assert "LOCAL_RANK" in overlay["device"] and "cuda:" in overlay["device"] and "'cpu'" in overlay["device"]
    assert overlay["network"]["_target_"] == "torch.nn.parallel.DistributedDataParallel"
    init = " ".join(overlay["initialize"])
    assert "backend='nccl' if torch.cuda.is_available() else 'gloo'" in init
    assert overlay["train#sampler"]["_target_"] == overlay["validate#sampler"]["_target_"] == "DistributedSampler"
    assert overlay["train#dataloader#sampler"] == "@train#sampler" and overlay["train#dataloader#shuffle"] is False
    assert "dist.get_rank() == 0" in overlay["validate#evaluator#val_handlers"]  # CheckpointSaver: rank 0 only
    assert "destroy_process_group" in " ".join(overlay["finalize"])
    assert overlay == _overlay("flare22_coarse"), f"{bundle}: overlay drifted from the coarse bundle's"


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("bundle", TRAINABLE)
def test_overlay_parses_with_its_train_config(bundle, cohort, tmp_path, monkeypatch):
    """One process as rank 0 of a world of one (gloo): the overlay builds a DDP network, distributed samplers (the
    trainer's device loader shards by rank itself), and keeps the checkpoint saver; ``finalize`` tears the process
    group down."""
    from monai.handlers import CheckpointSaver
    from torch.utils.data.distributed import DistributedSampler

    for key, value in {"LOCAL_RANK": "0", "RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
                       "MASTER_PORT": str(_free_port())}.items():
        monkeypatch.setenv(key, value)
    workflow = bundle_workflow(
        bundle, ["train.json", "multi_gpu_train.json"], "train", tmp_path, dataset_dir=str(cohort),
        **{**TINY_TRAIN, "cache_rate": 0.0},
    )
    workflow.initialize()
    try:
        assert torch.distributed.is_initialized() and torch.distributed.get_backend() == "gloo"
        parsed = workflow.parser.get_parsed_content
        assert parsed("device") == torch.device("cpu")
        assert isinstance(parsed("network"), torch.nn.parallel.DistributedDataParallel)
        assert isinstance(parsed("train#dataloader").sampler, DistributedSampler)
        assert isinstance(parsed("validate#dataloader").sampler, DistributedSampler)
        assert any(isinstance(h, CheckpointSaver) for h in parsed("validate#handlers"))
        trainer = parsed("train#trainer")  # the device loader takes this rank's share of every epoch itself
        assert trainer.data_loader is parsed("train#device_loader")
    finally:
        workflow.finalize()
        # ignite caches the distributed context it saw while the group existed; later tests in this process
        # (a real run exits here) must find the serial one again
        from ignite.distributed import utils as idist_utils

        idist_utils._set_model(idist_utils._SerialModel())
    assert not torch.distributed.is_initialized()


RECORDER = {
    # An extra overlay for the test only: each rank appends the files of every batch it trains and validates on.
    "record_dir": "$@bundle_root + '/ranks'",
    "run": [
        "$os.makedirs(@record_dir, exist_ok=True)",
        "$@train#trainer.add_event_handler(ignite.engine.Events.ITERATION_STARTED, lambda e, d=@record_dir: "
        "open(f'{d}/train_{dist.get_rank()}.txt', 'a').write(''.join(f'{e.state.epoch}\\t{n}\\n' "
        "for n in e.state.batch['filename_or_obj'])))",  # the device loader names its batch's files
        "$@validate#evaluator.add_event_handler(ignite.engine.Events.ITERATION_STARTED, lambda e, d=@record_dir: "
        "open(f'{d}/val_{dist.get_rank()}.txt', 'a').write(''.join(f'{e.state.epoch}\\t{n}\\n' "
        "for n in e.state.batch['image'].meta['filename_or_obj'])))",
        "$@train#trainer.run()",
    ],
}


@pytest.fixture(scope="module")
def cohort6(tmp_path_factory):
    """Six labelled cases: with num_val=2, four train (two per rank) and two validate (one per rank)."""
    from flare_c2f_extensions.synthetic.phantom import write_cohort

    out = tmp_path_factory.mktemp("cohort6")
    write_cohort(out, n=6, seed=11, shape=(48, 48, 32))
    return out


def test_torchrun_two_processes_train_on_disjoint_data_and_write_one_checkpoint(cohort6, tmp_path):
    from flare_c2f_extensions.cascade.networks import ResUNetASPP
    from flare_c2f_extensions.io.discovery import labelled_cases, split_cases

    configs = BUNDLES / "flare22_coarse" / "configs"
    recorder = tmp_path / "record.json"
    recorder.write_text(json.dumps(RECORDER, indent=4))
    root, logs = tmp_path / "bundle", tmp_path / "logs"
    config_files = [str(configs / "train.json"), str(configs / "multi_gpu_train.json"), str(recorder)]
    epochs = 2
    command = [
        sys.executable, "-m", "torch.distributed.run",  # what the `torchrun` script runs
        "--standalone", "--nproc_per_node=2", "--log-dir", str(logs), "--redirects", "3",
        "-m", "monai.bundle", "run",
        "--config_file", repr(config_files),
        "--meta_file", str(configs / "metadata.json"), "--logging_file", str(configs / "logging.conf"),
        "--bundle_root", str(root), "--dataset_dir", str(cohort6),
        "--spatial_size", "[32, 32, 32]", "--network_def#channels", "[4, 8, 8, 8, 8]", "--num_workers", "0",
        "--batch_size", "1", "--num_val", "2", "--max_epochs", str(epochs), "--val_interval", "1",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    rank_logs = {p.parent.name: p.read_text() for p in logs.rglob("stdout.log")}
    rank_errs = "\n".join(p.read_text()[-3000:] for p in logs.rglob("stderr.log"))
    assert done.returncode == 0, done.stderr[-3000:] + rank_errs

    train_cases, val_cases = split_cases(labelled_cases(cohort6), 2)
    for kind, expected in (("train", train_cases), ("val", val_cases)):
        seen = defaultdict(lambda: defaultdict(list))  # epoch -> rank -> files
        for rank in (0, 1):
            for line in (root / "ranks" / f"{kind}_{rank}.txt").read_text().splitlines():
                epoch, name = line.split("\t")
                seen[int(epoch)][rank].append(name)
        assert sorted(seen) == list(range(1, epochs + 1)), f"{kind}: epochs {sorted(seen)}"
        for epoch, ranks in seen.items():
            assert ranks[0] and ranks[1], f"{kind} epoch {epoch}: a rank had no data"
            assert not set(ranks[0]) & set(ranks[1]), f"{kind} epoch {epoch}: ranks overlap {dict(ranks)}"
            assert sorted(ranks[0] + ranks[1]) == sorted(c["image"] for c in expected), f"{kind} epoch {epoch}"

    assert sorted(p.name for p in (root / "models").iterdir()) == ["model.pt"]  # rank 0 only, once
    state = torch.load(root / "models" / "model.pt", weights_only=True)
    ResUNetASPP(out_channels=14, channels=[4, 8, 8, 8, 8]).load_state_dict(state)  # no DDP "module." prefix
    assert "val_mean_dice" in rank_logs["0"] and "train_loss" in rank_logs["0"]
    assert "val_mean_dice" not in rank_logs["1"] and "train_loss" not in rank_logs["1"]  # logging: rank 0 only
