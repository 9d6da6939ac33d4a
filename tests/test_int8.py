"""The opt-in INT8 engine (OpenVINO with NNCF post-training quantisation): choosing it, what it needs, and its cache,
keyed by the calibration CTs' content, the quantisation settings and the weights that place each stage's box."""

from __future__ import annotations

import shutil
import sys

import nncf
import numpy as np
import pytest
import torch

from flare_c2f_extensions.cascade import engines, int8
from flare_c2f_extensions.cascade.pipeline import Cascade
from flare_c2f_extensions.errors import InputError

from helpers import BUNDLES, TINY_STAGES

ORGANS = ["liver"]  # two stages: coarse and solid


@pytest.fixture(autouse=True)
def engine_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FLARE_C2F_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture
def quantised(monkeypatch):
    """The stages NNCF quantises (each call's model name), counted."""
    calls = []

    def counting(model, *args, **kwargs):
        calls.append(model.get_friendly_name())
        return quantize(model, *args, **kwargs)

    quantize = nncf.quantize
    monkeypatch.setattr(nncf, "quantize", counting)
    return calls


@pytest.fixture
def threads():
    before = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(before)


def test_int8_is_chosen_by_name_only_on_a_cpu_and_needs_nncf_and_calibration(monkeypatch, tmp_path):
    assert engines.resolve_engine("openvino-int8", "cpu") == "openvino-int8"
    assert engines.resolve_engine("auto", "cpu") == "openvino"  # opt-in: auto never quantises
    with pytest.raises(engines.EngineError, match="CPU only"):
        engines.resolve_engine("openvino-int8", "cuda")
    with pytest.raises(engines.EngineError, match="needs calibration CTs"):
        Cascade.from_bundles(BUNDLES, device="cpu", engine="openvino-int8", stage_overrides=TINY_STAGES,
                             require_weights=False, organs=ORGANS)
    with pytest.raises(InputError, match="no such folder or datalist"):
        int8.check_calibration(tmp_path / "nowhere")
    monkeypatch.setitem(sys.modules, "nncf", None)  # as if not installed
    with pytest.raises(engines.EngineError, match="pip install nncf"):
        engines.resolve_engine("openvino-int8", "cpu")
    assert engines.resolve_engine("openvino", "cpu") == "openvino"


def test_a_datalist_names_the_same_calibration_set_as_its_folder(cohort, tmp_path):
    images = sorted((cohort / "imagesTr").glob("*.nii.gz"))
    datalist = tmp_path / "datalist.json"
    datalist.write_text('{"training": [' + ", ".join(f'{{"image": "{p}"}}' for p in images[::-1]) + "]}")
    assert int8.calibration_sha256(int8.check_calibration(datalist)) == int8.calibration_sha256(images)
    assert int8.calibration_images(cohort) == images  # a FLARE-layout dataset: its imagesTr


def _checkpoints(folder, seed=0):
    """Seeded random tiny weights for the stages ORGANS need, as checkpoints (so that they are cached)."""
    torch.manual_seed(seed)
    random = Cascade.from_bundles(BUNDLES, device="cpu", stage_overrides=TINY_STAGES, require_weights=False,
                                  organs=ORGANS, engine="torch")
    folder.mkdir(parents=True, exist_ok=True)
    overrides = {}
    for stage in random.stages:
        torch.save(stage.network.state_dict(), folder / f"{stage.name}.pt")
        overrides[stage.name] = {**TINY_STAGES[stage.name], "ckpt_path": str(folder / f"{stage.name}.pt")}
    return overrides


def _calibration(cohort, folder):
    folder.mkdir()
    for path in sorted((cohort / "imagesTr").glob("*.nii.gz"))[:2]:
        shutil.copy(path, folder / path.name)
    return folder


def _int8(overrides, calibration):
    cascade = Cascade.from_bundles(BUNDLES, device="cpu", stage_overrides=overrides, organs=ORGANS,
                                   engine="openvino-int8", calibration=calibration)
    assert cascade.engine == "openvino-int8" and {s.engine.name for s in cascade.stages} == {"openvino-int8"}
    return cascade


def _int8_models(cache):
    return {p.name for p in (cache / "openvino").glob("int8-*") if (p / "model.xml").is_file()}


def test_int8_models_are_cached_and_answer_the_same_for_one_and_two_threads(cohort, tmp_path, engine_cache,
                                                                          quantised, threads):
    overrides = _checkpoints(tmp_path / "weights")
    calibration = _calibration(cohort, tmp_path / "calibration")
    image = sorted((cohort / "imagesTs").glob("*.nii.gz"))[0]
    threads(1)
    first = _int8(overrides, calibration)
    assert len(quantised) == 2 and len(_int8_models(engine_cache)) == 2
    assert first.calibration["cases"] == 2 and first.labels_options()["calibration"] == first.calibration
    one = first.segment(image).labels
    threads(2)
    again = _int8(overrides, calibration)  # from the cache, compiled for two threads
    assert len(quantised) == 2 and again.calibration == first.calibration
    assert again.coarse.engine.compiled.get_property("INFERENCE_NUM_THREADS") == 2
    two = again.segment(image).labels
    assert len(np.unique(one)) > 1 and np.mean(one == two) == 1.0, f"{np.mean(one == two):.6f} of voxels agree"
    renamed = tmp_path / "elsewhere"  # the same CTs under other names: the same calibration set
    renamed.mkdir()
    for number, path in enumerate(sorted(calibration.iterdir())):
        shutil.copy(path, renamed / f"ct_{9 - number}_0000.nii.gz")
    assert len(list(renamed.iterdir())) == 2
    _int8(overrides, renamed)
    assert len(quantised) == 2 and len(_int8_models(engine_cache)) == 2


def test_int8_models_are_quantised_again_when_the_calibration_set_or_settings_change(
    cohort, tmp_path, engine_cache, quantised, monkeypatch
):
    overrides = _checkpoints(tmp_path / "weights")
    calibration = _calibration(cohort, tmp_path / "calibration")
    _int8(overrides, calibration)
    assert len(quantised) == 2
    shutil.copy(sorted((cohort / "imagesTr").glob("*.nii.gz"))[2], sorted(calibration.iterdir())[1])  # other content
    _int8(overrides, calibration)
    assert len(quantised) == 4 and len(_int8_models(engine_cache)) == 4
    monkeypatch.setitem(int8.QUANTISATION, "preset", "mixed")  # other quantisation settings
    _int8(overrides, calibration)
    assert len(quantised) == 6 and len(_int8_models(engine_cache)) == 6


def test_int8_models_are_quantised_again_when_a_stage_that_places_their_box_is_retrained(
    cohort, tmp_path, engine_cache, quantised
):
    overrides = _checkpoints(tmp_path / "weights")
    calibration = _calibration(cohort, tmp_path / "calibration")
    _int8(overrides, calibration)
    assert len(quantised) == 2
    coarse = _checkpoints(tmp_path / "retrained", seed=1)["coarse"]  # the coarse stage places the solid one's box:
    _int8({**overrides, "coarse": coarse}, calibration)  # both are quantised again
    assert len(quantised) == 4 and len(_int8_models(engine_cache)) == 4
