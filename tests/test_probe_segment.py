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

from flare_c2f_extensions.cli.commands import main
from flare_c2f_extensions.io.files import PROVENANCE_KEY

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

    import flare_c2f_extensions.training.train as train_module

    monkeypatch.setattr(train_module, "train_cascade", lambda *a, **k: pytest.fail("training started"))
    message = refused(["train", "--dataset_dir", str(tmp_path), "--out", str(tmp_path / "t"), "--epoch", "1"])
    assert "--epoch" in message and "--epochs" in message and not (tmp_path / "t").exists()
    assert "needs organ names" in refused(["segment", "-i", str(phantom), "-o", str(tmp_path / "o2"), "--organs"])
    assert "needs an input and an output" in refused(["segment", "-i", str(phantom), "-o"])  # a flag without value
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


# -- 9. an unwritable or shared OpenVINO cache -----------------------------------------------------------------------


def _coarse_with_weights(tmp_path: Path):
    import torch

    from flare_c2f_extensions.cascade.networks import ResUNetASPP
    from flare_c2f_extensions.cascade.stages import load_stage

    from helpers import BUNDLES, TINY_CHANNELS, TINY_GRID

    checkpoint = tmp_path / "stage" / "models" / "model.pt"
    checkpoint.parent.mkdir(parents=True)
    torch.manual_seed(0)
    torch.save(ResUNetASPP(out_channels=14, channels=TINY_CHANNELS).state_dict(), checkpoint)
    overrides = {"bundle_root": str(tmp_path / "stage"), "spatial_size": TINY_GRID,
                 "network_def#channels": TINY_CHANNELS}
    return load_stage("coarse", BUNDLES / "flare22_coarse", "cpu", overrides, engine="openvino", amp=False)


def test_an_unwritable_openvino_cache_runs_uncached_and_a_written_one_is_shared(tmp_path, monkeypatch, caplog):
    import stat

    import torch

    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("FLARE_C2F_CACHE", str(blocker / "cache"))  # mkdir fails as under a read-only $HOME
    stage = _coarse_with_weights(tmp_path / "one")
    assert stage.engine.name == "openvino" and "runs uncached" in caplog.text
    assert stage.predict(torch.rand(1, 32, 32, 32), False).shape[1] == 14

    monkeypatch.setenv("FLARE_C2F_CACHE", str(tmp_path / "common_cache"))
    _coarse_with_weights(tmp_path / "two")
    written = [p for p in (tmp_path / "common_cache").rglob("*") if not p.name.startswith(".write-test")]
    assert any(p.name == "model.xml" for p in written)
    for path in written:  # readable by the other users of a shared cache (umask 022 in the tests)
        mode = stat.S_IMODE(path.stat().st_mode)
        assert mode & 0o044 == 0o044, f"{path} has mode {oct(mode)}"


# -- 10. one Segmenter from several threads with OpenVINO ------------------------------------------------------------


def test_one_openvino_segmenter_called_from_four_threads(phantom):
    from concurrent.futures import ThreadPoolExecutor

    from flare_c2f_extensions.runs.segment import Segmenter

    segmenter = Segmenter(organs="liver", require_weights=False, engine="openvino", stage_overrides=TINY_STAGES)
    assert segmenter.cascade.coarse.engine.name == "openvino"
    alone = np.asarray(segmenter(str(phantom)).dataobj)
    with ThreadPoolExecutor(4) as pool:
        together = list(pool.map(lambda _: np.asarray(segmenter(str(phantom)).dataobj), range(8)))
    assert all(np.array_equal(labels, alone) for labels in together)

    import torch  # the networks alone, many calls at once: tiny ones finish before a whole case can overlap

    engine, x = segmenter.cascade.coarse.engine, torch.rand(1, 1, 32, 32, 32)
    expected = engine(x)
    with ThreadPoolExecutor(4) as pool:
        logits = list(pool.map(lambda _: engine(x), range(200)))
    assert all(torch.equal(result, expected) for result in logits)


# -- 15. the small items ---------------------------------------------------------------------------------------------


def test_images_too_small_or_not_ct_are_refused_with_their_size(tmp_path):
    import flare_c2f_extensions as fce
    from flare_c2f_extensions.errors import InputError
    from flare_c2f_extensions.io.images import check_volume

    options = dict(require_weights=False, stage_overrides=TINY_STAGES, engine="torch", organs="liver")
    for shape in ((48, 48, 1), (4, 4, 4), (1, 1, 1), (48, 1, 32)):
        path = tmp_path / f"small_{'x'.join(map(str, shape))}.nii.gz"
        nib.save(nib.Nifti1Image(np.full(shape, -500, np.int16), np.eye(4)), str(path))
        with pytest.raises(InputError, match="too small for a CT volume") as error:
            fce.segment(str(path), **options)
        assert str(path) in str(error.value) and "x".join(map(str, shape)) in str(error.value)
    with pytest.raises(InputError, match="nibabel image given") as error:  # not the temporary file's name
        fce.segment(nib.Nifti1Image(np.full((4, 4, 4), -500, np.int16), np.eye(4)), **options)
    assert "flare-c2f-" not in str(error.value)

    complex_path = tmp_path / "complex.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((16, 16, 8), np.complex64), np.eye(4)), str(complex_path))
    with pytest.raises(InputError, match="complex-valued"):
        check_volume(complex_path)


def test_dicom_rescale_slope_zero_is_refused(phantom, tmp_path):
    import pydicom

    from flare_c2f_extensions.errors import InputError
    from flare_c2f_extensions.io.images import read_voxels

    series = write_dicom_series(nib.load(str(phantom)), tmp_path / "series")
    first = sorted(series.iterdir())[0]
    dataset = pydicom.dcmread(str(first))
    dataset.RescaleSlope = 0
    dataset.save_as(str(first))
    with pytest.raises(InputError, match="RescaleSlope is 0") as error:
        read_voxels(series)
    assert first.name in str(error.value)


def test_links_pipes_and_a_case_named_like_the_report(phantom, tmp_path):
    import os

    from flare_c2f_extensions.errors import InputError
    from flare_c2f_extensions.io.discovery import find_images
    from flare_c2f_extensions.runs.segment import resolve_inputs

    inputs = tmp_path / "in"
    write_dicom_series(nib.load(str(phantom)), inputs / "a")
    os.symlink("..", inputs / "loop")  # a link back up the tree
    os.symlink("a", inputs / "same")
    found = find_images(inputs, subdir="")
    assert [item["image"] for item in found] == [str(inputs / "a")]
    assert sum("same image as" in entry["reason"] for entry in found.ignored) == 2

    pipe = tmp_path / "pipe"
    os.mkfifo(pipe)
    with pytest.raises(InputError, match="not a file or a folder"):
        resolve_inputs(pipe)

    cts, out = tmp_path / "cts", tmp_path / "out"
    cts.mkdir()
    shutil.copy(phantom, cts / "segment_report_0000.nii.gz")
    main(["segment", "-i", str(cts), "-o", str(out), "--organs", "liver", *RANDOM])
    assert json.loads((out / "segment_report.json").read_text())["1"] == "liver"  # the case's names
    assert json.loads((out / "segment_report_run.json").read_text())["cases"][0]["status"] == "done"


def test_abandoned_staging_folders_are_removed_and_a_live_one_kept(phantom, tmp_path):
    import os

    out = tmp_path / "out"
    (out / ".a.partial-999999999-x").mkdir(parents=True)  # a killed run's (no such process)
    (out / f".a.partial-{os.getpid()}-y").mkdir()  # a live run's
    main(["segment", "-i", str(phantom), "-o", str(out), "--organs", "liver", *RANDOM])
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".")) == [f".a.partial-{os.getpid()}-y"]


INTERRUPTED_RUN = """
import sys, time
from pathlib import Path
import flare_c2f_extensions.io.outputs as outputs
from flare_c2f_extensions.cli.commands import console

def stall(labels, image_path, staging, *args):
    (staging / "half_written").write_text("")
    Path(sys.argv[1]).write_text(str(staging))
    time.sleep(300)

outputs._write_staged = stall
console(sys.argv[2:])
"""


@pytest.mark.parametrize("signal_name, status", [("SIGINT", 130), ("SIGTERM", 143)])
def test_ctrl_c_and_sigterm_end_in_one_line_and_leave_nothing_partial(phantom, tmp_path, signal_name, status):
    import os
    import signal
    import subprocess
    import sys
    import time

    from helpers import REPO

    marker, out = tmp_path / "staging_at", tmp_path / "out"
    command = [sys.executable, "-c", INTERRUPTED_RUN, str(marker), "segment", "-i", str(phantom), "-o", str(out),
               "--organs", "liver", *RANDOM]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 240
    while not marker.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert marker.exists(), process.communicate()[1]
    process.send_signal(getattr(signal, signal_name))
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == status, stderr
    assert "Traceback" not in stderr and stderr.strip().splitlines()[-1].startswith("error: ")
    assert not Path(marker.read_text()).exists() and not list(out.glob("a*"))


# -- beyond the probe: each organ's quality signals in the statistics and the run report -----------------------------


def test_segment_reports_quality_signals_and_flags_an_implausible_organ(phantom, tmp_path, capsys):
    reference = tmp_path / "volume_reference.json"
    reference.write_text(json.dumps({"organs": {"liver": {"min_ml": 1000.0, "max_ml": 2500.0}}}))
    out = tmp_path / "out"
    main(["segment", "-i", str(phantom), "-o", str(out), "--organs", "liver,spleen", "--statistics",
          "--reference", str(reference), *RANDOM])
    statistics = json.loads((out / "a_statistics.json").read_text())
    case = report_of(out)["cases"][0]
    assert set(statistics["organs"]) == set(case["quality"]) == {"liver", "spleen"}
    liver = statistics["organs"]["liver"]
    if liver["voxel_count"]:
        assert 0 < liver["mean_confidence"] <= 1 and 0 <= liver["confidence_p10"] <= liver["mean_confidence"]
        assert any(flag.startswith("volume: liver") for flag in liver["flags"])  # a phantom's liver is not 1-2.5 l
    else:
        assert liver["flags"] == ["missing: liver"]
    assert case["quality"]["liver"]["flags"] == liver["flags"]
    assert any("check the liver" in warning for warning in case["warnings"])
    assert "check the liver" in capsys.readouterr().err
    header = (out / "a_statistics.csv").read_text().splitlines()[0].split(",")
    assert header[-4:] == ["mean_confidence", "confidence_p10", "dropped_fraction", "flags"]


# -- my own probe, after the fixes: options whose values were checked only once the work had started --------------


def test_values_of_options_are_checked_before_any_file_is_written(phantom, cohort, tmp_path):
    out = tmp_path / "out"
    assert "unknown engine" in refused(["segment", "-i", str(phantom), "-o", str(out), *RANDOM, "--engine", "onnx"])
    assert not out.exists()
    trained = tmp_path / "trained"
    for bad, what in ((["--epochs", "abc"], "--epochs"), (["--epochs", "0"], "--epochs"),
                      (["--num_val", "abc"], "--num_val"), (["--num_val", "10"], "leaves no case to train")):
        message = refused(["train", "--dataset_dir", str(cohort), "--out", str(trained), *bad])
        assert what in message and not trained.exists(), message


def test_segment_takes_trains_override_syntax(phantom, tmp_path):
    """One override syntax (issue 19): ``--override "stage#key=value"`` (and ``all``/``refiner`` scopes, files) as
    ``train`` takes it; the same labels as the mapping form of ``--stage_overrides``."""
    from flare_c2f_extensions.options import cascade_overrides

    channels, grid = TINY_STAGES["coarse"]["network_def"]["channels"], TINY_STAGES["coarse"]["spatial_size"]
    keyed = [f"network_def#channels={json.dumps(channels)}", f"spatial_size={json.dumps(grid)}"]
    assert cascade_overrides(override=keyed)["refiner"] == {"network_def#channels": channels, "spatial_size": grid}
    assert cascade_overrides(override="solid#spatial_size=[8, 8, 8]") == {"solid": {"spatial_size": [8, 8, 8]}}
    common = ["--require_weights", "false", "--threads", "1", "--organs", "liver"]
    main(["segment", "-i", str(phantom), "-o", str(tmp_path / "a.nii.gz"), *common,
          "--override", json.dumps(keyed)])  # several: a list, as train takes them
    main(["segment", "-i", str(phantom), "-o", str(tmp_path / "b.nii.gz"), *common,
          "--stage_overrides", json.dumps(TINY_STAGES)])
    assert np.array_equal(np.asarray(nib.load(str(tmp_path / "a.nii.gz")).dataobj),
                          np.asarray(nib.load(str(tmp_path / "b.nii.gz")).dataobj))
    assert "one organ's" in refused(["segment", "-i", str(phantom), "-o", str(tmp_path / "c.nii.gz"), *common,
                                     "--override", "refiner_gallbladder#spatial_size=[8,8,8]"])
    # a bare "stage#key=value", as the README writes it for train: fire used to read "#" as a comment ("solid")
    main(["segment", "-i", str(phantom), "-o", str(tmp_path / "d.nii.gz"), *common, "--stage_overrides",
          json.dumps(TINY_STAGES), "--override", "solid#spatial_size=[64,64,64]"])
    assert not np.array_equal(np.asarray(nib.load(str(tmp_path / "d.nii.gz")).dataobj),
                              np.asarray(nib.load(str(tmp_path / "b.nii.gz")).dataobj))


def test_each_stage_config_is_parsed_once_per_segment_run(phantom, tmp_path, monkeypatch):
    """Issue 19: the stage configs were parsed three times on the way (weights check, segmenter, loading)."""
    import flare_c2f_extensions.cascade.configs as configs
    import flare_c2f_extensions.cascade.stages as stages

    parsed = []
    original = configs.read_stage_config

    def counted(bundle_dir, overrides=None, stage=None):
        parsed.append((Path(bundle_dir).name, (overrides or {}).get("organ")))
        return original(bundle_dir, overrides, stage)

    monkeypatch.setattr(configs, "read_stage_config", counted)
    monkeypatch.setattr(stages, "read_stage_config", counted)
    main(["segment", "-i", str(phantom), "-o", str(tmp_path / "seg.nii.gz"), *RANDOM, "--organs", "liver,gallbladder"])
    assert sorted(parsed) == sorted([("flare22_coarse", None), ("flare22_fine_solid", None),
                                     ("flare22_small_locator", None), ("flare22_small_refiner", "gallbladder")])


def test_a_ct_is_read_once_on_its_way_to_every_output(phantom, tmp_path, monkeypatch):
    """Issue 19: a case's headers were read up to four times and its voxels decoded twice with --statistics or
    --preview; now one CT object carries both from the command line to the written files."""
    import flare_c2f_extensions.io.images as images

    headers, decoded = [], []
    read_headers, read_voxels = images.image_geometry, images.read_voxels

    def counted_headers(path, what="image"):
        headers.append(Path(path).name)
        return read_headers(path, what)

    def counted_voxels(path, geometry=None):
        decoded.append(Path(path).name)
        return read_voxels(path, geometry)

    monkeypatch.setattr(images, "image_geometry", counted_headers)
    monkeypatch.setattr(images, "read_voxels", counted_voxels)
    main(["segment", "-i", str(phantom), "-o", str(tmp_path / "seg.nii.gz"), *RANDOM, "--statistics", "--preview",
          "--per_organ"])
    assert (tmp_path / "seg_statistics.json").is_file() and (tmp_path / "seg_preview.png").is_file()
    assert decoded == [phantom.name]
    assert headers.count(phantom.name) == 2  # the input's check before any work, then the case's one CT
