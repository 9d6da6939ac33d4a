"""Issue 14: nothing lost, nothing silent. One test (or a few) for each numbered point of the issue except the
memory bound (point 5): outputs never overwrite inputs, the exit status, ``evaluate``'s fault isolation and
reorientation, every input folder entry accounted for, bad weights, finished outputs that are really finished,
compressed DICOM, qform/sform of sheared outputs, release zip bombs and case collisions, and the small items.

Tiny random-weight stages as in ``test_invariance.py``.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import BUNDLES
from flare_c2f_extensions.cascade import load_stage
from flare_c2f_extensions.data import InputError
from test_invariance import TINY_STAGES, no_hang  # noqa: F401

# -- 6. bad weights --------------------------------------------------------------------------------------------


def _coarse(weights: Path, channels=(4, 8, 8, 8, 8)):
    overrides = {**TINY_STAGES["coarse"], "network_def": {"channels": list(channels)}}
    return load_stage("coarse", BUNDLES / "flare22_coarse", "cpu", overrides, weights=weights)


def _state(channels) -> dict:
    torch.manual_seed(0)
    overrides = {**TINY_STAGES["coarse"], "network_def": {"channels": list(channels)}}
    stage = load_stage("coarse", BUNDLES / "flare22_coarse", "cpu", overrides, weights="/nowhere.pt", require_weights=False)
    return stage.network.state_dict()


class _NotATensor:  # a pickled object: weights_only=True must refuse it
    pass


@pytest.mark.parametrize(
    "write, problem",
    [
        (lambda p: torch.save({"model": _state((4, 8, 8, 8, 16))}, p), "does not fit the stage's network"),
        (lambda p: p.write_text("version https://git-lfs.github.com/spec/v1\noid sha256:ab\nsize 60000000\n"), "Git LFS"),
        (lambda p: p.write_bytes(b""), "empty"),
        (lambda p: (torch.save({"model": _state((4, 8, 8, 8, 8))}, p), p.write_bytes(p.read_bytes()[:3000])), "truncated"),
        (lambda p: p.write_bytes(pickle.dumps({"model": _NotATensor()})), "more than tensors"),
        (lambda p: p.write_bytes(b"\x89HDF\r\n\x1a\n" + bytes(400)), "not a PyTorch checkpoint"),
        (lambda p: torch.save({"model": [1, 2, 3]}, p), "not a state dict"),
    ],
    ids=["wrong_shape", "lfs_pointer", "empty", "truncated", "pickled_object", "foreign_format", "not_a_state_dict"],
)
def test_bad_checkpoint_is_one_line_naming_stage_file_and_problem(tmp_path, write, problem):
    checkpoint = tmp_path / "model.pt"
    write(checkpoint)
    with pytest.raises(InputError) as error:
        _coarse(checkpoint)
    message = str(error.value)
    assert "\n" not in message and str(checkpoint) in message and "coarse stage" in message, message
    assert problem in message, message
    assert "weights_only=False" not in message


def test_good_checkpoint_loads_with_weights_only(tmp_path):
    state = _state((4, 8, 8, 8, 8))
    torch.save({"model": state}, tmp_path / "model.pt")
    stage = _coarse(tmp_path / "model.pt")
    assert all(torch.equal(stage.network.state_dict()[k], v) for k, v in state.items())
    torch.save(state, tmp_path / "bare.pt")  # a bare state dict loads too
    assert torch.equal(next(iter(_coarse(tmp_path / "bare.pt").network.parameters())), next(iter(state.values())))
