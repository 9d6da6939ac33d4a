"""Issue 20 (nothing lost, nothing silent), the ``flare-c2f train`` items: the decoded cache is keyed by the
sources' content (item 5), label files hold whole FLARE ids or are refused before any training (items 6 and 11),
and a saved training state that no longer fits the network stops with one line naming ``train_state`` (item 11).

A private copy of the small cohort per test; tiny networks and grids, 1 to 2 epochs (config overrides only).
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import fire
import nibabel as nib
import numpy as np
import pytest

from flare_c2f_extensions.cli.commands import COMMANDS
from flare_c2f_extensions.errors import InputError
from flare_c2f_extensions.training.train import prepare_cache, train_cascade

from helpers import TINY_CHANNELS, TINY_GRID, physical, save

TINY_OVERRIDES = [
    f"spatial_size={TINY_GRID}", f"network_def#channels={TINY_CHANNELS}", "num_workers=0", "batch_size=2",
    "elastic_prob=0.0",
]
LAST_CASE = "FLARE22_Tr_0004"  # the cohort's last labelled case: the ones before it are cached first


def _copy_cohort(cohort: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(cohort, tmp_path / "dataset"))


def _label_path(dataset: Path, case: str = LAST_CASE) -> Path:
    return dataset / "labelsTr" / f"{case}.nii.gz"


def _rewrite_label(path: Path, change, dtype=np.uint8) -> np.ndarray:
    """Replace the label file with ``change(its voxels)`` stored as ``dtype`` (same affine); returns the voxels."""
    source = nib.load(str(path))
    voxels = change(np.asarray(source.dataobj).astype(np.float64))
    save(voxels, source.affine, path, dtype)
    return voxels


def _cached_labels(cache: Path, case: str = LAST_CASE) -> np.ndarray:
    return np.asarray(nib.load(str(cache / "labelsTr" / f"{case}.nii")).dataobj)


def _train_command(dataset: Path, out: Path, *overrides: str, epochs: int = 3) -> list[str]:
    return ["train", "--dataset_dir", str(dataset), "--out", str(out), "--stages", "coarse", "--epochs", str(epochs),
            "--device", "cpu", "--num_val", "1", "--evaluate", "False",
            "--override", json.dumps([*TINY_OVERRIDES, *overrides])]


def _one_line_error(command: list[str]) -> str:
    """Run the command line; it must stop with ``SystemExit("error: ...")``, one line, no traceback."""
    with pytest.raises(SystemExit) as stop:
        fire.Fire(COMMANDS, command=command)
    message = str(stop.value.code)
    assert message.startswith("error: ") and "\n" not in message, message
    return message


# -- item 5: the cache is keyed by content ----------------------------------------------------------------------


def test_cache_reads_a_corrected_label_that_has_an_older_mtime(cohort, tmp_path):
    dataset, cache = _copy_cohort(cohort, tmp_path), tmp_path / "cache"
    label = _label_path(dataset)
    prepare_cache(dataset, cache, progress=False)
    assert np.count_nonzero(_cached_labels(cache) == 1) > 0  # the liver, before the correction
    old = label.stat()

    # a corrected label copied in with its old (earlier) mtime, as cp -p, rsync -a or an archive leave it
    _rewrite_label(label, lambda voxels: np.where(voxels == 1, 0, voxels))
    os.utime(label, ns=(old.st_atime_ns, old.st_mtime_ns - 3_600 * 10**9))
    assert label.stat().st_mtime < (cache / "labelsTr" / f"{LAST_CASE}.nii").stat().st_mtime
    prepare_cache(dataset, cache, progress=False)

    corrected, _ = physical(label)
    assert np.count_nonzero(_cached_labels(cache) == 1) == 0
    assert np.array_equal(_cached_labels(cache), corrected)


def test_cache_forgets_a_case_removed_from_the_dataset(cohort, tmp_path):
    dataset, cache = _copy_cohort(cohort, tmp_path), tmp_path / "cache"
    prepare_cache(dataset, cache, progress=False)
    (dataset / "imagesTr" / f"{LAST_CASE}_0000.nii.gz").unlink()
    _label_path(dataset).unlink()
    prepare_cache(dataset, cache, progress=False)
    cached = [p.name for folder in ("imagesTr", "labelsTr") for p in (cache / folder).iterdir()]
    assert not [name for name in cached if LAST_CASE in name], cached  # the stages would train on it


# -- item 6: whole FLARE ids, or refused ------------------------------------------------------------------------


def test_cache_rounds_float_labels_that_are_whole_numbers(cohort, tmp_path):
    dataset, cache = _copy_cohort(cohort, tmp_path), tmp_path / "cache"
    label = _label_path(dataset)
    truth, _ = physical(label)
    assert np.count_nonzero(truth == 13) > 0  # the left kidney, id 13, which truncation turns into 12

    _rewrite_label(label, lambda voxels: voxels - 1.3e-4 * (voxels > 0), np.float32)  # 13 -> 12.99987
    prepare_cache(dataset, cache, progress=False)
    cached = _cached_labels(cache)
    assert cached.dtype == np.uint8 and np.array_equal(cached, truth)


CT_IN_LABELS = "ct"
BAD_LABELS = {  # what is written into the label file, and what the refusal must say
    "minus_one": (lambda v: np.where(v == 1, -1, v), np.int16, r"outside the FLARE ids 0-13 \(-1 \.\. 13\)"),
    "id_14": (lambda v: np.where(v == 13, 14, v), np.uint8, r"outside the FLARE ids 0-13 \(0 \.\. 14\)"),
    "id_255": (lambda v: np.where(v == 0, 255, v), np.uint8, r"outside the FLARE ids 0-13 \(1 \.\. 255\)"),
    "half": (lambda v: np.where(v == 5, 4.5, v), np.float32, r"not whole numbers \(e\.g\. 4\.5\)"),
    CT_IN_LABELS: (None, np.int16, r"outside the FLARE ids 0-13 \(-\d+ \.\. \d+\): is it a CT\?"),
}


@pytest.mark.parametrize("problem", list(BAD_LABELS))
def test_cache_refuses_labels_that_are_not_flare_ids(cohort, tmp_path, problem):
    dataset, cache = _copy_cohort(cohort, tmp_path), tmp_path / "cache"
    label = _label_path(dataset)
    change, dtype, message = BAD_LABELS[problem]
    if problem == CT_IN_LABELS:
        shutil.copyfile(dataset / "imagesTr" / f"{LAST_CASE}_0000.nii.gz", label)
    else:
        _rewrite_label(label, change, dtype)

    with pytest.raises(InputError, match=re.escape(f"labelsTr/{LAST_CASE}.nii.gz: holds ") + ".*" + message):
        prepare_cache(dataset, cache, progress=False)
    written = [p.relative_to(cache).as_posix() for p in cache.rglob("*") if p.is_file()]
    assert not [name for name in written if LAST_CASE in name or "/." in name], written  # nothing half-written


# -- item 11: stopped before training, in one line ----------------------------------------------------------------


def test_train_refuses_label_id_14_before_any_stage_runs(cohort, tmp_path):
    dataset, out = _copy_cohort(cohort, tmp_path), tmp_path / "trained"
    _rewrite_label(_label_path(dataset), lambda voxels: np.where(voxels == 13, 14, voxels))
    message = _one_line_error(_train_command(dataset, out))
    assert f"labelsTr/{LAST_CASE}.nii.gz" in message and "0-13" in message, message
    assert not (out / "flare22_coarse").exists()  # no stage started


FAIL_IN_EPOCH_3 = [  # 3 training cases, batch 2: 2 iterations an epoch, the 5th is the first of epoch 3
    "$@train#trainer.add_event_handler(ignite.engine.Events.ITERATION_COMPLETED(once=5), "
    "lambda e: (_ for _ in ()).throw(RuntimeError('injected failure')))",
    "$@train#trainer.run()",
]


def test_resume_that_does_not_fit_the_saved_state_names_train_state(cohort, tmp_path):
    dataset, out = _copy_cohort(cohort, tmp_path), tmp_path / "trained"
    overrides = [*TINY_OVERRIDES, "max_epochs=3", {"coarse": {"run": FAIL_IN_EPOCH_3}}]
    with pytest.raises(Exception, match="Failed to evaluate"):
        train_cascade(dataset, out, stages="coarse", device="cpu", num_val=1, evaluate=False, progress=False,
                      overrides=overrides)
    state = out / "flare22_coarse" / "train_state"
    assert list(state.glob("*epoch=2.pt"))  # the stage stopped in epoch 3 with epoch 2 saved

    message = _one_line_error(_train_command(dataset, out, "coarse#network_def#channels=[4,8,8,8,16]"))
    assert f"{state}: the saved training state" in message and f"delete {state}" in message, message
    assert "size mismatch" in message, message
    message = _one_line_error(_train_command(dataset, out, epochs=1))
    assert f"{state}: the saved training state is at epoch 2, past this run's max_epochs 1" in message, message
    assert list(state.glob("*epoch=2.pt"))  # the saved state is left for the user to decide
