"""Parsing of the segmenter's arguments: organs, booleans, mappings, device and thread count."""

from __future__ import annotations

import ast
import json
from collections.abc import Mapping, Sequence
from pathlib import Path

from .errors import InputError
from .labels import ORGAN_IDS, ORGANS

__all__ = [
    "as_bool", "as_mapping", "check_options", "parse_device", "parse_max_voxels", "parse_organs", "parse_seed",
    "parse_threads",
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


def _is_flag(argument: str) -> bool:
    """As fire reads the command line: ``--name``, ``-n``, ``-name`` (a negative number is a value)."""
    return argument.startswith("--") or (len(argument) > 1 and argument[0] == "-" and argument[1].isalpha())


def check_options(command: str, function, argv: Sequence[str]) -> None:
    """Refuse, before anything runs, an option that ``function`` does not take (fire would try it on the result,
    after the whole run) or more positional arguments than it has parameters. ``argv``: the arguments after the
    command's name; everything after a lone ``--`` is fire's own."""
    import difflib
    import inspect

    parameters = [p for p in inspect.signature(function).parameters.values()
                  if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)]
    names = [p.name for p in parameters]
    arguments = list(argv[: argv.index("--")] if "--" in argv else argv)
    given, positional, index = set(), [], 0
    while index < len(arguments):
        argument = arguments[index]
        if not _is_flag(argument):
            positional.append(argument)
        else:
            name, equals, _ = argument.lstrip("-").partition("=")
            name = name.replace("-", "_")
            if name in ("help", "h"):
                return  # fire shows the help
            known = name if name in names else name[2:] if name.startswith("no") and name[2:] in names else None
            if known is None:
                close = difflib.get_close_matches(name, names, n=1)
                hint = f" (did you mean --{close[0]}?)" if close else ""
                raise InputError(f"{command}: unknown option {argument.split('=')[0]}{hint}; its options: "
                                 + ", ".join(f"--{n}" for n in names))
            given.add(known)
            if not equals and index + 1 < len(arguments) and not _is_flag(arguments[index + 1]):
                index += 1  # the flag's value
        index += 1
    free = [n for n in names if n not in given]
    if len(positional) > len(free):
        raise InputError(f"{command}: unexpected argument {positional[len(free)]!r} (options start with --)")
