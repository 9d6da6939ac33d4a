"""Export a bundle's networks with MONAI's own exporters and check them against PyTorch.

For every checkpoint in ``models/`` (``model.pt``; the refiner's ``model_<organ>.pt``) this runs

- ``monai.bundle ckpt_export`` (TorchScript, scripted as the model zoo does by default) to ``<stem>.ts``;
- ``monai.bundle onnx_export`` (torch's ONNX exporter; needs ``onnx`` and ``onnxscript``) to ``<stem>.onnx``;

and, with ``check=True``, runs the PyTorch network, the TorchScript module and the ONNX model (onnxruntime) on the
same random input of the bundle's grid and reports the largest absolute difference of their logits. Both exports
have the input shape fixed to ``[1, 1, *spatial_size]`` (the bundles always feed the fixed grid). The ``.ts`` files
hold the metadata and ``inference.json`` (``monai.bundle load --load_ts_module True`` reads them), and the cascade
runs from them when a stage's ``ckpt_path`` ends in ``.ts`` (``stages.load_stage``).

Command line: ``python -m flare_c2f_extensions export --bundle_dir bundles/flare22_coarse``.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

from flare_c2f_extensions.cascade.configs import flatten_overrides, read_stage_config
from flare_c2f_extensions.cascade.weights import load_weights

__all__ = ["bundle_checkpoints", "compare", "export_bundle", "export_checkpoint"]

logger = logging.getLogger(__name__)

FORMATS = ("ts", "onnx")


def _parser(bundle_dir: Path, overrides: Mapping):
    parser = read_stage_config(bundle_dir, overrides)
    parser.read_meta(str(bundle_dir / "configs" / "metadata.json"))
    return parser


def bundle_checkpoints(bundle_dir: str | os.PathLike) -> list[Path]:
    """The PyTorch checkpoints of a bundle: ``models/*.pt`` (one per refiner organ), sorted."""
    return sorted(Path(bundle_dir, "models").glob("*.pt"))


def export_checkpoint(
    bundle_dir: str | os.PathLike,
    checkpoint: str | os.PathLike,
    formats: Sequence[str] = FORMATS,
    out_dir: str | os.PathLike | None = None,
    overrides: Mapping | None = None,
    check: bool = True,
    seed: int = 0,
) -> dict:
    """Export one checkpoint of a bundle; returns file paths, seconds and (``check``) max absolute differences."""
    from monai.bundle import ckpt_export, onnx_export

    bundle_dir, checkpoint = Path(bundle_dir).resolve(), Path(checkpoint).resolve()
    out_dir = Path(out_dir) if out_dir is not None else checkpoint.parent
    out_dir.mkdir(parents=True, exist_ok=True)
    unknown = set(formats) - set(FORMATS)
    if unknown:
        raise ValueError(f"unknown export format(s) {sorted(unknown)}; choose from {FORMATS}")
    flat = flatten_overrides(overrides)
    parser = _parser(bundle_dir, flat)
    load_weights(parser.get_parsed_content("network_def"), checkpoint, checkpoint.stem)  # a bad one: one line, now
    channels_id = "network_def#in_channels"  # the cascade's CascadeNetwork takes its stages' default: one CT channel
    in_channels = int(parser.get_parsed_content(channels_id)) if channels_id in parser else 1
    input_shape = [1, in_channels, *(int(s) for s in parser.get_parsed_content("spatial_size"))]
    common = {
        "net_id": "network_def",
        "ckpt_file": str(checkpoint),
        "key_in_ckpt": _key_in_checkpoint(checkpoint),
        "meta_file": str(bundle_dir / "configs" / "metadata.json"),
        "config_file": str(bundle_dir / "configs" / "inference.json"),
        "input_shape": input_shape,
        "bundle_root": str(bundle_dir),
        **flat,
    }
    result = {"bundle": bundle_dir.name, "checkpoint": str(checkpoint), "input_shape": input_shape, "seconds": {}}
    if "ts" in formats:
        start = time.perf_counter()
        result["ts"] = str(out_dir / f"{checkpoint.stem}.ts")
        ckpt_export(filepath=result["ts"], **common)
        result["seconds"]["ts_export"] = round(time.perf_counter() - start, 2)
    if "onnx" in formats:
        start = time.perf_counter()
        result["onnx"] = str(out_dir / f"{checkpoint.stem}.onnx")
        onnx_export(
            filepath=result["onnx"], converter_kwargs={"input_names": ["image"], "output_names": ["pred"]}, **common
        )
        result["seconds"]["onnx_export"] = round(time.perf_counter() - start, 2)
    if check:
        result.update(compare(parser, checkpoint, result.get("ts"), result.get("onnx"), input_shape, seed))
    return result


def _key_in_checkpoint(checkpoint: Path) -> str:
    """``"model"`` for a checkpoint saved as ``{"model": state_dict, ...}``, ``""`` for a bare state dict: MONAI's
    exporters take the whole file for the state dict unless told the key (and then match none of its names)."""
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    return "model" if isinstance(state, Mapping) and isinstance(state.get("model"), Mapping) else ""


@torch.no_grad()
def compare(parser, checkpoint, ts_file, onnx_file, input_shape, seed: int = 0) -> dict:
    """Max absolute differences of the exported networks' logits from PyTorch's on one random input."""
    network = load_weights(parser.get_parsed_content("network_def"), checkpoint, Path(checkpoint).stem).eval()
    x = torch.rand(input_shape, generator=torch.Generator().manual_seed(seed))
    reference = network(x)
    found = {"max_abs_logit": float(reference.abs().max())}
    if ts_file is not None:
        module = torch.jit.load(ts_file, map_location="cpu").eval()
        found["ts_max_abs_diff"] = float((module(x) - reference).abs().max())
    if onnx_file is not None:
        import onnxruntime

        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = torch.get_num_threads()  # as many threads as torch was given
        session = onnxruntime.InferenceSession(onnx_file, options, providers=["CPUExecutionProvider"])
        output = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
        found["onnx_max_abs_diff"] = float((torch.from_numpy(output) - reference).abs().max())
    return found


def export_bundle(
    bundle_dir: str | os.PathLike,
    formats: Sequence[str] | str = FORMATS,
    out_dir: str | os.PathLike | None = None,
    overrides: Mapping | None = None,
    check: bool = True,
    seed: int = 0,
) -> list[dict]:
    """Export every checkpoint of ``bundle_dir/models`` (see :func:`export_checkpoint`)."""
    if isinstance(formats, str):
        formats = [f.strip() for f in formats.split(",") if f.strip()]
    checkpoints = bundle_checkpoints(bundle_dir)
    if not checkpoints:
        raise FileNotFoundError(f"{Path(bundle_dir) / 'models'}: no *.pt checkpoint to export (train the bundle first)")
    return [export_checkpoint(bundle_dir, c, formats, out_dir, overrides, check, seed) for c in checkpoints]
