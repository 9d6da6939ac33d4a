"""The whole coarse-to-fine cascade in one process: load once, every network resident, fuse inside boxes.

Per case:

1. the CT is read once, reoriented to RAS, clipped to [-100, 300] HU and scaled to [0, 1] on the device;
2. the coarse network sees the whole volume at 128^3; its argmax stays on that grid;
3. each big-organ group crops the box of its organs in the coarse mask (plus margin) from the full-resolution
   volume, resizes it to 160^3 and predicts its organs;
4. the locator crops the abdomen (all coarse foreground plus margin) at 128^3 and finds the small organs;
   each refiner crops a box around its organ as located (with an organ-specific minimum size) at 64^3;
5. every stage's class probabilities are resized back (linear) to its box in the original grid, one channel and
   one slab at a time, and fused: where an organ is claimed by several stages, the higher probability wins. Only
   the uint8 label map and a float confidence map exist at full resolution;
6. the largest connected component of each organ is kept, the label map is reoriented back to the input's
   array layout and written as ``<case>.nii.gz`` with exactly the input's affine.

Each stage is built from its bundle's ``configs/inference.json`` (network, grid, organs, margins), so the
cascade and the stage bundles cannot drift apart: the same ``CropFromMask`` computes every box.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from monai.data import MetaTensor
from monai.inferers import Inferer

from flare_c2f_extensions.cascade.engines import INT8, EngineError, resolve_engine
from flare_c2f_extensions.cascade.stages import (
    Stage,
    cascade_parts,
    coarse_amp,
    default_amp,
    load_stage,
    needed_stages,
    stage_geometry,
)
from flare_c2f_extensions.errors import InputError
from flare_c2f_extensions.io.images import CT, read_ct
from flare_c2f_extensions.labels import ORGANS
from flare_c2f_extensions.options import as_bool
from flare_c2f_extensions.paths import STAGE_BUNDLES
from flare_c2f_extensions.paths import bundles_dir as default_bundles_dir
from flare_c2f_extensions.transforms.boxes import affine_of as _affine_of
from flare_c2f_extensions.transforms.boxes import box_affine, box_size, box_slices, fov_affine
from flare_c2f_extensions.transforms.postprocessing import dropped_components, keep_largest_component
from flare_c2f_extensions.transforms.resizing import crop_resize, resize_rows, resize_spatial

__all__ = [
    "MAX_CASE_VOXELS", "Cascade", "CascadeInferer", "CaseResult", "check_voxel_count",
]

logger = logging.getLogger(__name__)


# Peak memory grows with the input, about 10 bytes per voxel (the float32 image, the float32 confidence map and the
# uint8 label map at full resolution, plus reading): 1024 x 1024 x 512 voxels stay under 8 GB (README "Measured").
MAX_CASE_VOXELS = 1024 * 1024 * 512


# The fewest voxels along any axis of an image the cascade segments: fewer is a slice, a scout or a thumbnail, not
# an abdominal CT volume (the smallest CT the tests segment has 8 slices; a 3 mm abdomen has over 60).
MIN_AXIS_VOXELS = 8


def check_voxel_count(image: str | os.PathLike | CT, limit: int | None) -> None:
    """Refuse an input with more than ``limit`` voxels, or fewer than :data:`MIN_AXIS_VOXELS` along an axis, from its
    header (NIfTI header or DICOM headers), before any voxel is read or memory allocated."""
    ct = CT.open(image)
    path, shape = ct.path, ct.shape
    if min(shape) < MIN_AXIS_VOXELS:
        raise InputError(
            f"{path}: {shape[0]}x{shape[1]}x{shape[2]} voxels is too small for a CT volume (at least "
            f"{MIN_AXIS_VOXELS} along every axis): a single slice or a 2D image cannot be segmented"
        )
    if limit is None:
        return
    count = int(np.prod(shape, dtype=np.int64))
    if count > limit:
        raise InputError(
            f"{path}: {shape[0]}x{shape[1]}x{shape[2]} = {count} voxels, more than the cascade's limit of {limit} "
            f"(about {limit * 10 / 1e9:.0f} GB of memory); raise it with max_voxels if this machine has the memory"
        )


@dataclass
class CaseResult:
    """What segmenting one case produced: the label map in the input's array layout and per-stage seconds.

    With ``segment(..., keep_confidence=True)`` also ``confidence``: the fused probability of each voxel's winning
    organ (float32, the label map's layout; 0 where no stage claimed an organ, and kept where the largest-component
    step then removed the voxel), and ``dropped``: per FLARE id, the components and voxels that step removed.
    """

    labels: np.ndarray
    seconds: dict[str, float] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)
    confidence: np.ndarray | None = None
    dropped: dict[int, dict[str, int]] = field(default_factory=dict)


class Cascade:
    """The cascade's networks, resident on one device; :meth:`segment` runs one case.

    Build it from the stage bundles with :meth:`from_bundles`. ``amp``: autocast (fp16 on CUDA, bf16 on CPU);
    ``None`` chooses by device (:func:`default_amp`). The coarse stage runs in f32 on a CPU either way
    (:func:`coarse_amp`).
    """

    def __init__(
        self,
        coarse: Stage,
        groups: Sequence[Stage],
        locator: Stage | None,
        refiners: Sequence[Stage],
        device: torch.device | str = "cpu",
        amp: bool | None = None,
        largest_component: bool = True,
        engine: str = "torch",
        max_voxels: int | None = MAX_CASE_VOXELS,
    ):
        self.coarse, self.groups, self.locator, self.refiners = coarse, list(groups), locator, list(refiners)
        self.device = torch.device(device)
        self.amp = default_amp(self.device) if amp is None else bool(amp)
        self.coarse_amp = coarse_amp(self.amp, self.device)
        self.largest_component = largest_component
        self.engine = engine  # what the stages were loaded with (for reports); each Stage holds its own engine
        self.max_voxels = max_voxels
        self.calibration = None  # the INT8 engine's calibration set and settings (int8.quantise_cascade)

    @classmethod
    def from_bundles(
        cls,
        bundles_dir: str | os.PathLike | None = None,
        device: torch.device | str | None = None,
        amp: bool | None = None,
        stage_overrides: Mapping[str, Mapping] | None = None,
        stage_dirs: Mapping[str, str | os.PathLike] | None = None,
        small_organs: Sequence[str | int] | None = None,
        require_weights: bool = True,
        largest_component: bool = True,
        organs: Sequence[str | int] | None = None,
        engine: str | None = "auto",
        max_voxels: int | None = MAX_CASE_VOXELS,
        parsers: Mapping | None = None,
        calibration: str | os.PathLike | None = None,
    ) -> Cascade:
        """Load every stage from its bundle folder (siblings in ``bundles_dir`` unless ``stage_dirs`` says otherwise).

        ``stage_overrides``: config overrides per stage name (``coarse``, ``solid``, ``digestive``, ``vessels``,
        ``locator``, ``refiner``), e.g. a small network; ``small_organs``: the organs that get a refiner
        (default the four small organs); ``organs``: only the stages these organs need are loaded (the coarse
        stage, the groups that hold them, the locator and refiners of the small ones among them). ``engine``:
        ``torch``, ``openvino`` (CPU) or ``auto`` (OpenVINO on a CPU when it is installed for every stage with a
        checkpoint, torch for random weights; see :mod:`~flare_c2f_extensions.cascade.engines`). ``max_voxels``: larger
        inputs are refused from their header, before any voxel is read (``None``: no limit; see
        :data:`MAX_CASE_VOXELS`). ``parsers``: stage configs already parsed with these overrides, by (stage, refiner
        organ or ``None``), so they are not read again (``segmenter.stage_parsers``). ``calibration``: the CTs that
        calibrate ``engine="openvino-int8"`` (a folder or datalist; :mod:`.int8`).
        """
        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        require_weights = as_bool(require_weights, "require_weights")  # "false" from a command line is truthy
        int8 = resolve_engine(engine, device) == INT8  # fails early and clearly when the engine cannot run here
        if int8 and calibration is None:
            raise EngineError(f"engine {INT8} needs calibration CTs: --calibration FOLDER_OR_DATALIST")
        amp = default_amp(device) if amp is None else as_bool(amp, "amp")
        bundles_dir = Path(bundles_dir) if bundles_dir is not None else default_bundles_dir()
        dirs = {name: Path(bundles_dir) / bundle for name, bundle in STAGE_BUNDLES.items()}
        dirs.update({name: Path(path) for name, path in (stage_dirs or {}).items()})
        overrides = dict(stage_overrides or {})

        def stage(name, extra=None, precision=amp):
            merged = {**overrides.get(name, {}), **(extra or {})}
            parser = (parsers or {}).get((name, (extra or {}).get("organ")))
            return load_stage(
                name, dirs[name], device, merged, require_weights=require_weights,
                engine="openvino" if int8 else engine, amp=precision,
                parser=parser,
            )

        def make(name, extra):
            return stage(name, extra, precision=coarse_amp(amp, device) if name == "coarse" else amp)

        coarse, groups, locator, refiners = cascade_parts(needed_stages(organs, small_organs), make)
        used = {"torch" if s.engine is None else s.engine.name for s in [coarse, locator, *groups, *refiners] if s}
        cascade = cls(
            coarse=coarse,
            groups=groups,
            locator=locator,
            refiners=refiners,
            device=device,
            amp=amp,
            largest_component=largest_component,
            engine=used.pop() if len(used) == 1 else "mixed",
            max_voxels=max_voxels,
        )
        if int8:
            from flare_c2f_extensions.cascade.int8 import quantise_cascade

            quantise_cascade(cascade, calibration)
        return cascade

    # -- one case --------------------------------------------------------------------------------------------

    def _sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    @torch.inference_mode()
    def segment(self, image: str | os.PathLike | CT, keep_confidence: bool = False) -> CaseResult:
        """Segment a CT (a path, or a :class:`~flare_c2f_extensions.io.images.CT` already opened); returns the uint8
        label map in the file's own array layout (and with ``keep_confidence`` the confidence map and what the
        largest-component step dropped, see CaseResult)."""
        started, read = time.perf_counter(), {}
        ct = CT.open(image)
        check_voxel_count(ct, self.max_voxels)

        def load() -> MetaTensor:  # passed on unnamed, so that segment_ras holds the only reference and frees it
            image, read["ornt"] = read_ct(ct, self.device)
            self._sync()
            read["seconds"] = time.perf_counter() - started
            return image

        result = self.segment_ras(load(), keep_confidence)
        load, ornt = read["seconds"], read["ornt"]
        started = time.perf_counter()
        result.labels = np.ascontiguousarray(nib.orientations.apply_orientation(result.labels, ornt))
        if result.confidence is not None:
            result.confidence = nib.orientations.apply_orientation(result.confidence, ornt)  # a view: read, not written
        result.seconds = {"load": load, **result.seconds}
        result.seconds["postprocess"] += time.perf_counter() - started
        return result

    @torch.inference_mode()
    def segment_ras(self, image: MetaTensor, keep_confidence: bool = False) -> CaseResult:
        """Segment a CT already read: ``image`` (1, X, Y, Z) in RAS, HU clipped to [-100, 300] and scaled to [0, 1],
        with its affine (what :func:`images.read_ct` and the cascade bundle's ``preprocessing`` give). The label map
        (and confidence map) come back in the same RAS layout. ``image`` is released as soon as the networks ran."""
        seconds: dict[str, float] = {}
        skipped: list[str] = []
        clock = time.perf_counter()

        def lap(name):
            nonlocal clock
            self._sync()
            now = time.perf_counter()
            seconds[name] = seconds.get(name, 0.0) + now - clock
            clock = now

        shape = tuple(image.shape[1:])
        coarse_grid = self.coarse.spatial_size
        coarse_probs = self.coarse.predict(resize_spatial(image, coarse_grid, "trilinear"), self.coarse_amp)
        coarse = _guide(_argmax_channel(coarse_probs[0]), _fov_affine_of(image, coarse_grid))
        del coarse_probs
        lap("coarse")

        labels = torch.zeros(shape, dtype=torch.uint8, device=self.device)
        confidence = torch.zeros(shape, dtype=torch.float32, device=self.device)
        for stage in self.groups:
            if not self._run_stage(stage, image, coarse, labels, confidence):
                skipped.append(stage.name)
            lap(stage.name)

        if self.locator is not None:
            located = self._locate(image, coarse)
            lap("locator")
            for stage in self.refiners:
                if located is None or not self._run_stage(stage, image, located, labels, confidence):
                    skipped.append(f"refiner:{stage.labels[0]}")
                lap(f"refiner_{stage.labels[0]}")
        confidence = confidence.cpu().numpy() if keep_confidence else None  # freed here unless asked for
        del image

        raw = labels.cpu().numpy()
        result = keep_largest_component(raw) if self.largest_component else raw
        dropped = dropped_components(raw, result) if keep_confidence else {}
        lap("postprocess")
        return CaseResult(result, seconds, skipped, confidence, dropped)

    @property
    def stages(self) -> list[Stage]:
        return [self.coarse, *self.groups, *([self.locator] if self.locator else []), *self.refiners]

    def labels_options(self) -> dict:
        """What decides this cascade's label maps: its organs, each stage's weights by content (sha256 of the
        checkpoint; ``random`` for random weights), engine and precision. Recorded in every label map the batch
        runners write and compared on a rerun (:func:`files.finished`)."""
        from flare_c2f_extensions.cascade.engines import checkpoint_sha256

        organs = sorted({organ for stage in self.stages for organ in stage.labels})
        weights = {
            stage.network_name: checkpoint_sha256(stage.checkpoint) if stage.checkpoint else "random"
            for stage in self.stages
        }
        return {"organs": [ORGANS[o] for o in organs], "weights": weights, "engine": self.engine, "amp": self.amp,
                "coarse_amp": self.coarse_amp, **({"calibration": self.calibration} if self.calibration else {})}

    def with_networks(self, network: torch.nn.Module) -> Cascade:
        """This cascade's stages run by the submodules of ``network`` (a
        :class:`~flare_c2f_extensions.cascade.networks.CascadeNetwork` or its TorchScript export), under torch."""
        def bind(stage: Stage | None) -> Stage | None:
            if stage is None:
                return None
            return dataclasses.replace(stage, network=getattr(network, stage.network_name), engine=None)

        return Cascade(
            bind(self.coarse), [bind(s) for s in self.groups], bind(self.locator), [bind(s) for s in self.refiners],
            self.device, self.amp, self.largest_component, "torch", self.max_voxels,
        )

    def _run_stage(self, stage: Stage, image, guide, labels, confidence) -> bool:
        """Crop, predict, resize back and fuse one stage; ``False`` if its organs are not in the guide."""
        box = stage.cropper.compute_box(image, guide)
        if box is None:
            stage.cropper.warn_skipped()
            return False
        probs = stage.predict(crop_resize(image, box, stage.spatial_size, "trilinear"), self.amp)[0]
        _fuse(probs, box, stage.labels, labels, confidence)
        return True

    def _locate(self, image, coarse) -> MetaTensor | None:
        """The locator's small-organ mask (FLARE ids) on its own grid, with the affine that places it."""
        box = self.locator.cropper.compute_box(image, coarse)
        if box is None:
            self.locator.cropper.warn_skipped()
            return None
        probs = self.locator.predict(crop_resize(image, box, self.locator.spatial_size, "trilinear"), self.amp)
        affine = _affine_of(image) @ box_affine(box, self.locator.spatial_size)
        return _guide(_argmax_channel(probs[0], self.locator.labels), affine)


# Voxels of a box resized and fused at a time, per channel (4 MB of float32). A slab's work arrays then stay under
# glibc's largest mmap threshold (32 MB), so each slab reuses the heap's pages instead of mapping fresh ones and
# faulting them in: the liver group's box fused in 0.18 s instead of 0.31 s with 16 MB a channel.
FUSE_SLAB_VOXELS = 2**20


class CascadeInferer(Inferer):
    """The whole coarse-to-fine cascade as a MONAI inferer: ``inferer(inputs, network)``, as MONAI Label, MONAI Deploy
    and a bundle's evaluator call one.

    ``inputs``: one CT, ``(1, 1, X, Y, Z)`` or ``(1, X, Y, Z)``, in RAS with HU clipped to [-100, 300] and scaled to
    [0, 1] (the cascade bundle's ``preprocessing``), a ``MetaTensor`` whose affine places it. ``network``: a
    :class:`~flare_c2f_extensions.cascade.networks.CascadeNetwork` or its TorchScript export (``ckpt_export``), on the
    inputs' device. Returns the uint8 FLARE label map after the largest-component step, shaped and placed like the
    inputs (``Invertd`` then takes it back to the file's layout).

    The stages' geometry (grids, organs, margins) comes from the stage bundles' ``configs/inference.json``: those
    beside the package (:func:`paths.bundles_dir`, so it does not depend on the working folder) with
    ``stage_overrides`` per stage name. ``organs``: only the stages these organs need run. ``amp``: autocast
    (``None``: by device, as :class:`Cascade`).
    """

    def __init__(
        self,
        stage_overrides: Mapping[str, Mapping] | None = None,
        bundles_dir: str | os.PathLike | None = None,
        organs: Sequence[str | int] | None = None,
        amp: bool | None = None,
        largest_component: bool = True,
    ):
        super().__init__()
        root = Path(bundles_dir) if bundles_dir is not None else default_bundles_dir()
        overrides = dict(stage_overrides or {})

        def geometry(name: str, extra: Mapping | None = None) -> Stage:
            return stage_geometry(name, root / STAGE_BUNDLES[name], {**overrides.get(name, {}), **(extra or {})})

        self.coarse, self.groups, self.locator, self.refiners = cascade_parts(needed_stages(organs), geometry)
        self.amp = None if amp is None else as_bool(amp, "amp")
        self.largest_component = as_bool(largest_component, "largest_component")

    def cascade(self, network: torch.nn.Module, device: torch.device | str) -> Cascade:
        """The cascade these stages make with ``network``'s submodules, on ``device``."""
        cascade = Cascade(self.coarse, self.groups, self.locator, self.refiners, device, self.amp,
                          self.largest_component, max_voxels=None)
        return cascade.with_networks(network)

    def __call__(self, inputs: torch.Tensor, network: torch.nn.Module, *args, **kwargs) -> MetaTensor:
        batched = inputs.ndim == 5
        if inputs.ndim not in (4, 5) or (batched and inputs.shape[0] != 1) or inputs.shape[-4] != 1:
            raise ValueError(f"the cascade takes one single-channel 3D image, got shape {tuple(inputs.shape)}")
        image = inputs[0] if batched else inputs
        image = image if isinstance(image, MetaTensor) else MetaTensor(image)
        # MONAI Deploy passes its model wrapper (TorchScriptModel), which holds the module as ``predictor``
        network = network if hasattr(network, "coarse") else getattr(network, "predictor", network)
        result = self.cascade(network, image.device).segment_ras(image.float())
        labels = MetaTensor(torch.as_tensor(result.labels, device=image.device)[None], meta=dict(image.meta))
        labels.applied_operations = list(image.applied_operations)
        return labels[None] if batched else labels


def _fuse(probs: torch.Tensor, box, stage_labels: Sequence[int], labels, confidence) -> None:
    """Resize ``probs`` (k+1 channels on the stage grid) to the box and write the organ claims that beat the
    current confidence, one slab of the box (along its first axis) at a time: the work arrays are bounded by
    :data:`FUSE_SLAB_VOXELS` per channel, not by the box, and the full-resolution maps are written through views.
    A voxel's winner is its first most probable channel (background on ties), as a running strict maximum gives."""
    size = box_size(box)
    region = box_slices(box)
    rows = max(1, FUSE_SLAB_VOXELS // (size[1] * size[2]))
    for start in range(0, size[0], rows):
        stop = min(size[0], start + rows)
        best_p, best_label = _winners(resize_rows(probs, size, start, stop), stage_labels)
        slab = (slice(region[0].start + start, region[0].start + stop),) + region[1:]
        slab_labels, slab_confidence = labels[slab], confidence[slab]
        claim = (best_label > 0).logical_and_(best_p > slab_confidence)
        slab_labels.copy_(torch.where(claim, best_label, slab_labels))  # where + copy: no gathers or scatters
        slab_confidence.copy_(torch.where(claim, best_p, slab_confidence))


def _winners(every_p: torch.Tensor, stage_labels: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per voxel the highest probability of ``every_p`` (k+1 channels, background first) and ``stage_labels`` of the
    first channel that reaches it (0 for background), as ``argmax`` picks it, by a running strict maximum in uint8
    arithmetic: several times faster than ``max(0)``, ``argmax(0)`` or ``masked_fill_`` on a CPU."""
    best_p = every_p[0].clone()
    best_label = torch.zeros(best_p.shape, dtype=torch.uint8, device=every_p.device)
    for channel, organ in enumerate(stage_labels, start=1):
        beats = torch.gt(every_p[channel], best_p).view(torch.uint8)  # 1 where this channel wins so far
        best_label.sub_(best_label * beats).add_(beats * organ)
        torch.maximum(best_p, every_p[channel], out=best_p)
    return best_p, best_label


def _argmax_channel(probs: torch.Tensor, labels: Sequence[int] | None = None) -> torch.Tensor:
    """uint8 ``(1, *spatial)``: ``labels`` of each voxel's first most probable channel of ``probs`` (k+1 channels,
    background 0 first; default the channel index), equal to ``argmax(0)`` where no probability is NaN."""
    labels = range(1, probs.shape[0]) if labels is None else labels
    return _winners(probs, labels)[1][None]


def _fov_affine_of(image: MetaTensor, grid: Sequence[int]) -> np.ndarray:
    """World affine of a grid of size ``grid`` spanning the image's field of view (what ``Resized`` records)."""
    return _affine_of(image) @ fov_affine(grid, image.shape[1:])


def _guide(mask: torch.Tensor, affine: np.ndarray) -> MetaTensor:
    return MetaTensor(mask, affine=torch.as_tensor(affine, dtype=torch.float64))
