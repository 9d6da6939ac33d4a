"""One stage of the cascade: its bundle's network, weights and inference engine, loaded from its config."""

from __future__ import annotations

import dataclasses
import itertools
import logging
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from flare_c2f_extensions.cascade.configs import read_stage_config
from flare_c2f_extensions.cascade.engines import (
    TorchEngine,
    cached_openvino_ir,
    openvino_cache_key,
    openvino_engine,
    resolve_engine,
)
from flare_c2f_extensions.cascade.weights import load_weights
from flare_c2f_extensions.errors import InputError
from flare_c2f_extensions.labels import GROUPS, ORGANS, organ_id
from flare_c2f_extensions.transforms.crop import CropFromMask

__all__ = [
    "Stage", "build_with_weights", "cascade_parts", "coarse_amp", "default_amp", "load_stage", "needed_stages",
    "stage_geometry",
]

logger = logging.getLogger(__name__)


@dataclass
class Stage:
    """One network of the cascade and the geometry of its input.

    ``labels``: FLARE ids of output channels 1..k (channel 0 is background). ``cropper``: computes the box in
    the full-resolution grid from a guiding mask (``None`` for the whole-volume coarse stage).
    """

    name: str
    network: torch.nn.Module | None
    spatial_size: tuple[int, int, int]
    labels: tuple[int, ...]
    cropper: CropFromMask | None = None
    engine: Callable[[torch.Tensor], torch.Tensor] | None = None  # logits of a batch; None: ``network`` in torch
    checkpoint: Path | None = None  # the weights' file (None: random weights, or networks bound later)

    @property
    def network_name(self) -> str:
        """This stage's submodule in :class:`~flare_c2f_extensions.cascade.networks.CascadeNetwork`."""
        return f"refiner_{ORGANS[self.labels[0]]}" if self.name == "refiner" else self.name

    def predict(self, x: torch.Tensor, amp: bool) -> torch.Tensor:
        """Softmax probabilities (1, k+1, *spatial_size) for one channel-first input already on the grid."""
        logits = (self.engine or TorchEngine(self.network, amp))(x[None])
        return torch.softmax(logits.float(), dim=1)


def needed_stages(organs=None, small_organs=None) -> list[tuple[str, dict]]:
    """The stages ``organs`` (default all) need, as (stage name, extra overrides), in the order they are loaded: the
    coarse stage, the locator when a small organ among ``small_organs`` (default the four) is wanted, the groups that
    hold a wanted organ, and a refiner for each such small organ."""
    wanted = set(ORGANS) if organs is None else {organ_id(o) for o in organs}
    small = GROUPS["small"] if small_organs is None else tuple(organ_id(o) for o in small_organs)
    small = [o for o in small if o in wanted]
    stages = [("coarse", {})] + [("locator", {})] * bool(small)
    stages += [(group, {}) for group in ("solid", "digestive", "vessels") if wanted & set(GROUPS[group])]
    return stages + [("refiner", {"organ": ORGANS[o]}) for o in small]


def cascade_parts(plan: list[tuple[str, dict]], make: Callable[[str, dict], Stage]):
    """``(coarse, groups, locator, refiners)`` of a :func:`needed_stages` plan, each stage made by ``make``."""
    made = [(name, make(name, extra)) for name, extra in plan]
    stage = dict(made)
    groups = [s for name, s in made if name in ("solid", "digestive", "vessels")]
    return stage["coarse"], groups, stage.get("locator"), [s for name, s in made if name == "refiner"]


def default_amp(device: torch.device) -> bool:
    """Mixed precision by default on CUDA (fp16) and on CPUs with native bf16 matrix instructions (AVX512-BF16 or
    AMX), where oneDNN runs the convolutions about twice as fast as fp32 (measured: 1.08 s instead of 2.12 s for a
    paper-size pass at 128^3 on 2 cores); elsewhere bf16 would only be emulated, so fp32."""
    if device.type == "cuda":
        return True
    if device.type != "cpu":
        return False
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def coarse_amp(amp: bool, device: torch.device) -> bool:
    """The coarse stage's precision under the cascade's ``amp``: f32 on a CPU, where mixed precision means bf16.

    The coarse argmax places every other stage's box, so a voxel that bf16 rounding flips there can move a whole
    box, and with it every label inside. bf16 keeps 8 significant bits (fp16, on CUDA, 11). On the real sample
    CT with quickstart weights, a bf16 coarse stage left torch and OpenVINO agreeing on 99.79% of voxels, an f32 one
    on 99.99%; it costs about 4% of a case with OpenVINO and 10% with torch (README, "Measured").
    """
    return bool(amp) and torch.device(device).type != "cpu"


def load_stage(
    name: str,
    bundle_dir: str | os.PathLike,
    device: torch.device | str,
    overrides: Mapping | None = None,
    weights: str | os.PathLike | None = None,
    require_weights: bool = True,
    engine: str = "torch",
    amp: bool | None = None,
    parser=None,
) -> Stage:
    """Build a stage from its bundle: ``network_def`` with the checkpoint at ``ckpt_path`` (or ``weights``).

    ``engine``: ``torch``, ``openvino`` or ``auto`` (:mod:`.engines`; ``auto`` keeps torch for a
    stage without a checkpoint, whose conversion could not be cached); an OpenVINO stage whose
    checkpoint was converted before is read from the cache (keyed by the checkpoint's sha256) without building the
    PyTorch network. ``amp`` (OpenVINO only; ``None``: :func:`default_amp`): bf16 where the CPU has it, else f32.

    A checkpoint whose name ends in ``.ts`` is a TorchScript module (``python -m monai.bundle ckpt_export``, or
    ``python -m flare_c2f_extensions export``): it is loaded with ``torch.jit.load`` and ``network_def`` is not
    built. Point a stage at one with ``weights`` or the override ``{"ckpt_path": ".../model.ts"}`` (the refiner:
    ``{"model_file": "$'model_' + @organ_name + '.ts'"}``).
    ``require_weights=False`` keeps the random (He-normal) initialisation when no checkpoint exists, for
    timing benchmarks; real use always loads weights.
    """
    parser = read_stage_config(bundle_dir, overrides, name) if parser is None else parser  # parsed once by a caller
    checkpoint = Path(weights) if weights is not None else Path(parser.get_parsed_content("ckpt_path"))
    spatial_size = tuple(int(s) for s in parser.get_parsed_content("spatial_size"))
    automatic, engine = engine in (None, "auto"), resolve_engine(engine, device)
    if automatic and not checkpoint.is_file():  # random weights: converting each time costs more than it saves
        engine = "torch"
    if automatic and checkpoint.suffix == ".ts":  # an exported TorchScript module runs as it is
        engine = "torch"
    key = _openvino_key(engine, checkpoint, parser, spatial_size)
    if cached_openvino_ir(key) is not None:
        network = None  # converted before: neither the PyTorch network nor its weights are needed
    elif checkpoint.suffix == ".ts" and checkpoint.is_file():
        try:
            network = torch.jit.load(str(checkpoint), map_location=torch.device(device))
        except RuntimeError as error:
            message = f"{checkpoint}: not a loadable TorchScript module for the {name} stage ({error})"
            raise InputError(message) from error
    elif checkpoint.is_file():
        network = build_with_weights(parser, checkpoint, name)
    else:
        network = parser.get_parsed_content("network_def")
        if require_weights:
            what = "TorchScript module" if checkpoint.suffix == ".ts" else "weights"
            raise InputError(f"{checkpoint}: no {what} for the {name} stage (train it with its configs/train.json)")
        else:
            logger.warning("%s: no weights at %s, using random initialisation", name, checkpoint)
    stage_engine = None  # torch: the network itself, autocast as the cascade says
    if engine == "openvino":
        amp = default_amp(torch.device(device)) if amp is None else bool(amp)
        stage_engine = openvino_engine(name, amp, key, lambda: network, spatial_size)
        network = None
    else:
        network = network.to(device).eval()
    weights_file = checkpoint if checkpoint.is_file() else None
    return dataclasses.replace(_geometry(name, parser), network=network, engine=stage_engine, checkpoint=weights_file)


def stage_geometry(name: str, bundle_dir: str | os.PathLike, overrides: Mapping | None = None) -> Stage:
    """A stage as its bundle's ``configs/inference.json`` describes it (grid, organs, crop), without a network: the
    network comes later, e.g. from the cascade's one module (:class:`~.pipeline.CascadeInferer`)."""
    return _geometry(name, read_stage_config(bundle_dir, overrides, name))


def _geometry(name: str, parser) -> Stage:
    spatial_size = tuple(int(s) for s in parser.get_parsed_content("spatial_size"))
    if name == "coarse":
        labels = tuple(range(1, int(parser.get_parsed_content("num_classes"))))
        return Stage(name, None, spatial_size, labels)
    labels = tuple(int(v) for v in parser.get_parsed_content("labels"))
    # the organs whose box the stage crops: its own, unless the bundle says otherwise (the locator: all foreground)
    box_labels = parser.get_parsed_content("roi_labels") if "roi_labels" in parser else labels
    min_size = parser.get_parsed_content("min_size_mm") if "min_size_mm" in parser else None
    margin = parser.get_parsed_content("margin_mm")
    cropper = CropFromMask(box_labels, spatial_size, margin, min_size, mask_grid="affine")
    return Stage(name, None, spatial_size, labels, cropper)


def build_with_weights(parser, checkpoint: Path, name: str) -> torch.nn.Module:
    """``network_def`` holding the weights of ``checkpoint``, built without paying for a random initialisation.

    The network is made on the meta device (shapes only: no memory, no He-normal draws) and then takes the
    checkpoint's tensors (``load_state_dict(assign=True)``, each in the network's own dtype), so it equals a
    network built normally and loaded. A network with a tensor the checkpoint does not hold (a non-persistent
    buffer), or whose constructor cannot run on the meta device, is built the usual way.
    """
    try:
        with torch.device("meta"):
            network = parser.get_parsed_content("network_def", lazy=False)
    except (RuntimeError, NotImplementedError):  # a constructor that computes with its tensors: built the usual way
        network = None
    if network is not None:
        load_weights(network, checkpoint, name, assign=True)
    if network is None or any(t.is_meta for t in itertools.chain(network.parameters(), network.buffers())):
        network = parser.get_parsed_content("network_def", lazy=False)
        load_weights(network, checkpoint, name)
    return network


def _openvino_key(engine: str, checkpoint: Path, parser, spatial_size) -> str | None:
    """The OpenVINO cache key of a stage (``None``: torch engine, or no checkpoint to key it by)."""
    if engine != "openvino" or not checkpoint.is_file():
        return None
    return openvino_cache_key(checkpoint, parser.get("network_def"), spatial_size)
