"""``flare-c2f self_train``: the stages' train configs take an extra datalist and over-sample the labelled cases, and
one self-training round runs end to end with tiny networks (teacher, gated pseudo-labels, student, scores, best)."""

from __future__ import annotations

import json

import fire
import pytest

from flare_c2f_extensions.cli.commands import COMMANDS
from flare_c2f_extensions.errors import InputError
from flare_c2f_extensions.io.discovery import labelled_cases, split_cases, training_cases
from flare_c2f_extensions.paths import STAGE_BUNDLES

from helpers import bundle_workflow

TINY_OVERRIDES = [
    "spatial_size=[32,32,32]", "network_def#channels=[4,8,8,8,8]", "num_workers=0", "batch_size=2",
    "elastic_prob=0.0", "cache_rate=0.0",
]


@pytest.fixture(scope="module")
def cohort_u(tmp_path_factory):
    from flare_c2f_extensions.synthetic.phantom import write_cohort

    out = tmp_path_factory.mktemp("cohort_u")
    write_cohort(out, n=3, n_unlabelled=2, seed=9, shape=(48, 48, 32))
    return out


@pytest.mark.parametrize("bundle", sorted(set(STAGE_BUNDLES.values())))
def test_train_config_takes_an_extra_datalist_and_repeats_labelled_cases(bundle, cohort_u, tmp_path):
    extra = [{"image": p, "label": p.replace("imagesUnlabelled", "truthUnlabelled").replace("_0000", "")}
             for p in sorted(str(q) for q in (cohort_u / "imagesUnlabelled").iterdir())]
    datalist = tmp_path / "kept.json"
    datalist.write_text(json.dumps(extra))
    workflow = bundle_workflow(bundle, "train.json", "train", tmp_path, dataset_dir=str(cohort_u), num_val=1,
                               extra_datalist=str(datalist), labelled_repeat=3, cache_rate=0.0, num_workers=0)
    parsed = workflow.parser.get_parsed_content("train#dataset").data
    train, val = split_cases(labelled_cases(cohort_u), 1)
    assert parsed == train * 3 + extra
    assert workflow.parser.get_parsed_content("validate#dataset").data == val  # validation stays labelled-only
    plain = bundle_workflow(bundle, "train.json", "train", tmp_path, dataset_dir=str(cohort_u), num_val=1)
    assert plain.parser.get_parsed_content("train_cases") == train  # the defaults change nothing


def test_training_cases_refuses_a_bad_datalist(cohort_u, tmp_path):
    train, _ = split_cases(labelled_cases(cohort_u), 1)
    with pytest.raises(InputError, match="not a readable JSON datalist"):
        training_cases(train, tmp_path / "missing.json")
    with pytest.raises(InputError, match="needs an image and a label"):
        training_cases(train, [{"image": train[0]["image"]}])
    with pytest.raises(InputError, match="labelled_repeat must be at least 1"):
        training_cases(train, None, 0)


def test_one_self_training_round_end_to_end(cohort_u, tmp_path, capsys):
    out = tmp_path / "self"
    command = ["self_train", "--dataset_dir", str(cohort_u), "--unlabelled", str(cohort_u / "imagesUnlabelled"),
               "--out", str(out), "--rounds", "1", "--epochs", "1", "--device", "cpu", "--num_val", "1",
               "--labelled_repeat", "2", "--override", json.dumps(TINY_OVERRIDES),
               "--rule", json.dumps({"min_mean_confidence": 0.0, "min_low_confidence": 0.0, "max_missing": 13,
                                     "volume_factor": 1e9, "max_dropped_fraction": 1.0})]  # keep all: tiny teacher
    fire.Fire(COMMANDS, command=command)
    printed = capsys.readouterr().out
    state = json.loads((out / "self_train.json").read_text())
    assert [r["round"] for r in state["rounds"]] == ["round_0", "round_1"]
    teacher, student = state["rounds"]
    for record in state["rounds"]:
        summary = json.loads((out / record["round"] / "evaluation" / "summary.json").read_text())
        assert summary["num_cases"] == 1 and record["mean_DSC"] == round(summary["mean_DSC"], 4)
        assert (out / record["round"] / "bundles" / "flare22_coarse" / "models" / "model.pt").is_file()
    quality = json.loads((out / "round_1" / "pseudo" / "quality.json").read_text())
    assert quality["num_cases"] == student["pseudo_labelled"] == 2
    assert student["pseudo_kept"] == quality["num_kept"]
    assert len(json.loads((out / "round_1" / "pseudo" / "kept.json").read_text())) == quality["num_kept"] == 2
    # the volume range comes from the labelled training cases only (the validation case is never looked at)
    reference = json.loads((out / "round_1" / "pseudo" / "volume_reference.json").read_text())
    assert reference["cases"] == 2
    best = max(state["rounds"], key=lambda r: r["mean_DSC"])
    assert state["best"]["round"] == best["round"] and f"best: {best['round']}" in printed
    assert "round_1: validation mean DSC" in printed

    # a rerun does nothing again: both rounds are scored
    fire.Fire(COMMANDS, command=command)
    again = capsys.readouterr().out
    assert "round_0: scored before" in again and "round_1: scored before" in again
    assert json.loads((out / "self_train.json").read_text()) == state
