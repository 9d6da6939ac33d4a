"""INT8 on CPUs: the ``openvino-int8`` engine, OpenVINO with NNCF post-training quantisation, calibrated on CTs the
user names (``flare-c2f segment --engine openvino-int8 --calibration FOLDER``).

Each stage's OpenVINO model (the ``openvino`` engine's IR, norms rewritten as in :mod:`.engines`) is quantised by
NNCF: 8-bit weights and activations, a FakeQuantize before every convolution, with statistics of what that stage
sees when the cascade segments the calibration CTs in OpenVINO at the cascade's precision (the coarse stage the
whole CT on its grid, every other stage its boxes). Layers NNCF leaves unquantised run in that precision too.

A quantised model is cached like the IR, in ``<cache>/openvino/int8-<key>/``. ``key`` covers the stage's own IR key
(its checkpoint's bytes, network and grid), the IR keys of the stages that place its box (the coarse stage; for a
refiner also the locator), its crop settings and the cascade's precision, the calibration set's content (the
sha256 of every CT, whatever their names or folder), the quantisation settings (:data:`QUANTISATION`) and the NNCF
and OpenVINO versions: when any of them changes the stage is quantised again, and a cascade whose models are all
cached does not read the calibration CTs (it only hashes them, remembered by each file's identity). Stages without
a checkpoint (random weights) are quantised in every process and never cached.

A stage that never ran on the calibration CTs (a refiner whose organ none of them shows) keeps its unquantised
model, with a warning; ``Cascade.calibration`` lists such stages.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from flare_c2f_extensions.cascade.engines import (
    INT8,
    EngineError,
    OpenVINOEngine,
    _compile,
    _compile_in_background,
    _save_ir,
    cached_openvino_ir,
    checkpoint_sha256,
)
from flare_c2f_extensions.errors import InputError

__all__ = [
    "QUANTISATION", "calibration_images", "calibration_sha256", "check_calibration", "int8_cache_key",
    "quantise_cascade",
]

logger = logging.getLogger(__name__)

# NNCF's settings, all in the cache key. "performance": symmetric 8-bit weights and activations (what CPUs with
# VNNI run fastest); fast bias correction fixes the shift quantisation leaves in each layer's mean output.
QUANTISATION = {"preset": "performance", "fast_bias_correction": True, "max_samples": 300}


def calibration_images(source: str | os.PathLike) -> list[Path]:
    """The CTs of a calibration set: a folder of CTs (NIfTI files or DICOM series folders; a FLARE-layout dataset's
    ``imagesTr``), or a datalist JSON (MONAI's ``{"training": [{"image": ...}, ...]}``, or a list of such entries or
    of paths; relative paths from the JSON's folder)."""
    from flare_c2f_extensions.io.discovery import find_images

    path = Path(source).expanduser()
    if path.is_dir():
        return [Path(item["image"]) for item in find_images(path, subdir="imagesTr", strict=True)]
    if not path.is_file():
        raise InputError(f"--calibration {source}: no such folder or datalist")
    try:
        listed = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise InputError(f"--calibration {source}: not a folder of CTs or a datalist JSON ({error})") from None
    entries = listed.get("training", []) if isinstance(listed, dict) else listed
    images = [Path(entry["image"] if isinstance(entry, dict) else entry) for entry in entries]
    images = [image if image.is_absolute() else path.parent / image for image in images]
    missing = [str(image) for image in images if not image.exists()]
    if not images or missing:
        raise InputError(f"--calibration {source}: " + (f"missing {', '.join(missing[:3])}" if missing else "no CTs"))
    return images


def check_calibration(calibration) -> list[Path]:
    """The calibration CTs, or an error that says what the engine needs."""
    if calibration is None:
        raise EngineError(f"engine {INT8} needs calibration CTs: --calibration FOLDER_OR_DATALIST")
    return calibration_images(calibration)


def calibration_sha256(images: Sequence[Path]) -> list[tuple[str, Path]]:
    """``(sha256, path)`` of each calibration CT, in content order (the set's names and order do not matter); a
    file's hash is remembered by its identity, so an unchanged set is not read again."""
    from flare_c2f_extensions.io.files import content_sha256

    hashed = []
    for image in images:  # a file's hash remembered as a checkpoint's is (a DICOM series' folder: read each time)
        hashed.append((checkpoint_sha256(image) if image.is_file() else content_sha256(image), image))
    return sorted(set(hashed), key=lambda pair: pair[0])


def int8_cache_key(stage, upstream: Sequence[str | None], amp: bool, calibration: str, settings: dict) -> str | None:
    """The quantised model's cache key (``None``: not cacheable, a stage or an upstream stage without a checkpoint)."""
    import nncf
    import openvino

    own = getattr(stage.engine, "key", None)
    if own is None or any(key is None for key in upstream):
        return None
    cropper = vars(stage.cropper) if stage.cropper is not None else None
    parts = {"ir": own, "upstream": list(upstream), "labels": list(stage.labels), "crop": cropper, "amp": bool(amp),
             "calibration": calibration, "settings": settings, "nncf": nncf.__version__,
             "openvino": openvino.__version__}
    return "int8-" + hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:32]


class _Recorder:
    """A stage's engine that keeps a copy of every input it is given (the calibration samples)."""

    def __init__(self, engine):
        self.engine, self.inputs = engine, []

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        self.inputs.append(x.detach().to("cpu", torch.float32).numpy().copy())
        return self.engine(x)


def quantise_cascade(cascade, calibration: str | os.PathLike | None, settings: dict | None = None):
    """Give every stage of ``cascade`` (loaded with the ``openvino`` engine) its INT8 model, from the cache or
    quantised now on the inputs it gets from the calibration CTs; returns the cascade, its ``engine`` now
    ``openvino-int8`` and its ``calibration`` what decided the models."""
    settings = {**QUANTISATION, **(settings or {})}
    hashed = calibration_sha256(check_calibration(calibration))
    digest = hashlib.sha256("".join(sha for sha, _ in hashed).encode()).hexdigest()
    stages = cascade.stages
    if any(not isinstance(stage.engine, OpenVINOEngine) for stage in stages):
        raise EngineError(f"engine {INT8} quantises OpenVINO stages; load the cascade with engine openvino")
    coarse_key, locator_key = cascade.coarse.engine.key, cascade.locator.engine.key if cascade.locator else None
    keys = {}
    for stage in stages:
        upstream = [] if stage is cascade.coarse else [coarse_key] + ([locator_key] * (stage in cascade.refiners))
        amp = cascade.coarse_amp if stage is cascade.coarse else cascade.amp
        keys[id(stage)] = (int8_cache_key(stage, upstream, amp, digest, settings), amp)
    todo = [stage for stage in stages if cached_openvino_ir(keys[id(stage)][0]) is None]
    samples = _calibration_inputs(cascade, todo, [path for _, path in hashed]) if todo else {}
    kept = []
    for stage in stages:
        key, amp = keys[id(stage)]
        xml = cached_openvino_ir(key)
        if xml is not None:
            stage.engine.discard()  # its unquantised model is not compiled (its turn on the compile thread) for nothing
            stage.engine = OpenVINOEngine(_compile_in_background(stage.name, xml, amp), xml, key, name=INT8)
            continue
        inputs = samples.get(id(stage), [])
        if not inputs:
            logger.warning("%s: no input from the calibration CTs; it runs unquantised", _name(stage))
            kept.append(_name(stage))
            continue
        stage.engine = _quantised_engine(stage, inputs, key, amp, settings)
    cascade.engine = INT8
    cascade.calibration = {"sha256": digest, "cases": len(hashed), "settings": settings, "unquantised": kept}
    return cascade


def _name(stage) -> str:
    return stage.network_name


def _calibration_inputs(cascade, stages, images: Sequence[Path]) -> dict[int, list]:
    """Each of ``stages``' inputs while the cascade segments ``images`` (its own engines, unquantised)."""
    recorders = {}
    for stage in stages:
        recorders[id(stage)] = stage.engine = _Recorder(stage.engine)
    started = time.perf_counter()
    try:
        for image in images:
            cascade.segment(image)
    finally:
        for stage in stages:
            stage.engine = recorders[id(stage)].engine
    logger.info("INT8 calibration: %d CTs through the cascade in %.1f s", len(images), time.perf_counter() - started)
    return {key: recorder.inputs for key, recorder in recorders.items()}


def _quantised_engine(stage, inputs: list, key: str | None, amp: bool, settings: dict) -> OpenVINOEngine:
    import nncf
    import openvino

    started = time.perf_counter()
    source = stage.engine.source
    model = openvino.Core().read_model(str(source)) if isinstance(source, (str, Path)) else source.clone()
    quantised = nncf.quantize(
        model, nncf.Dataset(inputs), preset=nncf.QuantizationPreset(settings["preset"]),
        subset_size=min(len(inputs), int(settings["max_samples"])),
        fast_bias_correction=bool(settings["fast_bias_correction"]),
    )
    if key is not None:
        _save_ir(quantised, key)
    logger.info("%s: quantised to INT8 on %d inputs in %.1f s", _name(stage), len(inputs),
                time.perf_counter() - started)
    return OpenVINOEngine(_compile(quantised, amp, blob_cache=key is not None), cached_openvino_ir(key) or quantised,
                          key, name=INT8)
