"""Bundle configs as the package reads them: override flattening, a stage bundle's ``inference.json`` with its
overrides, and the contract between the cascade and its stage bundles (the keys it reads from each)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from flare_c2f_extensions.errors import InputError

__all__ = ["OPTIONAL_STAGE_KEYS", "STAGE_CONTRACT", "flatten_overrides", "read_stage_config", "stage_keys"]

# What the cascade (and `flare-c2f segment`, `export`) reads from a stage bundle's configs/inference.json.
STAGE_CONTRACT: dict[str, tuple[str, ...]] = {
    # every stage: the network, its checkpoint (a .ts file replaces network_def), the grid it sees
    "every": ("network_def", "ckpt_path", "spatial_size"),
    # the whole-volume coarse stage: output channels (background + organs), no box
    "whole_volume": ("num_classes",),
    # a stage that crops a box from a guiding mask: its output organs (FLARE ids of channels 1..k) and the margin
    "crop": ("labels", "margin_mm"),
}
# read where present: the organs whose box is cropped (default: `labels`; the locator: all foreground) and a box's
# minimum size in mm (the refiners)
OPTIONAL_STAGE_KEYS = ("roi_labels", "min_size_mm")
WHOLE_VOLUME_STAGES = ("coarse",)


def stage_keys(stage: str) -> tuple[str, ...]:
    """The keys a stage's ``inference.json`` must provide (:data:`STAGE_CONTRACT`)."""
    role = "whole_volume" if stage in WHOLE_VOLUME_STAGES else "crop"
    return STAGE_CONTRACT["every"] + STAGE_CONTRACT[role]


def flatten_overrides(overrides: Mapping | None, prefix: str = "") -> dict:
    """``{"network_def": {"channels": [4, 8]}}`` -> ``{"network_def#channels": [4, 8]}`` (config ids)."""
    flat = {}
    for key, value in (overrides or {}).items():
        if isinstance(value, Mapping):
            flat.update(flatten_overrides(value, f"{prefix}{key}#"))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def read_stage_config(bundle_dir: str | os.PathLike, overrides: Mapping | None = None, stage: str | None = None):
    """A ``ConfigParser`` of the bundle's ``configs/inference.json`` with ``bundle_root`` set and ``overrides``
    (nested or ``#``-joined) applied; with ``stage``, :class:`InputError` unless it holds :func:`stage_keys`."""
    from monai.bundle import ConfigParser

    bundle_dir = Path(bundle_dir)
    config = bundle_dir / "configs" / "inference.json"
    if not config.is_file():
        raise InputError(f"{config}: stage bundle config does not exist")
    parser = ConfigParser()
    parser.read_config(str(config))
    parser["bundle_root"] = str(bundle_dir)
    for key, value in flatten_overrides(overrides).items():
        parser[key] = value
    missing = [key for key in stage_keys(stage) if key not in parser] if stage else []
    if missing:
        raise InputError(f"{config}: the {stage} stage's config lacks {', '.join(missing)} (configs.STAGE_CONTRACT)")
    return parser
