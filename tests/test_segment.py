"""``flare-c2f segment`` and ``flare_c2f_extensions.segment()``: from a CT file or DICOM series to organs and the
files people use, with tiny random-weight stages (``--require_weights false``; the plumbing does not depend on the
weights). Bad input ends with one line naming the problem and leaves nothing behind."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from PIL import Image

import flare_c2f_extensions
from flare_c2f_extensions.cli.commands import main
from flare_c2f_extensions.io.images import image_geometry
from flare_c2f_extensions.labels import ORGAN_IDS, ORGANS, SNOMED_ANATOMICAL_STRUCTURE, SNOMED_CT, label_names
from flare_c2f_extensions.runs.segment import Segmenter

from helpers import REPO, TINY_STAGES, write_phantom

RANDOM = ["--require_weights", "false", "--threads", "1", "--stage_overrides", json.dumps(TINY_STAGES)]


def write_series(image_path: Path, folder: Path) -> Path:
    """The phantom as a CT DICOM series (the writer of test_real_ct) with the Frame of Reference a scanner gives."""
    import pydicom
    from pydicom.uid import generate_uid

    from helpers import write_dicom_series

    write_dicom_series(nib.load(str(image_path)), folder)
    frame = generate_uid()
    for path in folder.iterdir():
        dataset = pydicom.dcmread(str(path))
        dataset.FrameOfReferenceUID = frame
        dataset.save_as(str(path))
    return folder


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    command = [sys.executable, "-m", "flare_c2f_extensions", "segment", *args]
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def labels_of(path: Path) -> np.ndarray:
    return np.asarray(nib.load(str(path)).dataobj)


@pytest.fixture(scope="module")
def phantom(tmp_path_factory) -> Path:
    return write_phantom(tmp_path_factory.mktemp("phantom") / "abdomen_0000.nii.gz")


@pytest.fixture(scope="module")
def cli_run(phantom, tmp_path_factory) -> Path:
    """The command as a user types it, on the phantom, with every optional output; returns the output folder."""
    out = tmp_path_factory.mktemp("cli") / "out"
    result = run_cli("-i", str(phantom), "-o", str(out), "--per_organ", "--statistics", "--preview", *RANDOM,
                     cwd=phantom.parent)
    assert result.returncode == 0, result.stderr
    assert "abdomen" in result.stderr.splitlines()[-1]  # one progress line per case
    return out


@pytest.fixture(scope="module")
def series(phantom, tmp_path_factory) -> Path:
    return write_series(phantom, tmp_path_factory.mktemp("dicom") / "abdomen")


def test_label_map_has_the_inputs_geometry_and_names(cli_run, phantom):
    written, source = nib.load(str(cli_run / "abdomen.nii.gz")), nib.load(str(phantom))
    assert written.shape == source.shape and written.get_data_dtype() == np.uint8
    assert np.array_equal(written.affine, source.affine)
    assert np.array_equal(written.header.get_qform(), source.header.get_qform())
    assert np.array_equal(written.header.get_sform(), source.header.get_sform())
    assert set(np.unique(labels_of(cli_run / "abdomen.nii.gz"))) <= set(range(14))
    names = json.loads((cli_run / "abdomen.json").read_text())
    assert names == {"0": "background", **{str(i): name for i, name in ORGANS.items()}}
    comments = [ext for ext in written.header.extensions if ext.get_code() == 6]
    assert [json.loads(ext.get_content()) for ext in comments][0] == names
    provenance = json.loads(comments[1].get_content())["flare_c2f_provenance"]  # what a rerun compares
    assert provenance["input"] == str(phantom.resolve()) and len(provenance["labels_options"]["organs"]) == 13
    assert b"abdomen.json" in written.header["descrip"].item()
    itksnap = (cli_run / "abdomen.itksnap.txt").read_text().splitlines()
    assert all(any(line.split()[0] == str(i) and f'"{name}"' in line for line in itksnap) for i, name in ORGANS.items())
    slicer = [line.split() for line in (cli_run / "abdomen.ctbl").read_text().splitlines() if not line.startswith("#")]
    assert [(row[0], row[1]) for row in slicer] == list(names.items())


def test_per_organ_masks_add_up_to_the_label_map(cli_run):
    labels = labels_of(cli_run / "abdomen.nii.gz")
    folder = cli_run / "abdomen_organs"
    assert sorted(p.name for p in folder.iterdir()) == sorted(f"{name}.nii.gz" for name in ORGAN_IDS)
    union = np.zeros_like(labels)
    for name, organ in ORGAN_IDS.items():
        mask = labels_of(folder / f"{name}.nii.gz")
        assert set(np.unique(mask)) <= {0, 1}
        assert not (union.astype(bool) & mask.astype(bool)).any()
        union[mask == 1] = organ
    assert np.array_equal(union, labels)
    liver, whole = nib.load(str(folder / "liver.nii.gz")), nib.load(str(cli_run / "abdomen.nii.gz"))
    assert np.array_equal(liver.affine, whole.affine) and liver.shape == whole.shape


def test_statistics_are_exact(cli_run, phantom):
    labels = labels_of(cli_run / "abdomen.nii.gz")
    source = nib.load(str(phantom))
    hu = source.get_fdata()
    stats = json.loads((cli_run / "abdomen_statistics.json").read_text())
    assert np.isclose(stats["voxel_volume_ml"], np.prod(source.header.get_zooms()) / 1000, rtol=1e-6)
    rows = {row["organ"]: row for row in csv.DictReader((cli_run / "abdomen_statistics.csv").open())}
    assert set(stats["organs"]) == set(rows) == set(ORGAN_IDS)
    found = 0
    for name, entry in stats["organs"].items():
        mask = labels == ORGAN_IDS[name]
        count = int(mask.sum())
        assert entry["voxel_count"] == count == int(rows[name]["voxel_count"])
        assert entry["volume_ml"] == count * stats["voxel_volume_ml"]
        if count:
            found += 1
            assert entry["mean_hu"] == np.mean(hu[mask]) and entry["median_hu"] == np.median(hu[mask])
            border = mask[[0, -1]].any() or mask[:, [0, -1]].any() or mask[:, :, [0, -1]].any()
            assert entry["touches_border"] == bool(border)
            assert float(rows[name]["mean_hu"]) == entry["mean_hu"]
        else:
            assert entry["mean_hu"] is None and rows[name]["mean_hu"] == ""
    assert found >= 3  # random weights still claim some organs: the checks above compared real numbers


def test_preview_and_run_report(cli_run):
    preview = Image.open(cli_run / "abdomen_preview.png")
    assert preview.mode == "RGB" and preview.width > 48 and preview.height >= 32
    report = json.loads((cli_run / "segment_report.json").read_text())
    assert report["flare_c2f_extensions"] == flare_c2f_extensions.__version__
    assert report["torch"] == torch.__version__ and report["monai"]
    assert report["device"] == "cpu" and report["threads"] == 1 and isinstance(report["amp"], bool)
    assert len(report["random_weight_stages"]) == 9
    (case,) = report["cases"]
    assert case["status"] == "done" and case["seconds"] > 0 and case["peak_rss_mb"] > 0
    assert set(case["stage_seconds"]) >= {"load", "coarse", "solid", "postprocess"}
    assert Path(case["outputs"][-1]).name == "abdomen.nii.gz"
    assert not [p for p in cli_run.iterdir() if p.name.startswith(".")]  # no staging folder left


def test_api_equals_the_command_voxel_for_voxel(cli_run, phantom):
    options = dict(stage_overrides=TINY_STAGES, require_weights=False, threads=1)
    image, stats = flare_c2f_extensions.segment(str(phantom), statistics=True, **options)
    assert isinstance(image, nib.Nifti1Image)
    assert np.array_equal(np.asarray(image.dataobj), labels_of(cli_run / "abdomen.nii.gz"))
    assert np.array_equal(image.affine, nib.load(str(phantom)).affine)
    assert stats == json.loads((cli_run / "abdomen_statistics.json").read_text())
    in_memory = flare_c2f_extensions.segment(nib.load(str(phantom)), **options)  # a notebook's image, no file
    assert np.array_equal(np.asarray(in_memory.dataobj), np.asarray(image.dataobj))
    assert np.array_equal(in_memory.affine, image.affine)


def test_organ_subset_runs_only_its_stages(phantom, tmp_path):
    out = tmp_path / "liver_gallbladder.nii.gz"
    main(["segment", "-i", str(phantom), "-o", str(out), "--organs", "liver,gallbladder", *RANDOM])
    report = json.loads((tmp_path / "liver_gallbladder_report.json").read_text())
    assert report["stages"] == ["coarse", "solid", "locator", "refiner:gallbladder"]
    assert set(np.unique(labels_of(out))) <= {0, 1, 9}
    assert json.loads((tmp_path / "liver_gallbladder.json").read_text()) == label_names((1, 9))


def test_weights_folder_is_found(phantom, tmp_path):
    """``--bundles_dir`` may hold just the weights (``<bundle>/models/``): the configs come from the shipped bundles."""
    from flare_c2f_extensions.cascade.stages import load_stage

    weights = tmp_path / "trained"
    torch.manual_seed(1)
    for stage, bundle in [("coarse", "flare22_coarse"), ("solid", "flare22_fine_solid")]:
        network = load_stage(stage, REPO / "bundles" / bundle, "cpu", TINY_STAGES[stage], require_weights=False).network
        (weights / bundle / "models").mkdir(parents=True)
        torch.save(network.state_dict(), weights / bundle / "models" / "model.pt")
    segmenter = Segmenter(
        organs="liver", bundles_dir=weights, stage_overrides=TINY_STAGES, threads=1, engine="torch"
    )
    assert segmenter.random_weight_stages == []
    expected = torch.load(weights / "flare22_coarse" / "models" / "model.pt", weights_only=True)
    for key, value in segmenter.cascade.coarse.network.state_dict().items():
        assert torch.equal(value.cpu(), expected[key])
    assert set(np.unique(segmenter.labels(phantom)[0])) <= {0, 1}


def test_dicom_series_gives_the_same_organs_and_a_dicom_seg(series, cli_run, tmp_path):
    import highdicom as hd
    import pydicom

    from flare_c2f_extensions.io.dicom import DicomSeries

    out = tmp_path / "out"
    main(["segment", "-i", str(series), "-o", str(out), "--dicom_seg", "--statistics", *RANDOM])
    labels = labels_of(out / "abdomen.nii.gz")
    geometry = image_geometry(series)
    assert labels.shape == geometry.shape
    assert np.allclose(nib.load(str(out / "abdomen.nii.gz")).affine, geometry.affine, atol=1e-4)  # float32 sform
    assert np.array_equal(labels, labels_of(cli_run / "abdomen.nii.gz"))  # same image, same organs
    assert json.loads((out / "abdomen.json").read_text()) == label_names()

    seg = hd.seg.segread(str(out / "abdomen_seg.dcm"))
    files = DicomSeries.read(series, pixels=False).files
    sources = [pydicom.dcmread(str(path), stop_before_pixels=True) for path in files]
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == sources[0].SeriesInstanceUID
    referenced = {item.ReferencedSOPInstanceUID for item in seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence}
    assert referenced == {source.SOPInstanceUID for source in sources}
    segment_ids = {}
    for number in seg.segment_numbers:
        description = seg.get_segment_description(number)
        organ = ORGAN_IDS[description.segment_label]
        value, meaning, laterality = SNOMED_CT[organ]
        code = description.segmented_property_type
        assert (code.value, code.meaning) == (value, meaning)
        assert description.segmented_property_category.value == SNOMED_ANATOMICAL_STRUCTURE[0]
        modifiers = description.get("SegmentedPropertyTypeModifierCodeSequence", [])
        assert [m.CodeMeaning.lower() for m in modifiers] == ([laterality] if laterality else [])
        segment_ids[number] = organ
    assert sorted(segment_ids.values()) == list(ORGANS)
    frames = seg.get_pixels_by_source_instance(
        source_sop_instance_uids=[source.SOPInstanceUID for source in sources], combine_segments=True,
        relabel=False, ignore_spatial_locations=True,
    )
    lut = np.zeros(256, dtype=np.uint8)
    lut[list(segment_ids)] = list(segment_ids.values())
    assert np.array_equal(lut[frames].transpose(2, 1, 0), labels)


def test_snomed_codes_are_dicoms():
    """The codes in labels.py are those of DICOM's code dictionary (pydicom ships it)."""
    from pydicom.sr.codedict import codes

    for value, meaning, laterality in SNOMED_CT.values():
        code = getattr(codes.SCT, "".join(word.capitalize() for word in meaning.split()))
        assert (code.value, code.meaning) == (value, meaning)
        if laterality:
            assert getattr(codes.SCT, laterality.capitalize()).meaning == laterality.capitalize()
    assert codes.SCT.AnatomicalStructure.value == SNOMED_ANATOMICAL_STRUCTURE[0]


# -- bad input -----------------------------------------------------------------------------------------------------


def two_series_folder(series: Path, phantom: Path, tmp_path: Path) -> Path:
    other = write_series(phantom, tmp_path / "other")
    both = tmp_path / "both"
    shutil.copytree(series, both)
    for path in other.iterdir():
        shutil.copy(path, both / f"B{path.name}")
    return both


@pytest.mark.parametrize(
    "problem, expected",
    [
        ("missing_file", "input does not exist"),
        ("folder_without_cts", "no NIfTI images"),
        ("unwritable_output", "output folder cannot be created"),
        ("unknown_organ", "unknown organ 'livr'; valid names: liver, right_kidney"),
        ("two_series", "holds 2 DICOM series"),
        ("seg_of_nifti", "--dicom_seg needs the DICOM series"),
        ("no_weights", "no trained weights for stage coarse"),
        ("zero_threads", "--threads: expected a positive whole number"),
    ],
)
def test_bad_input_is_one_line_and_leaves_nothing(problem, expected, phantom, series, tmp_path, capsys):
    image, out, extra = str(phantom), tmp_path / "out", list(RANDOM)
    named = image
    if problem == "missing_file":
        image = named = str(tmp_path / "missing_0000.nii.gz")
    elif problem == "folder_without_cts":
        (tmp_path / "notes").mkdir()
        (tmp_path / "notes" / "readme.txt").write_text("no CT here")
        image = named = str(tmp_path / "notes")
    elif problem == "unwritable_output":
        (tmp_path / "blocker").write_text("a regular file")
        out = tmp_path / "blocker" / "out"
        named = str(out)
    elif problem == "unknown_organ":
        extra += ["--organs", "liver,livr"]
        named = "--organs"
    elif problem == "two_series":
        image = named = str(two_series_folder(series, phantom, tmp_path))
    elif problem == "seg_of_nifti":
        extra += ["--dicom_seg"]
    elif problem == "zero_threads":
        extra += ["--threads", "0"]
        named = "0"
    elif problem == "no_weights":
        extra = ["--threads", "1"]
        named = "--require_weights false"
    with pytest.raises(SystemExit) as exit_:
        main(["segment", "-i", image, "-o", str(out), *extra])
    message = str(exit_.value.code)
    assert message.startswith("error: ") and "\n" not in message
    assert expected in message and named in message
    assert capsys.readouterr().err == ""  # nothing printed before the one line
    assert not out.exists()
    if problem == "unwritable_output":
        assert (tmp_path / "blocker").read_text() == "a regular file"


def test_command_exit_status_and_stderr(phantom, tmp_path):
    result = run_cli("-i", str(phantom), "-o", str(tmp_path / "out"), "--organs", "kidney", cwd=tmp_path)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        f"error: --organs: unknown organ 'kidney'; valid names: {', '.join(ORGAN_IDS)}"
    ]
    assert not (tmp_path / "out").exists()


def test_a_failing_output_keeps_the_previous_files(phantom, tmp_path, monkeypatch, capsys):
    from flare_c2f_extensions.io import outputs

    out = tmp_path / "seg.nii.gz"
    main(["segment", "-i", str(phantom), "-o", str(out), "--statistics", *RANDOM])
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file() and "report" not in p.name}

    def broken(*args):
        raise OSError("disk full")

    monkeypatch.setattr(outputs, "preview_rgb", broken)
    with pytest.raises(SystemExit) as exit_:
        main(["segment", "-i", str(phantom), "-o", str(out), "--statistics", "--per_organ", "--preview",
              "--overwrite", *RANDOM])
    assert exit_.value.code == 3  # a case failed (README, "Inputs")
    after = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file() and "report" not in p.name}
    assert "disk full" in capsys.readouterr().err
    assert after == before  # the earlier run's files, untouched; no masks, no preview, no half-written file
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".") or p.is_dir()]
    report = json.loads((tmp_path / "seg_report.json").read_text())
    assert report["cases"][0]["status"] == "failed" and "disk full" in report["cases"][0]["error"]


def test_output_folder_holding_the_inputs_is_refused(tmp_path, capsys):
    folder = tmp_path / "cts"
    image = write_phantom(folder / "abdomen.nii.gz")  # no _0000: the label map would be named like the input
    before = image.read_bytes()
    for output in (folder, image):
        with pytest.raises(SystemExit) as exit_:
            main(["segment", "-i", str(folder if output == folder else image), "-o", str(output), *RANDOM])
        message = str(exit_.value.code)
        assert message.startswith("error: ") and "input" in message and "\n" not in message
    assert image.read_bytes() == before and sorted(p.name for p in folder.iterdir()) == ["abdomen.nii.gz"]


def test_rerun_redoes_a_truncated_output_and_keeps_a_finished_one(phantom, tmp_path):
    out = tmp_path / "out"
    main(["segment", "-i", str(phantom.parent), "-o", str(out), *RANDOM])
    label_map = out / "abdomen.nii.gz"
    finished = label_map.read_bytes()
    main(["segment", "-i", str(phantom.parent), "-o", str(out), *RANDOM])
    report = json.loads((out / "segment_report.json").read_text())
    assert [case["status"] for case in report["cases"]] == ["exists"]
    label_map.write_bytes(finished[: len(finished) // 2])
    main(["segment", "-i", str(phantom.parent), "-o", str(out), *RANDOM])
    report = json.loads((out / "segment_report.json").read_text())
    assert report["cases"][0]["status"] == "done" and "cannot be read whole" in report["cases"][0]["redone"]
    assert label_map.read_bytes() == finished


def test_a_failed_case_gives_exit_status_3_after_the_others(phantom, tmp_path, capsys):
    folder = tmp_path / "cts"
    folder.mkdir()
    shutil.copy(phantom, folder / "good_0000.nii.gz")
    (folder / "broken_0000.nii.gz").write_bytes(phantom.read_bytes()[:2000])  # truncated
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exit_:
        main(["segment", "-i", str(folder), "-o", str(out), *RANDOM])
    assert exit_.value.code == 3
    assert (out / "good.nii.gz").is_file() and not (out / "broken.nii.gz").exists()
    report = json.loads((out / "segment_report.json").read_text())
    assert {case["case"]: case["status"] for case in report["cases"]} == {"broken": "failed", "good": "done"}
    assert "broken_0000.nii.gz" in capsys.readouterr().err


def test_voxel_limit_and_engine_reach_the_cascade(phantom, tmp_path, capsys):
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exit_:
        main(["segment", "-i", str(phantom), "-o", str(out), "--max_voxels", "1000", "--engine", "torch", *RANDOM])
    assert exit_.value.code == 3
    assert "more than the cascade's limit of 1000" in capsys.readouterr().err
    report = json.loads((out / "segment_report.json").read_text())
    assert report["cases"][0]["status"] == "failed" and not (out / "abdomen.nii.gz").exists()
    with pytest.raises(SystemExit) as exit_:
        main(["segment", "-i", str(phantom), "-o", str(out), "--engine", "tensorrt", *RANDOM])
    assert str(exit_.value.code).startswith("error: ") and "tensorrt" in str(exit_.value.code)


def test_a_folder_read_ahead_gives_each_case_its_own_labels_and_warnings(tmp_path, monkeypatch):
    """Issue 21: while a case runs the next one's CT is decoded on a background thread. Each label map must be the one
    the case gives alone, and a warning raised by reading a case (NaN voxels) must land in that case's entry, not in
    the entry of the case running while it was read."""
    from flare_c2f_extensions.runs import segment as segment_module

    folder = tmp_path / "cts"
    for name, seed in (("a", 3), ("b", 4), ("c", 5)):
        write_phantom(folder / f"{name}_0000.nii.gz", seed=seed)
    image = nib.load(str(folder / "b_0000.nii.gz"))
    hu = np.asarray(image.dataobj).astype(np.float32)
    air = hu <= -1000
    assert air.any()
    hu[air] = np.nan  # NaN becomes air: the same labels, and a warning
    with_nan = nib.Nifti1Image(hu, image.affine)  # float32 on disk: NaN survives
    with_nan.set_qform(image.affine, 1)
    with_nan.set_sform(image.affine, 1)
    nib.save(with_nan, str(folder / "b_0000.nii.gz"))

    read = []
    original = segment_module.SegmentWork.read_ahead

    def recorded(self, case):
        read.append(case.name)
        return original(self, case)

    monkeypatch.setattr(segment_module.SegmentWork, "read_ahead", recorded)
    main(["segment", "-i", str(folder), "-o", str(tmp_path / "together"), *RANDOM])
    assert read == ["b", "c"]
    report = json.loads((tmp_path / "together" / "segment_report.json").read_text())
    warnings = {case["case"]: " ".join(case.get("warnings", [])) for case in report["cases"]}
    assert "NaN voxel(s)" in warnings["b"]
    assert "NaN" not in warnings["a"] and "NaN" not in warnings["c"]
    for name in ("a", "b", "c"):
        alone = tmp_path / f"{name}.nii.gz"
        main(["segment", "-i", str(folder / f"{name}_0000.nii.gz"), "-o", str(alone), *RANDOM])
        together = np.asarray(nib.load(str(tmp_path / "together" / f"{name}.nii.gz")).dataobj)
        assert np.array_equal(together, np.asarray(nib.load(str(alone)).dataobj)), name
