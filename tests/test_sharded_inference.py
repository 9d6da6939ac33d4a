"""Cohort-scale inference over ranks: the deterministic split, devices and threads per rank, the merged report, and
real two-process ``torchrun`` runs (gloo, CPU) of the cascade bundle's ``multi_gpu_inference.json`` overlay."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest

from flare_c2f_extensions.runs.ranks import Ranks

from helpers import BUNDLES, REPO, TINY_STAGES

CASCADE = BUNDLES / "flare22_cascade"


@pytest.mark.parametrize("world_size", [1, 2, 3, 5])
def test_every_case_goes_to_exactly_one_rank_whatever_the_order(world_size):
    cases = [f"case_{i:03d}" for i in range(11)]
    shares = [Ranks(rank, world_size).shard(cases) for rank in range(world_size)]
    assert sorted(c for share in shares for c in share) == cases
    shuffled = cases[:]
    random.Random(world_size).shuffle(shuffled)
    assert [sorted(Ranks(rank, world_size).shard(shuffled)) for rank in range(world_size)] == shares
    assert max(map(len, shares)) - min(map(len, shares)) <= 1


def test_items_with_one_output_stay_on_one_rank():
    items = [("a.nii", "out/a"), ("a.nii.gz", "out/a"), ("b.nii", "out/b"), ("c.nii", "out/c")]
    shares = [Ranks(rank, 2).shard(items, key=lambda item: item[1]) for rank in range(2)]
    holder = [share for share in shares if ("a.nii", "out/a") in share]
    assert len(holder) == 1 and ("a.nii.gz", "out/a") in holder[0]
    assert sum(map(len, shares)) == len(items)


def test_device_and_threads_per_rank(monkeypatch):
    for key, value in {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2"}.items():
        monkeypatch.setenv(key, value)
    ranks = Ranks.from_env()
    assert ranks == Ranks(3, 4, 1, 2) and ranks.distributed
    assert ranks.device("cuda") == "cuda:1" and ranks.device("cpu") == "cpu"
    cores = len(os.sched_getaffinity(0))
    assert ranks.threads(device="cpu") == max(1, cores // 2) and ranks.threads(3) == 3
    assert ranks.threads(device="cuda:1") is None
    single = Ranks()
    assert not single.distributed and single.device(None) is None and single.threads() is None
    assert single.gather({"x": 1}) == [{"x": 1}]


def _torchrun(args, logs, timeout=400):
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               "--log-dir", str(logs), "--redirects", "3", *args]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env)
    errors = "\n".join(p.read_text()[-3000:] for p in logs.rglob("stderr.log"))
    assert done.returncode == 0, done.stderr[-3000:] + errors
    return done


def test_cascade_bundle_overlay_shards_the_cases_over_two_processes(cohort, tmp_path):
    configs = CASCADE / "configs"
    out = tmp_path / "out"
    _torchrun([
        "-m", "monai.bundle", "run",
        "--config_file", repr([str(configs / "inference.json"), str(configs / "multi_gpu_inference.json")]),
        "--meta_file", str(configs / "metadata.json"), "--logging_file", str(configs / "logging.conf"),
        "--bundle_root", str(CASCADE), "--dataset_dir", str(cohort), "--image_subdir", "imagesTr",
        "--output_dir", str(out), "--require_weights", "False", "--progress", "False",
        "--stage_overrides", repr(TINY_STAGES),
    ], tmp_path / "logs")
    images = sorted((cohort / "imagesTr").iterdir())
    names = [p.name.replace("_0000.nii.gz", "") for p in images]
    assert sorted(p.name for p in out.glob("*.nii.gz")) == [f"{n}.nii.gz" for n in names]
    for image in images:
        written = nib.load(str(out / image.name.replace("_0000", "")))
        assert written.shape == nib.load(str(image)).shape and written.get_data_dtype() == np.uint8
    report = json.loads((out / "efficiency.json").read_text())
    assert [case["case"] for case in report["cases"]] == names and report["num_done"] == len(names)
    assert report["world_size"] == 2
    shares = [set(rank["cases"]) for rank in report["ranks"]]
    assert shares[0] and shares[1] and not shares[0] & shares[1] and shares[0] | shares[1] == set(names)
    assert sorted(p.name for p in out.glob("efficiency*")) == ["efficiency.csv", "efficiency.json"]


@pytest.fixture(scope="module")
def eight(tmp_path_factory):
    from flare_c2f_extensions.synthetic.phantom import write_cohort

    out = tmp_path_factory.mktemp("eight")
    write_cohort(out, n=8, seed=5, shape=(48, 48, 32))
    return out / "imagesTr"


def _segment_args(images, output):
    return ["-m", "flare_c2f_extensions", "segment", "-i", str(images), "-o", str(output), "--device", "cpu",
            "--require_weights", "false", "--threads", "1", "--stage_overrides", json.dumps(TINY_STAGES)]


def _label_maps(folder):
    return {p.name: np.asarray(nib.load(str(p)).dataobj) for p in sorted(folder.glob("FLARE22_*.nii.gz"))}


def test_torchrun_segment_writes_each_case_once_as_one_process_would(eight, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    one = subprocess.run([sys.executable, *_segment_args(eight, tmp_path / "one")], capture_output=True, text=True,
                         timeout=300, env=env)
    assert one.returncode == 0, one.stderr[-3000:]
    _torchrun(_segment_args(eight, tmp_path / "two"), tmp_path / "logs")
    expected, got = _label_maps(tmp_path / "one"), _label_maps(tmp_path / "two")
    assert sorted(got) == [p.name.replace("_0000", "") for p in sorted(eight.iterdir())]
    for name in expected:
        np.testing.assert_array_equal(got[name], expected[name], err_msg=name)
    assert any(labels.any() for labels in got.values())  # the comparison is not between empty maps
    report = json.loads((tmp_path / "two" / "segment_report.json").read_text())
    names = [name.replace(".nii.gz", "") for name in sorted(expected)]
    assert [case["case"] for case in report["cases"]] == names and {c["status"] for c in report["cases"]} == {"done"}
    shares = [set(rank["cases"]) for rank in report["ranks"]]
    assert len(shares) == 2 and all(shares) and not shares[0] & shares[1] and shares[0] | shares[1] == set(names)
    assert report["threads"] == 1 and report["world_size"] == 2


def test_a_killed_torchrun_segment_resumes_without_redoing_finished_cases(eight, tmp_path):
    import signal
    import time

    import psutil

    out, logs = tmp_path / "out", tmp_path / "logs"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               "--log-dir", str(logs), "--redirects", "3", *_segment_args(eight, out)]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    launcher = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 300
        while not list(out.glob("FLARE22_*.nii.gz")) and launcher.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        for process in psutil.Process(launcher.pid).children(recursive=True) + [psutil.Process(launcher.pid)]:
            process.send_signal(signal.SIGKILL)  # a hard kill: no handler runs, no report is written
    finally:
        launcher.wait(timeout=60)
    finished = {p.name: p.stat().st_mtime_ns for p in out.glob("FLARE22_*.nii.gz")}
    assert 0 < len(finished) < 8, f"the kill should land mid-run: {sorted(finished)}"
    assert not (out / "segment_report.json").exists()

    _torchrun(_segment_args(eight, out), tmp_path / "logs2")
    report = json.loads((out / "segment_report.json").read_text())
    status = {case["case"] + ".nii.gz": case["status"] for case in report["cases"]}
    assert len(report["cases"]) == 8 and len(status) == 8
    assert {name for name, s in status.items() if s == "exists"} == set(finished)
    assert {name for name, s in status.items() if s == "done"} == set(status) - set(finished)
    for name, mtime in finished.items():
        assert (out / name).stat().st_mtime_ns == mtime, f"{name} was written again"
    assert sorted(_label_maps(out)) == sorted(status)  # every map whole and readable
