"""Pseudo-labels with a quality gate: the signals are what they claim, and the rule keeps a good case and refuses
cases made to fail (an organ removed, a noise-only CT) for the right reason.

The teacher is hand-crafted so that its quality is known without training: the test CTs code each organ as one HU
value, and every stage's "network" reads the organ back from the intensity (nearest code, then a 3x3x3 majority
vote against the partial-volume values the cascade's resizing creates). It runs the real cascade: crops, grids,
fusion, confidence map and largest components.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import cc3d
import nibabel as nib
import numpy as np
import pytest
import torch

from flare_c2f_extensions.cascade.pipeline import Cascade
from flare_c2f_extensions.evaluation.quality import (
    QualityRule,
    case_signals,
    decide,
    organ_volumes_ml,
    volume_reference,
)
from flare_c2f_extensions.labels import NUM_CLASSES, ORGAN_IDS, ORGANS
from flare_c2f_extensions.runs.pseudo_label import pseudo_label
from flare_c2f_extensions.synthetic.phantom import make_case

from helpers import BUNDLES, REPO
from helpers import TINY_STAGES as HELPER_STAGES

# thin and small organs next to the background's code, so their partial-volume boundaries cross no other organ
CODE_ORDER = (5, 6, 10, 4, 12, 7, 8, 9, 11, 2, 13, 3, 1)
CODE_HU = {0: -100.0, **{label: -35.0 + 25.0 * i for i, label in enumerate(CODE_ORDER)}}  # 0: fat, and all below
FAT_HU = -100.0
SHAPE = (48, 48, 32)
SPACING = (0.8, 0.8, 2.5)  # one grid for every case: organ volumes vary as anatomy does, not with the voxel size
TINY_STAGES = {name: {**value, "spatial_size": [48, 48, 48]} for name, value in HELPER_STAGES.items()}
TINY_32 = json.dumps(HELPER_STAGES)


class IntensityDecoder(torch.nn.Module):
    """Logits of background + ``labels`` from an organ-coded CT scaled to [0, 1] by the cascade's HU window."""

    def __init__(self, labels):
        super().__init__()
        self.own = list(labels)
        self.rest = [c for c in range(NUM_CLASSES) if c not in self.own]
        self.register_buffer("codes", torch.tensor([(CODE_HU[c] + 100.0) / 400.0 for c in range(NUM_CLASSES)]))

    def forward(self, x):
        nearest = (x - self.codes.view(1, -1, 1, 1, 1)).abs().argmin(1)
        onehot = torch.nn.functional.one_hot(nearest, NUM_CLASSES).permute(0, 4, 1, 2, 3).float()
        logits = 20.0 * torch.nn.functional.avg_pool3d(onehot, 3, 1, 1, count_include_pad=False)
        background = torch.logsumexp(logits[:, self.rest], dim=1, keepdim=True)  # everything not this stage's
        return torch.cat([background, logits[:, self.own]], dim=1)


@pytest.fixture(scope="module")
def teacher():
    cascade = Cascade.from_bundles(BUNDLES, device="cpu", amp=False, stage_overrides=TINY_STAGES, require_weights=False)
    for stage in [cascade.coarse, cascade.locator, *cascade.groups, *cascade.refiners]:
        stage.network = IntensityDecoder(stage.labels)
    return cascade


def _coded_ct(label, affine, path, seed=0):
    rng = np.random.default_rng(seed)
    hu = np.vectorize(CODE_HU.get, otypes=[np.float32])(label) + rng.normal(0, 3, label.shape)
    hu[label == 0] = rng.uniform(-1000, -150, int((label == 0).sum()))  # air and fat: a CT's range
    nib.save(nib.Nifti1Image(np.rint(hu).astype(np.int16), affine), str(path))
    return path


@pytest.fixture(scope="module")
def unlabelled(tmp_path_factory):
    """A labelled reference (truth of four cases) and three unlabelled CTs: normal, spleen removed, noise only."""
    root = tmp_path_factory.mktemp("unlabelled")
    (root / "labelsTr").mkdir()
    (root / "images").mkdir()
    for i in range(4):
        case = make_case(200 + i, shape=SHAPE, spacing=SPACING, orientation=("RAS", "LPS")[i % 2])
        nib.save(nib.Nifti1Image(case.label, case.affine), str(root / "labelsTr" / f"ref_{i}.nii.gz"))
    normal = make_case(100, shape=SHAPE, spacing=SPACING)
    _coded_ct(normal.label, normal.affine, root / "images" / "normal_0000.nii.gz")
    no_spleen = make_case(101, shape=SHAPE, spacing=SPACING, orientation="LPS")
    path = _coded_ct(no_spleen.label, no_spleen.affine, root / "images" / "no_spleen_0000.nii.gz", seed=1)
    image = nib.load(str(path))
    hu = np.asarray(image.dataobj).copy()
    hu[no_spleen.label == ORGAN_IDS["spleen"]] = FAT_HU
    nib.save(nib.Nifti1Image(hu, image.affine), str(path))
    noise = np.random.default_rng(2).uniform(-1000, 400, SHAPE)
    nib.save(nib.Nifti1Image(noise.astype(np.int16), normal.affine), str(root / "images" / "noise_0000.nii.gz"))
    return root


def test_signals_are_numpys_statistics_of_the_cascades_maps(teacher, unlabelled):
    image = unlabelled / "images" / "normal_0000.nii.gz"
    result = teacher.segment(image, keep_confidence=True)
    affine = nib.load(str(image)).affine
    assert result.confidence.shape == result.labels.shape == SHAPE and result.confidence.dtype == np.float32
    signals = case_signals(result.labels, result.confidence, result.dropped, affine)
    voxel_ml = abs(np.linalg.det(affine[:3, :3])) / 1000
    for label, name in ORGANS.items():
        organ, values = signals["organs"][name], result.confidence[result.labels == label]
        assert organ["voxels"] == values.size > 0, name
        assert organ["volume_ml"] == pytest.approx(values.size * voxel_ml, rel=1e-12)
        assert organ["mean_confidence"] == pytest.approx(np.mean(values, dtype=np.float64), rel=1e-12)
        assert organ["confidence_p10"] == pytest.approx(np.percentile(values.astype(np.float64), 10), rel=1e-12)
        assert 0 < organ["confidence_p5"] <= organ["confidence_p10"] <= organ["confidence_p25"] <= 1
    assert signals["missing"] == []
    # confidence is 0 exactly where no stage claimed an organ
    raw = teacher.segment(image, keep_confidence=True)
    np.testing.assert_array_equal(raw.confidence, result.confidence)  # deterministic


def test_dropped_components_are_what_the_largest_component_step_removed(teacher, unlabelled):
    image = unlabelled / "images" / "noise_0000.nii.gz"  # plenty of stray components
    kept = teacher.segment(image, keep_confidence=True)
    teacher.largest_component = False
    try:
        raw = teacher.segment(image).labels
    finally:
        teacher.largest_component = True
    assert kept.dropped, "a noise CT should leave stray components"
    for label in ORGANS:
        components = cc3d.connected_components((raw == label).astype(np.uint8), connectivity=26, return_N=True)[1]
        lost = int((raw == label).sum() - (kept.labels == label).sum())
        expected = {"components": components - 1, "voxels": lost} if lost else None
        assert kept.dropped.get(label) == expected, ORGANS[label]
    signals = case_signals(kept.labels, kept.confidence, kept.dropped, nib.load(str(image)).affine)
    for label, name in ORGANS.items():
        organ = signals["organs"][name]
        total = organ["voxels"] + organ["dropped_voxels"]
        assert organ["dropped_fraction"] == pytest.approx(organ["dropped_voxels"] / total if total else 0.0)


def test_volume_reference_is_the_labelled_range(unlabelled):
    reference = volume_reference(unlabelled / "labelsTr")
    assert reference["cases"] == 4 and set(reference["organs"]) == set(ORGANS.values())
    volumes = []
    for path in sorted((unlabelled / "labelsTr").iterdir()):
        image = nib.load(str(path))
        label = np.asarray(image.dataobj)
        voxel_ml = abs(np.linalg.det(image.affine[:3, :3])) / 1000
        volumes.append({name: (label == k).sum() * voxel_ml for k, name in ORGANS.items()})
        assert organ_volumes_ml(label, image.affine) == pytest.approx(volumes[-1])
    for name in ORGANS.values():
        assert reference["organs"][name]["min_ml"] == pytest.approx(min(v[name] for v in volumes))
        assert reference["organs"][name]["max_ml"] == pytest.approx(max(v[name] for v in volumes))


def test_quality_gate_keeps_the_normal_case_and_refuses_the_made_to_fail_ones(teacher, unlabelled, tmp_path):
    report = pseudo_label(teacher, unlabelled / "images", tmp_path, reference=unlabelled / "labelsTr", progress=False)
    cases = {case["case"]: case for case in report["cases"]}
    assert set(cases) == {"normal", "no_spleen", "noise"}
    assert cases["normal"]["keep"] is True, cases["normal"]["reasons"]
    assert cases["no_spleen"]["keep"] is False
    assert cases["no_spleen"]["signals"]["missing"] == ["spleen"]
    assert "missing: spleen" in cases["no_spleen"]["reasons"]
    assert cases["noise"]["keep"] is False
    noise_reasons = " | ".join(cases["noise"]["reasons"])
    assert "fragmented:" in noise_reasons and "volume:" in noise_reasons, noise_reasons
    # the files: label maps, signals, the report, and a datalist of the kept case only
    assert sorted(p.name for p in (tmp_path / "labels").iterdir()) == [f"{c}.nii.gz" for c in sorted(cases)]
    kept = json.loads((tmp_path / "kept.json").read_text())
    assert kept == [{"image": str(unlabelled / "images" / "normal_0000.nii.gz"),
                     "label": str(tmp_path / "labels" / "normal.nii.gz")}]
    written = nib.load(str(tmp_path / "labels" / "no_spleen.nii.gz"))
    assert np.allclose(written.affine, nib.load(str(unlabelled / "images" / "no_spleen_0000.nii.gz")).affine)
    assert "missing: spleen" in (tmp_path / "quality.csv").read_text()
    stored = json.loads((tmp_path / "signals" / "normal.json").read_text())
    assert stored == cases["normal"]["signals"]


def test_a_rerun_gates_again_without_segmenting(teacher, unlabelled, tmp_path, monkeypatch):
    pseudo_label(teacher, unlabelled / "images", tmp_path, reference=unlabelled / "labelsTr", progress=False)
    monkeypatch.setattr(teacher, "segment", lambda *a, **k: pytest.fail("a finished case was segmented again"))
    strict = pseudo_label(teacher, unlabelled / "images", tmp_path, reference=tmp_path / "volume_reference.json",
                          rule={"min_mean_confidence": 0.999}, progress=False)
    assert {case["status"] for case in strict["cases"]} == {"exists"}
    assert strict["num_kept"] == 0 and strict["rule"]["min_mean_confidence"] == 0.999
    normal = next(case for case in strict["cases"] if case["case"] == "normal")
    assert any(reason.startswith("low confidence:") for reason in normal["reasons"])
    assert json.loads((tmp_path / "kept.json").read_text()) == []


def test_rule_overrides_and_their_errors(tmp_path):
    from flare_c2f_extensions.errors import InputError

    assert QualityRule.parse({"max_missing": 2}).max_missing == 2
    path = tmp_path / "rule.json"
    path.write_text('{"volume_factor": 3}')
    assert QualityRule.parse(str(path)).volume_factor == 3.0
    assert QualityRule.parse('{"low_percentile": 25}').low_percentile == 25
    with pytest.raises(InputError, match="unknown key.*min_confidence"):
        QualityRule.parse({"min_confidence": 0.5})
    with pytest.raises(InputError, match="low_percentile must be one of"):
        QualityRule.parse({"low_percentile": 7})
    # a case with one organ missing passes when the rule allows one
    signals = {"organs": {"liver": {"voxels": 0, "dropped_fraction": 0.0}}, "missing": ["liver"]}
    assert decide(signals, QualityRule(max_missing=1)) == (True, [])
    assert decide(signals) == (False, ["missing: liver"])


def test_cli_writes_the_outputs_with_random_weight_stages(unlabelled, tmp_path):
    command = [
        sys.executable, "-m", "flare_c2f_extensions", "pseudo_label", "--bundles_dir", str(BUNDLES),
        "-i", str(unlabelled / "images"), "-o", str(tmp_path / "out"), "--device", "cpu",
        "--reference", str(unlabelled / "labelsTr"), "--require_weights", "false",
        "--stage_overrides", TINY_32,
    ]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "of 3 case(s) kept" in done.stdout
    report = json.loads((tmp_path / "out" / "quality.json").read_text())
    assert report["num_cases"] == 3 and report["rule"] == json.loads(json.dumps(QualityRule().__dict__))
    assert all(case["status"] == "done" for case in report["cases"])
    bad = subprocess.run(command[:-2] + ["--rule", '{"nope": 1}'], capture_output=True, text=True, env=env, timeout=300)
    assert bad.returncode != 0 and bad.stderr.strip().splitlines()[-1].startswith("error: quality rule: unknown key")


def test_torchrun_two_processes_label_each_case_once_and_match_one_process(unlabelled, tmp_path):
    """Two ranks (gloo, CPU) share the cases; rank 0 gates them all; signals equal a one-process run's."""
    args = [
        "pseudo_label", "--bundles_dir", str(BUNDLES), "--input", str(unlabelled / "images"), "--device", "cpu",
        "--reference", str(unlabelled / "labelsTr"), "--require_weights", "false",
        "--stage_overrides", TINY_32,
    ]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    one = subprocess.run([sys.executable, "-m", "flare_c2f_extensions", *args, "--output", str(tmp_path / "one")],
                         capture_output=True, text=True, timeout=300, env=env)
    assert one.returncode == 0, one.stderr[-3000:]
    logs = tmp_path / "logs"
    two = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "--log-dir", str(logs),
         "--redirects", "3", "-m", "flare_c2f_extensions", *args, "--output", str(tmp_path / "two")],
        capture_output=True, text=True, timeout=400, env=env,
    )
    assert two.returncode == 0, two.stderr[-3000:] + "".join(p.read_text()[-2000:] for p in logs.rglob("stderr.log"))
    reports = {run: json.loads((tmp_path / run / "quality.json").read_text()) for run in ("one", "two")}
    assert [case["case"] for case in reports["two"]["cases"]] == ["no_spleen", "noise", "normal"]
    ranks = reports["two"]["ranks"]  # round-robin by output path, so by case name here
    assert [entry["cases"] for entry in ranks] == [["no_spleen", "normal"], ["noise"]]
    for mine, theirs in zip(reports["one"]["cases"], reports["two"]["cases"]):
        assert mine["signals"] == theirs["signals"] and mine["keep"] == theirs["keep"]
        np.testing.assert_array_equal(
            np.asarray(nib.load(str(tmp_path / "one" / "labels" / f"{mine['case']}.nii.gz")).dataobj),
            np.asarray(nib.load(str(tmp_path / "two" / "labels" / f"{mine['case']}.nii.gz")).dataobj),
        )
