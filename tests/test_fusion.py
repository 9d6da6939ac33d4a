"""Fusion one slab and one channel at a time gives the label maps of the whole-box fusion it replaced."""

from __future__ import annotations

import pytest
import torch

from flare_c2f_extensions.cascade import pipeline as cascade_module
from flare_c2f_extensions.transforms.boxes import box_size, box_slices
from flare_c2f_extensions.transforms.resizing import resize_rows, resize_spatial


def reference_fuse(probs, box, stage_labels, labels, confidence) -> None:
    """The fusion as it was before slabs: every channel resized to the whole box at once."""
    size = box_size(box)
    best_p = resize_spatial(probs[0:1], size, "trilinear")[0]
    best_c = torch.zeros(size, dtype=torch.uint8)
    for channel in range(1, probs.shape[0]):
        p = resize_spatial(probs[channel : channel + 1], size, "trilinear")[0]
        best_c.masked_fill_(p > best_p, channel)
        torch.maximum(best_p, p, out=best_p)
    region = box_slices(box)
    region_labels, region_confidence = labels[region], confidence[region]
    claim = (best_c > 0) & (best_p > region_confidence)
    lut = torch.tensor((0,) + tuple(stage_labels), dtype=torch.uint8)
    region_labels[claim] = lut[best_c[claim].long()]
    region_confidence[claim] = best_p[claim]


def smooth_probs(channels: int, grid, seed: int) -> torch.Tensor:
    """Softmax of smooth random logits: organ-like blobs with boundaries, as a trained network gives."""
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn((1, channels, *(g // 4 for g in grid)), generator=generator) * 4
    logits = torch.nn.functional.interpolate(logits, size=tuple(grid), mode="trilinear", align_corners=False)
    return torch.softmax(logits[0], dim=0)


STAGES = [  # (labels, grid, box): up- and down-sampling, odd sizes, a box touching the border, overlaps
    ((1, 2, 3, 13), (16, 16, 16), ((3, 5, 2), (40, 33, 27))),
    ((4, 11, 12), (16, 16, 16), ((0, 0, 0), (47, 41, 29))),
    ((5, 6), (8, 8, 8), ((20, 1, 4), (47, 21, 9))),
    ((9,), (16, 16, 16), ((10, 10, 10), (17, 15, 14))),
]


@pytest.mark.parametrize("slab_voxels", [7 * 41 * 29, 2**23])  # many thin slabs, and one slab for the box
def test_slab_fusion_gives_the_reference_label_map(monkeypatch, slab_voxels):
    monkeypatch.setattr(cascade_module, "FUSE_SLAB_VOXELS", slab_voxels)
    shape = (47, 41, 29)
    ours = (torch.zeros(shape, dtype=torch.uint8), torch.zeros(shape))
    theirs = (torch.zeros(shape, dtype=torch.uint8), torch.zeros(shape))
    for seed, (labels, grid, box) in enumerate(STAGES):
        probs = smooth_probs(len(labels) + 1, grid, seed)
        cascade_module._fuse(probs, box, labels, *ours)
        reference_fuse(probs, box, labels, *theirs)
    assert len(torch.unique(theirs[0])) > 5  # several stages claimed voxels: the comparison means something
    assert torch.equal(ours[0], theirs[0])
    assert torch.allclose(ours[1], theirs[1], atol=1e-5, rtol=0)


def test_resize_rows_is_the_trilinear_resize_row_by_row():
    x = torch.rand(2, 13, 11, 9)
    size = (30, 7, 20)
    whole = resize_spatial(x, size, "trilinear")
    rows = torch.cat([resize_rows(x, size, start, min(start + 4, size[0])) for start in range(0, size[0], 4)], dim=1)
    assert rows.shape == whole.shape
    assert torch.allclose(rows, whole, atol=1e-5, rtol=0)


def test_argmax_channel_is_torch_argmax_ties_included():
    from flare_c2f_extensions.cascade.pipeline import _argmax_channel

    for channels in (2, 5, 14):
        probs = torch.softmax(torch.randn(channels, 9, 7, 5, generator=torch.Generator().manual_seed(channels)), 0)
        probs[:, 0, 0, 0] = 1.0 / channels  # all channels tie: background
        probs[:, 1, 0, 0] = 0.0
        probs[channels // 2, 1, 0, 0] = probs[channels - 1, 1, 0, 0] = 0.5  # two organs tie: the first
        winners = _argmax_channel(probs)
        assert winners.dtype == torch.uint8 and winners.shape == (1, 9, 7, 5)
        assert torch.equal(winners[0].long(), probs.argmax(0))
    lut = (7, 9)
    probs = torch.softmax(torch.randn(3, 6, 6, 6, generator=torch.Generator().manual_seed(0)), 0)
    expected = torch.tensor((0, *lut), dtype=torch.uint8)[probs.argmax(0)]
    assert torch.equal(_argmax_channel(probs, lut)[0], expected)
