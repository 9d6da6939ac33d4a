"""Loading a stage's checkpoint into its network, with one clear line for every way a checkpoint can be wrong.

A checkpoint is what the stage bundles' ``CheckpointSaver`` writes (``{"model": state_dict}``) or a bare state
dict. It is always read with ``torch.load(..., weights_only=True)``: a checkpoint never runs code. Missing,
truncated, Git-LFS pointer, foreign-format and wrong-shape checkpoints end in one
:class:`~flare_c2f_extensions.errors.InputError` that names the stage, the file and the problem.
"""

from __future__ import annotations

import os
import pickle
import zipfile
from collections.abc import Mapping
from pathlib import Path

import torch

from flare_c2f_extensions.errors import InputError

__all__ = ["load_weights"]

_LFS_POINTER = b"version https://git-lfs.github.com/spec/v1"


def load_weights(
    network: torch.nn.Module, checkpoint: str | os.PathLike, stage: str, assign: bool = False
) -> torch.nn.Module:
    """Load ``checkpoint`` into ``network`` (the ``stage``'s; any name that tells the user which one) and return it.
    ``assign``: the network takes the checkpoint's tensors (cast to its own dtypes) instead of copying them, for a
    network built on the meta device.

    Raises :class:`InputError` naming the stage and the file when the checkpoint is missing, empty, truncated, a
    Git-LFS pointer, not a PyTorch state dict, or trained for another network (missing, unexpected or
    differently shaped parameters).
    """
    path = Path(checkpoint)

    def refuse(problem: str) -> InputError:
        return InputError(f"{path}: {problem} (weights of the {stage} stage)")

    if not path.is_file():
        raise refuse("the checkpoint does not exist" if not path.exists() else "the checkpoint is not a regular file")
    with open(path, "rb") as handle:
        head = handle.read(len(_LFS_POINTER))
    if not head:
        raise refuse("the checkpoint is empty (0 bytes)")
    if head == _LFS_POINTER:
        raise refuse("a Git LFS pointer, not the weights: fetch them with `git lfs pull` or download the release")
    state = _read_state(path, refuse)
    _check_fits(network, state, refuse)
    if assign:
        own = network.state_dict()
        state = {key: value.to(own[key].dtype).contiguous() for key, value in state.items()}
    network.load_state_dict(state, assign=assign)
    return network


def _read_state(path: Path, refuse) -> dict:
    with open(path, "rb") as handle:
        magic = handle.read(4)
    if magic != b"PK\x03\x04" and not magic.startswith(b"\x80"):  # torch.save writes a zip (legacy: a pickle)
        raise refuse(f"not a PyTorch checkpoint (it starts with {magic!r}, not a zip or pickle)")
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:  # weights_only refuses objects other than tensors and containers
        why = f"the checkpoint holds more than tensors, which could run code: not loaded ({_why(error)})"
        raise refuse(why) from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError) as error:
        raise refuse(f"truncated or corrupt (an interrupted download or copy?): {_why(error)}") from None
    state = loaded["model"] if isinstance(loaded, Mapping) and "model" in loaded else loaded
    if not isinstance(state, Mapping) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        kind = type(state).__name__
        raise refuse(f"not a state dict of tensors (found a {kind}); expected what the stage's train.json saves")
    return dict(state)


def _why(error: BaseException) -> str:
    """The specific part of torch's message (its text around it suggests ``weights_only=False``: not for us)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    if "WeightsUnpickler error:" in str(error):
        after = str(error).split("WeightsUnpickler error:", 1)[1]
        lines = [line.strip() for line in after.splitlines() if line.strip()]
    return lines[0].split(". ")[0] if lines else type(error).__name__


def _check_fits(network: torch.nn.Module, state: Mapping, refuse) -> None:
    """Compare names and shapes first, so that a mismatch is one summarised line instead of torch's list."""
    own = network.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [k for k in own if k in state and tuple(own[k].shape) != tuple(state[k].shape)]
    if not (missing or unexpected or shapes):
        return
    parts = []
    if shapes:
        k = shapes[0]
        parts.append(
            f"{len(shapes)} parameter(s) of another shape (e.g. {k}: {list(state[k].shape)} in the checkpoint, "
            f"{list(own[k].shape)} in the network)"
        )
    if missing:
        parts.append(f"{len(missing)} missing (e.g. {missing[0]})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected (e.g. {unexpected[0]})")
    raise refuse(
        "the checkpoint does not fit the stage's network: " + "; ".join(parts)
        + ". Was it trained with another network_def (channels, classes)?"
    )
