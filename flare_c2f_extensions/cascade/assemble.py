"""The cascade bundle's one network and one checkpoint, assembled from trained stage bundles.

MONAI's consumers of bundles (MONAI Label, MONAI Deploy, ``ckpt_export``) know one ``network_def`` and one
``models/model.pt``. The cascade's is a :class:`~.networks.CascadeNetwork` holding every stage's
network as a submodule; :func:`assemble_cascade` fills it from the stage bundles' checkpoints and writes, into the
cascade bundle, ``models/model.pt`` (its state dict) and the settings its ``inference.json`` needs to rebuild the same
network and cascade (each stage's network arguments and grid), so the cascade bundle runs with nothing beside it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path

import torch

from flare_c2f_extensions.cascade.configs import read_stage_config
from flare_c2f_extensions.cascade.networks import CASCADE_STAGES, CascadeNetwork
from flare_c2f_extensions.cascade.weights import load_weights
from flare_c2f_extensions.errors import InputError
from flare_c2f_extensions.io.files import atomic_path, write_text_atomic
from flare_c2f_extensions.paths import CASCADE_BUNDLE, STAGE_BUNDLES

__all__ = ["assemble_cascade", "stage_settings"]

# what the cascade needs from a stage's inference.json beyond its network: the grid, the crop's margins and sizes
GEOMETRY_KEYS = ("spatial_size", "margin_mm", "min_size_mm")


def _stage_parser(bundles_dir: Path, submodule: str, overrides: Mapping):
    name = "refiner" if submodule.startswith("refiner_") else submodule
    extra = {"organ": submodule[len("refiner_"):]} if name == "refiner" else {}
    return read_stage_config(bundles_dir / STAGE_BUNDLES[name], {**overrides.get(name, {}), **extra}, name)


def stage_settings(bundles_dir: str | os.PathLike, stage_overrides: Mapping | None = None) -> dict:
    """Per submodule of :class:`CascadeNetwork`: its checkpoint path, network arguments (``network_def`` without
    ``_target_`` and ``out_channels``) and geometry (:data:`GEOMETRY_KEYS` present in the stage's config)."""
    bundles_dir = Path(bundles_dir)
    settings = {}
    for submodule in CASCADE_STAGES:
        parser = _stage_parser(bundles_dir, submodule, dict(stage_overrides or {}))
        network = dict(parser.get_parsed_content("network_def", instantiate=False).get_config())
        for key in ("_target_", "out_channels"):
            network.pop(key, None)
        geometry = {key: parser.get_parsed_content(key) for key in GEOMETRY_KEYS if key in parser}
        settings[submodule] = {
            "checkpoint": Path(parser.get_parsed_content("ckpt_path")), "network": network, "geometry": geometry,
        }
    return settings


def assemble_cascade(
    bundles_dir: str | os.PathLike, out: str | os.PathLike | None = None, stage_overrides: Mapping | None = None
) -> Path:
    """Write ``models/model.pt`` of the cascade bundle ``out`` (default ``bundles_dir/flare22_cascade``) from the
    trained stage bundles in ``bundles_dir``, and record in its ``configs/inference.json`` the stages' network
    arguments (``stage_networks``) and geometry (``stage_overrides``). Every stage needs its checkpoint; a missing
    or unfitting one is an :class:`InputError` naming it. Returns the checkpoint's path."""
    bundles_dir = Path(bundles_dir)
    out = Path(out) if out is not None else bundles_dir / CASCADE_BUNDLE
    config_path = out / "configs" / "inference.json"
    if not config_path.is_file():
        raise InputError(f"{config_path}: the cascade bundle's config does not exist (copy bundles/{CASCADE_BUNDLE})")
    settings = stage_settings(bundles_dir, stage_overrides)
    missing = [f"{name}: {item['checkpoint']}" for name, item in settings.items() if not item["checkpoint"].is_file()]
    if missing:
        raise InputError(f"no trained weights for stage {missing[0]}" + (
            f" (and {len(missing) - 1} more)" if len(missing) > 1 else "") + ": train every stage first")
    networks = {name: item["network"] for name, item in settings.items()}
    network = CascadeNetwork(networks)
    for name, item in settings.items():
        load_weights(getattr(network, name), item["checkpoint"], name)
    checkpoint = out / "models" / "model.pt"
    with atomic_path(checkpoint) as tmp:
        torch.save(network.state_dict(), tmp)
    config = json.loads(config_path.read_text())
    config["stage_networks"] = networks
    config["stage_overrides"] = _geometry_overrides(settings)
    write_text_atomic(json.dumps(config, indent=4) + "\n", config_path)
    return checkpoint


def _geometry_overrides(settings: Mapping) -> dict:
    """Per stage bundle name (the refiners share one entry: their geometry differs only by organ, in the config)."""
    overrides = {}
    for submodule, item in settings.items():
        name = "refiner" if submodule.startswith("refiner_") else submodule
        geometry = {k: v for k, v in item["geometry"].items() if not (name == "refiner" and k == "min_size_mm")}
        overrides.setdefault(name, geometry)
    return overrides
