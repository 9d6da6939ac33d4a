"""Parsing of the segmenter's arguments: organs, booleans, mappings, device and thread count."""

from __future__ import annotations

import ast
import json
from collections.abc import Mapping, Sequence
from pathlib import Path

from .errors import InputError
from .labels import ORGAN_IDS, ORGANS

__all__ = [
    "as_bool", "as_mapping", "parse_device", "parse_organs", "parse_threads",
]


def parse_organs(organs) -> tuple[int, ...]:
    """FLARE ids of ``organs``: ``None`` (all), ``"liver,spleen"``, ``["liver", 3]``; unknown names are an
    :class:`InputError` listing the valid ones."""
    if organs is None or organs == "" or organs == "all":
        return tuple(ORGANS)
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
