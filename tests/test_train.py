"""``flare-c2f train``: every stage through its bundle into one folder of bundles the cascade loads, resumable after a
kill, and under ``torchrun``. Tiny cohort, tiny networks and grids, 1 to 3 epochs (config overrides only)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import fire
import nibabel as nib
import pytest
import torch

from flare_c2f_extensions.cascade.pipeline import Cascade
from flare_c2f_extensions.cli.commands import COMMANDS
from flare_c2f_extensions.errors import InputError
from flare_c2f_extensions.evaluation.metrics import evaluate_folder, format_summary
from flare_c2f_extensions.io.discovery import find_images
from flare_c2f_extensions.options import parse_overrides
from flare_c2f_extensions.runs.cascade_run import CascadeRunner
from flare_c2f_extensions.training.checkpoints import latest_state
from flare_c2f_extensions.training.train import STAGES, done_marker, select_stages, train_cascade

# every stage tiny, through the command line's own override syntax
TINY_OVERRIDES = [
    "spatial_size=[32,32,32]", "network_def#channels=[4,8,8,8,8]", "num_workers=0", "batch_size=2",
    "elastic_prob=0.0", "refiner#learning_rate=0.01",
]


def test_overrides_and_stage_selection():
    parsed = parse_overrides(["solid#learning_rate=0.001", "network_def#channels=[4, 8]", "refiner#max_epochs=3"])
    assert parsed == {"solid": {"learning_rate": 0.001}, "all": {"network_def#channels": [4, 8]},
                      "refiner": {"max_epochs": 3}}
    assert [s.name for s in select_stages("coarse,refiner")] == ["coarse"] + [s.name for s in STAGES if s.organ]
    with pytest.raises(InputError, match="unknown stage 'solids'"):
        select_stages("solids")
    with pytest.raises(InputError, match="neither key=value nor an existing"):
        parse_overrides(["no_such_file.yaml"])


def test_train_every_stage_then_segment_with_the_bundles(cohort, tmp_path, capsys):
    out = tmp_path / "trained"
    command = ["train", "--dataset_dir", str(cohort), "--out", str(out), "--epochs", "1", "--device", "cpu",
               "--num_val", "1", "--override", json.dumps(TINY_OVERRIDES)]
    fire.Fire(COMMANDS, command=command)
    printed = capsys.readouterr().out

    for stage in STAGES:
        assert f"{stage.name:<28} epoch   1/1" in printed, stage.name  # one progress line per stage and epoch
        record = json.loads(done_marker(out / stage.bundle, stage).read_text())
        assert record["epochs"] == 1 and record["resumed_after_epoch"] == 0
        assert (out / stage.bundle / "logs" / f"train_{stage.name}.log").stat().st_size > 0
        state = out / stage.bundle / "train_state"
        assert not state.exists() or not any(state.rglob("*.pt"))
    refiners = out / "flare22_small_refiner" / "models"
    assert sorted(p.name for p in refiners.iterdir()) == sorted(
        ["model.pt"] + [f"model_{s.organ}.pt" for s in STAGES if s.organ])
    assert (refiners / "model.pt").read_bytes() == (refiners / "model_gallbladder.pt").read_bytes()  # the default
    inference = json.loads((out / "flare22_fine_solid" / "configs" / "inference.json").read_text())
    assert inference["network_def"]["channels"] == [4, 8, 8, 8, 8] and inference["spatial_size"] == [32, 32, 32]
    cascade_config = json.loads((out / "flare22_cascade" / "configs" / "inference.json").read_text())
    assert cascade_config["stage_networks"]["solid"]["channels"] == [4, 8, 8, 8, 8]  # assembled for MONAI's clients
    assert (out / "flare22_cascade" / "models" / "model.pt").is_file() and "cascade bundle assembled" in printed
    # the closing table: the cascade on the held-out validation case, FLARE22 metrics
    assert "mean (13 organs)" in printed
    assert json.loads((out / "evaluation" / "summary.json").read_text())["num_cases"] == 1
    assert (out / "evaluation" / "metrics.csv").is_file()

    # the trained folder is what the cascade (and `segment --bundles_dir`) loads, with no overrides
    cascade = Cascade.from_bundles(out, device="cpu")
    report = CascadeRunner(cascade, find_images(cohort, "imagesTs"), tmp_path / "pred", progress=False).run()
    assert report["num_done"] == 2 and report["num_failed"] == 0
    for image in sorted((cohort / "imagesTs").glob("*.nii.gz")):
        case = image.name.replace("_0000.nii.gz", "")
        assert nib.load(str(tmp_path / "pred" / f"{case}.nii.gz")).shape == nib.load(str(image)).shape
    summary = evaluate_folder(str(tmp_path / "pred"), str(cohort / "labelsTs"), str(tmp_path / "eval"))
    assert len(summary["organs"]) == 13 and "mean (13 organs)" in format_summary(summary)


FAIL_IN_EPOCH_3 = [  # 3 training cases, batch 2: 2 iterations an epoch, the 5th is the first of epoch 3
    "$@train#trainer.add_event_handler(ignite.engine.Events.ITERATION_COMPLETED(once=5), "
    "lambda e: (_ for _ in ()).throw(RuntimeError('injected failure')))",
    "$@train#trainer.run()",
]
RECORD_OPTIMIZER_AT_START = [  # runs after the resume loader (attached with the trainer's handlers)
    "$@train#trainer.add_event_handler(ignite.engine.Events.STARTED, "
    "lambda e: torch.save({'optimizer': @optimizer.state_dict(), 'epoch': e.state.epoch}, "
    "@bundle_root + '/at_start.pt'))",
    "$@train#trainer.run()",
]


def _same_optimizer_state(a: dict, b: dict) -> bool:
    if a["param_groups"] != b["param_groups"] or a["state"].keys() != b["state"].keys():
        return False
    return all(
        torch.equal(torch.as_tensor(a["state"][k][n]), torch.as_tensor(b["state"][k][n]))
        for k in a["state"] for n in a["state"][k]
    )


def test_killed_stage_resumes_at_saved_epoch_and_finished_stage_is_skipped(cohort, tmp_path, capsys):
    out = tmp_path / "trained"
    common = dict(stages="coarse,solid", device="cpu", num_val=1, evaluate=False, progress=False)
    overrides = [*TINY_OVERRIDES, "solid#max_epochs=3", "coarse#max_epochs=1", {"solid": {"run": FAIL_IN_EPOCH_3}}]
    with pytest.raises(Exception) as failure:
        train_cascade(cohort, out, overrides=overrides, **common)
    error, messages = failure.value, []
    while error is not None:
        messages.append(str(error))
        error = error.__cause__ or error.__context__
    assert "injected failure" in messages
    solid, coarse = (out / "flare22_fine_solid"), (out / "flare22_coarse")
    assert done_marker(coarse, STAGES[0]).is_file() and not done_marker(solid, STAGES[1]).exists()
    saved = torch.load(latest_state(solid / "train_state"), weights_only=True)
    assert saved["trainer"]["iteration"] == 4 and saved["trainer"]["epoch_length"] == 2  # after epoch 2
    assert saved["lr_scheduler"]["last_epoch"] == 2
    coarse_model = (coarse / "models" / "model.pt").stat().st_mtime_ns
    capsys.readouterr()

    overrides[-1] = {"solid": {"run": RECORD_OPTIMIZER_AT_START}}
    result = train_cascade(cohort, out, overrides=overrides, **common)
    assert "coarse" in capsys.readouterr().out.split("done before, skipped")[0]  # not retrained
    assert (coarse / "models" / "model.pt").stat().st_mtime_ns == coarse_model
    at_start = torch.load(solid / "at_start.pt", weights_only=True)
    assert at_start["epoch"] == 2  # the trainer starts from the saved epoch...
    assert _same_optimizer_state(at_start["optimizer"], saved["optimizer"])  # ...with the saved optimizer state
    record = result["stages"]["solid"]
    assert record["resumed_after_epoch"] == 2 and [h["epoch"] for h in record["history"]] == [3]
    assert json.loads(done_marker(solid, STAGES[1]).read_text())["epochs"] == 3
    assert not list((solid / "train_state").glob("*.pt"))  # done: the resumable state is gone


@pytest.fixture(scope="module")
def cohort6(tmp_path_factory):
    """Six labelled cases: with num_val=2, two training and one validation case per rank."""
    from flare_c2f_extensions.synthetic.phantom import write_cohort

    out = tmp_path_factory.mktemp("cohort6")
    write_cohort(out, n=6, seed=11, shape=(48, 48, 32))
    return out


def test_torchrun_two_processes_train_two_stages_with_one_checkpoint_each(cohort6, tmp_path):
    out, logs = tmp_path / "trained", tmp_path / "logs"
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
        "--log-dir", str(logs), "--redirects", "3",
        "-m", "flare_c2f_extensions", "train", "--dataset_dir", str(cohort6), "--out", str(out),
        "--stages", "coarse,vessels", "--epochs", "2", "--num_val", "2", "--evaluate", "False",
        "--override", json.dumps([*TINY_OVERRIDES, "batch_size=1"]),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)
    rank_out = {p.parent.name: p.read_text() for p in logs.rglob("stdout.log")}
    errors = "\n".join(p.read_text()[-3000:] for p in logs.rglob("stderr.log"))
    assert done.returncode == 0, done.stderr[-3000:] + errors
    for stage in select_stages("coarse,vessels"):
        root = out / stage.bundle
        assert sorted(p.name for p in (root / "models").iterdir()) == ["model.pt"]  # rank 0 only, once
        assert json.loads(done_marker(root, stage).read_text())["epochs"] == 2
        assert f"{stage.name:<28} epoch   2/2" in rank_out["0"] and stage.name not in rank_out["1"]
