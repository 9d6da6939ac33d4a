"""Issue 20, the second hostile probe, on ``flare-c2f segment``: an existing file that the run did not write is
never replaced without ``--overwrite``; every option is checked before any work; a finished output counts only for
the same input content and the same options. Tiny random-weight stages, as in ``test_segment.py``."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from flare_c2f_extensions.__main__ import main
from flare_c2f_extensions.files import PROVENANCE_KEY

from helpers import TINY_STAGES, write_dicom_series, write_phantom

RANDOM = ["--require_weights", "false", "--threads", "1", "--stage_overrides", json.dumps(TINY_STAGES)]


def refused(argv: list[str]) -> str:
    """The one-line message of a command that must stop with an error."""
    with pytest.raises(SystemExit) as stop:
        main(argv)
    message = str(stop.value.code)
    assert message.startswith("error: ") and "\n" not in message, message
    return message


def report_of(out: Path) -> dict:
    return json.loads((out / "segment_report.json").read_text())


@pytest.fixture(scope="module")
def phantom(tmp_path_factory) -> Path:
    return write_phantom(tmp_path_factory.mktemp("probe") / "a_0000.nii.gz")


# -- 1. -o over another CT or a hand-corrected map -----------------------------------------------------------------


def test_output_file_that_is_another_ct_or_an_edited_map_is_never_replaced(phantom, tmp_path):
    other_ct = write_phantom(tmp_path / "B.nii.gz", seed=9)
    before = other_ct.read_bytes()
    message = refused(["segment", "-i", str(phantom), "-o", str(other_ct), *RANDOM])
    assert str(other_ct) in message and "not written by flare-c2f" in message and "--overwrite" in message
    assert other_ct.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["B.nii.gz"]  # no sidecars, no report

    ours = tmp_path / "seg.nii.gz"
    main(["segment", "-i", str(phantom), "-o", str(ours), *RANDOM])
    written = nib.load(str(ours))
    corrected = np.asarray(written.dataobj).astype(np.float32)  # hand-corrected, saved as float32 by a viewer
    corrected[0, 0, 0] = 13
    nib.save(nib.Nifti1Image(corrected, written.affine), str(ours))
    before = ours.read_bytes()
    assert "not written by flare-c2f" in refused(["segment", "-i", str(phantom), "-o", str(ours), *RANDOM])
    assert ours.read_bytes() == before

    edited = np.asarray(written.dataobj).copy()  # edited in place, header (and our record) kept
    edited[0, 0, 0] = 13
    nib.save(nib.Nifti1Image(edited, written.affine, written.header), str(ours))
    before = ours.read_bytes()
    assert "changed after flare-c2f wrote it" in refused(["segment", "-i", str(phantom), "-o", str(ours), *RANDOM])
    assert ours.read_bytes() == before

    main(["segment", "-i", str(phantom), "-o", str(ours), "--overwrite", *RANDOM])  # the user's explicit choice
    assert np.asarray(nib.load(str(ours)).dataobj)[0, 0, 0] != 13 or ours.read_bytes() != before


def test_output_that_is_a_folder_is_refused_before_any_work(phantom, tmp_path):
    folder = tmp_path / "x.nii.gz"
    folder.mkdir()
    for extra in ([], ["--overwrite"]):
        message = refused(["segment", "-i", str(phantom), "-o", str(folder), *extra, *RANDOM])
        assert "is a folder" in message and str(phantom) not in message
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.nii.gz"] and not any(folder.iterdir())


# -- 2. a series b/ and a CT b.nii.gz in one input folder ------------------------------------------------------------


def test_two_inputs_with_one_output_name_never_overwrite_each_other_on_a_rerun(phantom, tmp_path):
    inputs, out = tmp_path / "in", tmp_path / "out"
    write_dicom_series(nib.load(str(phantom)), inputs / "b")
    write_phantom(inputs / "b.nii.gz", seed=11)
    for run in range(2):
        with pytest.raises(SystemExit) as stop:
            main(["segment", "-i", str(inputs), "-o", str(out), *RANDOM])
        assert stop.value.code == 3  # the second input fails as a case: its output name is taken
        cases = sorted(report_of(out)["cases"], key=lambda case: case["input"])
        assert [case["status"] for case in cases] == (["done", "failed"] if run == 0 else ["exists", "failed"])
        if run == 0:
            first = (out / "b.nii.gz").read_bytes()
    assert (out / "b.nii.gz").read_bytes() == first
    record = json.loads(nib.load(str(out / "b.nii.gz")).header.extensions[-1].get_content())[PROVENANCE_KEY]
    assert record["input"] == str((inputs / "b").resolve())


# -- 3. a misspelled option is refused before the run -----------------------------------------------------------------


def test_a_misspelled_option_stops_before_any_work(phantom, tmp_path, monkeypatch):
    out = tmp_path / "out"
    main(["segment", "-i", str(phantom), "-o", str(out), "--organs", "liver", *RANDOM])
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    message = refused(["segment", "-i", str(phantom), "-o", str(out), "--overwrite", "--orgns", "spleen", *RANDOM])
    assert "--orgns" in message and "--organs" in message
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before

    import flare_c2f_extensions.train as train_module

    monkeypatch.setattr(train_module, "train_cascade", lambda *a, **k: pytest.fail("training started"))
    message = refused(["train", "--dataset_dir", str(tmp_path), "--out", str(tmp_path / "t"), "--epoch", "1"])
    assert "--epoch" in message and "--epochs" in message and not (tmp_path / "t").exists()
    for bad in (["--seed", "abc"], ["--max_voxels", "abc"], ["--amp", "maybe"]):
        message = refused(["segment", "-i", str(phantom), "-o", str(tmp_path / "o2"), *RANDOM, *bad])
        assert bad[0] in message and not (tmp_path / "o2").exists()


# -- 4. a rerun with other options or another input ------------------------------------------------------------------


def test_a_rerun_with_other_options_or_a_changed_input_redoes_the_case(phantom, tmp_path):
    image, out = tmp_path / "in" / "a_0000.nii.gz", tmp_path / "out"
    image.parent.mkdir()
    shutil.copy(phantom, image)
    main(["segment", "-i", str(image.parent), "-o", str(out), "--organs", "liver", *RANDOM])
    main(["segment", "-i", str(image.parent), "-o", str(out), "--organs", "liver", *RANDOM])
    assert [case["status"] for case in report_of(out)["cases"]] == ["exists"]

    main(["segment", "-i", str(image.parent), "-o", str(out), "--statistics", "--per_organ", "--preview", *RANDOM])
    case = report_of(out)["cases"][0]
    assert case["status"] == "done" and "other options (organs" in case["redone"]
    for name in ("a_statistics.json", "a_statistics.csv", "a_preview.png", "a_organs"):
        assert (out / name).exists(), name
    statistics = json.loads((out / "a_statistics.json").read_text())
    assert len(statistics["organs"]) == 13 and report_of(out)["organs"] == list(statistics["organs"])

    (out / "a_preview.png").unlink()  # an output asked for again but gone
    main(["segment", "-i", str(image.parent), "-o", str(out), "--preview", *RANDOM])
    assert "a_preview.png" in report_of(out)["cases"][0]["redone"] and (out / "a_preview.png").exists()

    write_phantom(image, seed=12)  # the CT at the same path replaced: its old label map is stale
    main(["segment", "-i", str(image.parent), "-o", str(out), *RANDOM])
    case = report_of(out)["cases"][0]
    assert case["status"] == "done" and "input has changed" in case["redone"]
    assert nib.load(str(out / "a.nii.gz")).shape == nib.load(str(image)).shape
