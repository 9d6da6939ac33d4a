"""The options of a segmentation run, one set for the command line, the Python API and the bundles.

:class:`SegmentOptions` holds them, checked once (:meth:`SegmentOptions.parse`), from what a command line, a Python
caller or a config gives: organs by name or id, booleans as ``true``/``False``/``"no"``, mappings as dicts, JSON or
files, and the cascade's config overrides in the one override syntax of every command (:func:`parse_overrides`).
"""

from __future__ import annotations

import ast
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from flare_c2f_extensions.errors import InputError
from flare_c2f_extensions.labels import GROUPS, ORGAN_IDS, ORGANS
from flare_c2f_extensions.paths import STAGE_BUNDLES

__all__ = [
    "OVERRIDE_SCOPES", "SegmentOptions", "as_bool", "as_mapping", "cascade_overrides", "parse_device",
    "parse_max_voxels", "parse_organs", "parse_overrides", "parse_seed", "parse_threads",
]

# the one override syntax of every command (train, segment, pseudo_label, self_train): scopes are "all" (every
# stage), a stage of the cascade, "refiner" (the four refiners) or one refiner "refiner_<organ>"
OVERRIDE_SCOPES = ("all", *STAGE_BUNDLES) + tuple(f"refiner_{ORGANS[o]}" for o in GROUPS["small"])


def parse_organs(organs) -> tuple[int, ...]:
    """FLARE ids of ``organs``: ``None`` (all), ``"liver,spleen"``, ``["liver", 3]``; unknown names are an
    :class:`InputError` listing the valid ones."""
    if organs is None or organs == "" or organs == "all":
        return tuple(ORGANS)
    if isinstance(organs, bool):  # a bare --organs: fire gives True
        raise InputError("--organs needs organ names: --organs liver,spleen (or all)")
    items = organs.split(",") if isinstance(organs, str) else list(organs) if isinstance(organs, Sequence) else [organs]
    ids = []
    for item in items:
        name = str(item).strip()
        if name.isdigit() and int(name) in ORGANS:
            ids.append(int(name))
        elif name in ORGAN_IDS:
            ids.append(ORGAN_IDS[name])
        else:
            raise InputError(f"--organs: unknown organ {name!r}; valid names: {', '.join(ORGAN_IDS)}")
    return tuple(sorted(set(ids)))


def as_bool(value, name: str) -> bool:
    """``True``/``False`` from a bool or the strings a command line gives (``true``, ``no``, ``1``, ...)."""
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise InputError(f"--{name}: expected true or false, got {value!r}")


def as_mapping(value, name: str) -> dict:
    """A dict from a dict, a JSON or Python-literal string, or a path to a JSON file (``None``: empty)."""
    if value is None or value == "":
        return {}
    if isinstance(value, Mapping):
        return dict(value)
    text = str(value)
    if Path(text).is_file():
        text = Path(text).read_text()
    for parse in (json.loads, ast.literal_eval):
        try:
            parsed = parse(text)
        except (ValueError, SyntaxError):
            continue
        if isinstance(parsed, Mapping):
            return dict(parsed)
    raise InputError(f"--{name}: not a mapping (JSON object, Python dict or JSON file): {value!r}")


def parse_device(device):
    """``torch.device`` of ``--device`` (``None``: CUDA if available, else CPU); :class:`InputError` for a device
    that does not exist here."""
    import torch

    if device is None or device == "auto":
        return None
    try:
        parsed = torch.device(str(device))
    except RuntimeError as error:
        raise InputError(f"--device {device}: {error}") from None
    if parsed.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"--device {device}: no CUDA device is available here (use --device cpu)")
    return parsed


def parse_threads(threads) -> int | None:
    if threads is None:
        return None
    if not str(threads).isdigit() or int(threads) < 1:
        raise InputError(f"--threads: expected a positive whole number, got {threads!r}")
    return int(threads)


def parse_seed(seed) -> int:
    if isinstance(seed, bool) or not str(seed).strip().lstrip("-").isdigit():
        raise InputError(f"--seed: expected a whole number, got {seed!r}")
    return int(seed)


def parse_max_voxels(max_voxels) -> int | str | None:
    """``"default"`` (the cascade's limit), ``None`` (no limit: ``none``) or a positive whole number."""
    if max_voxels is None or str(max_voxels).strip().lower() == "none":
        return None
    if max_voxels == "default":
        return "default"
    if isinstance(max_voxels, bool) or not str(max_voxels).strip().isdigit() or int(max_voxels) < 1:
        raise InputError(f"--max_voxels: expected a positive whole number, none or default, got {max_voxels!r}")
    return int(max_voxels)


def _parse_value(text: str):
    import yaml

    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def _read_override_file(path: Path) -> dict:
    import yaml

    try:
        content = yaml.safe_load(path.read_text())  # YAML is a superset of JSON
    except (OSError, yaml.YAMLError) as error:
        raise InputError(f"{path}: cannot read the overrides file ({error})") from None
    if not isinstance(content, Mapping) or not all(isinstance(v, Mapping) for v in content.values()):
        raise InputError(f"{path}: overrides file must map stage names ({', '.join(OVERRIDE_SCOPES)}) to key: value")
    for scope in content:
        if scope not in OVERRIDE_SCOPES:
            raise InputError(f"{path}: unknown stage {scope!r} (known: {', '.join(OVERRIDE_SCOPES)})")
    return {scope: dict(values) for scope, values in content.items()}


def parse_overrides(overrides) -> dict[str, dict]:
    """Per-scope config overrides from ``"solid#learning_rate=0.001"`` strings (no stage prefix: every stage;
    ``refiner#...``: the four refiners), files (``.json``/``.yaml`` mapping scope -> {key: value}), or a mapping
    of that form; values are YAML (``0.001``, ``[4,8,8,8,8]``, ``false``). Returns ``{scope: {key: value}}``."""
    if overrides is None:
        return {}
    if isinstance(overrides, Mapping):
        return _read_override_file_content(overrides)
    items = [overrides] if isinstance(overrides, str) else list(overrides)
    merged: dict[str, dict] = {}
    for item in items:
        if isinstance(item, Mapping):
            parsed = _read_override_file_content(item)
        elif "=" not in str(item):
            path = Path(str(item))
            if not path.is_file():
                raise InputError(f"--override {item!r}: neither key=value nor an existing JSON/YAML file")
            parsed = _read_override_file(path)
        else:
            key, value = str(item).split("=", 1)
            scope, _, rest = key.strip().partition("#")
            scope, key = (scope, rest) if scope in OVERRIDE_SCOPES and rest else ("all", key.strip())
            parsed = {scope: {key: _parse_value(value)}}
        for scope, values in parsed.items():
            merged.setdefault(scope, {}).update(values)
    return merged


def _read_override_file_content(content: Mapping) -> dict:
    for scope, values in content.items():
        if scope not in OVERRIDE_SCOPES or not isinstance(values, Mapping):
            raise InputError(f"overrides: {scope!r} must be one of {', '.join(OVERRIDE_SCOPES)} mapping to key: value")
    return {scope: dict(values) for scope, values in content.items()}


def cascade_overrides(stage_overrides=None, override=None) -> dict[str, dict]:
    """The cascade's overrides per stage (``coarse`` ... ``refiner``: ``all``, then the stage's own) from
    ``stage_overrides`` (the mapping form: a dict, JSON, Python literal or a JSON/YAML file, ``{stage: {key: value}}``)
    and ``override`` (``"solid#key=value"`` strings, as ``train`` takes them), both read by :func:`parse_overrides`.
    The cascade runs one refiner config for the four organs, so a single organ's refiner scope is refused."""
    items = [as_mapping(stage_overrides, "stage_overrides")] if stage_overrides not in (None, "", {}) else []
    if override is not None:
        items += [override] if isinstance(override, (str, Mapping)) else list(override)
    parsed = parse_overrides(items)
    single = sorted(scope for scope in parsed if scope.startswith("refiner_"))
    if single:
        raise InputError(f"--override: {single[0]}: the cascade takes refiner overrides for all four organs "
                         "(scope refiner), not one organ's")
    merged = {stage: {**parsed.get("all", {}), **parsed.get(stage, {})} for stage in STAGE_BUNDLES}
    return {stage: values for stage, values in merged.items() if values}


@dataclass(frozen=True)
class SegmentOptions:
    """How the cascade is loaded and run, checked once: the options of ``flare-c2f segment`` and ``pseudo_label``, of
    :func:`~flare_c2f_extensions.runs.segment.segment` / ``Segmenter`` and of the cascade bundle's config.

    ``organs``: FLARE ids (only the stages they need are loaded); ``device``: ``None`` is CUDA when available, else
    the CPU; ``amp``: ``None`` chooses by device; ``threads``: torch's intra-op threads (``None``: as they are);
    ``bundles_dir`` / ``stage_dirs``: where the stages come from; ``overrides``: config overrides per stage;
    ``require_weights``: ``False`` runs stages without a checkpoint on random weights seeded by ``seed`` (timing);
    ``engine``: ``auto``, ``torch``, ``openvino`` or ``openvino-int8``; ``max_voxels``: the largest input
    (``"default"``: the cascade's limit, ``None``: none); ``calibration``: the CTs (a folder or datalist) that
    calibrate ``openvino-int8``.
    """

    organs: tuple[int, ...] = tuple(ORGANS)
    device: object = None
    amp: bool | None = None
    threads: int | None = None
    bundles_dir: Path | None = None
    stage_dirs: Mapping = field(default_factory=dict)
    overrides: Mapping = field(default_factory=dict)
    require_weights: bool = True
    seed: int = 0
    engine: str = "auto"
    max_voxels: int | str | None = "default"
    calibration: str | None = None

    @classmethod
    def parse(
        cls,
        organs=None,
        device=None,
        amp=None,
        threads=None,
        bundles_dir=None,
        stage_dirs=None,
        stage_overrides=None,
        override=None,
        require_weights=True,
        seed=0,
        engine="auto",
        max_voxels="default",
        calibration=None,
    ) -> SegmentOptions:
        """The options from what a command line, a Python caller or a config gives; one :class:`InputError` naming
        the option for a value that cannot be used. ``stage_overrides`` (a mapping, JSON or file) and ``override``
        (``"solid#key=value"`` strings) are merged per stage (:func:`cascade_overrides`)."""
        return cls(
            organs=parse_organs(organs),
            device=parse_device(device),
            amp=None if amp is None else as_bool(amp, "amp"),
            threads=parse_threads(threads),
            bundles_dir=None if bundles_dir in (None, "") else Path(str(bundles_dir)).expanduser(),
            stage_dirs=as_mapping(stage_dirs, "stage_dirs"),
            overrides=cascade_overrides(stage_overrides, override),
            require_weights=as_bool(require_weights, "require_weights"),
            seed=parse_seed(seed),
            engine="auto" if engine is None else str(engine),
            max_voxels=parse_max_voxels(max_voxels),
            calibration=None if calibration in (None, "") else str(calibration),
        )
