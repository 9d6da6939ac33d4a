"""Resizing between a crop's box and a stage's fixed grid: linear resize, soft labels, paste back."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from flare_c2f_extensions.transforms.boxes import _LINEAR_MODES, Box, _plain, _spatial_mask, box_size, box_slices

__all__ = [
    "crop_resize", "paste_into", "resize_rows", "resize_spatial", "soft_labels",
]


def resize_spatial(x, spatial_size: Sequence[int], mode: str = "trilinear") -> torch.Tensor:
    """Resize a channel-first tensor to ``spatial_size`` (half-pixel geometry, ``align_corners=False``).

    ``mode``: ``"nearest"`` (done as torch's ``nearest-exact``; keeps the dtype, for label maps), ``"linear"``/
    ``"bilinear"``/``"trilinear"`` (float; integer inputs are computed in float32) or ``"area"``.
    Returns a plain tensor; the input itself when the size is already right.
    """
    t = _plain(x)
    size = tuple(int(s) for s in spatial_size)
    if tuple(t.shape[1:]) == size:
        return t
    mode = str(mode).lower()
    nd = t.ndim - 1
    if mode in ("nearest", "nearest-exact"):
        dtype = t.dtype
        work = t
        if dtype == torch.bool:
            work = t.to(torch.uint8)
        elif not (dtype == torch.uint8 or dtype.is_floating_point):
            work = t.to(torch.float32)  # exact for label ids below 2**24
        out = F.interpolate(work[None], size=size, mode="nearest-exact")[0]
        return out.to(dtype)
    if mode in _LINEAR_MODES.values() or mode == "area":
        work = t if t.dtype.is_floating_point else t.to(torch.float32)
        if mode == "area":
            return F.interpolate(work[None], size=size, mode="area")[0]
        return F.interpolate(work[None], size=size, mode=_LINEAR_MODES[nd], align_corners=False)[0]
    raise ValueError(f"unsupported interpolation mode {mode!r}: use nearest, (bi/tri)linear or area")


def _linear_axis(in_size: int, out_size: int, start: int, stop: int):
    """Source indices and weights of outputs ``start..stop-1`` of a linear resize ``in_size -> out_size``
    (half-pixel geometry, ``align_corners=False``, as torch computes them: float32, clamped at the borders)."""
    scale = np.float32(in_size) / np.float32(out_size)
    src = np.maximum(scale * (np.arange(start, stop, dtype=np.float32) + np.float32(0.5)) - np.float32(0.5), 0)
    i0 = np.minimum(np.floor(src).astype(np.int64), in_size - 1)
    lam = np.clip(src - i0.astype(np.float32), 0, 1).astype(np.float32)
    i1 = np.where(i0 < in_size - 1, i0 + 1, i0)
    return i0, i1, np.float32(1) - lam, lam


def resize_rows(x: torch.Tensor, spatial_size: Sequence[int], start: int, stop: int) -> torch.Tensor:
    """Rows ``start..stop-1`` (first spatial axis) of the trilinear resize of a channel-first 3D ``x`` to
    ``spatial_size``, without computing the others: bilinear on the input planes these rows need, then linear
    across them. Agrees with :func:`resize_spatial` to a few float32 ulps (about 2e-6 for probabilities); lets
    the cascade resize and fuse a box one slab at a time, so memory does not grow with the box."""
    size = tuple(int(s) for s in spatial_size)
    i0, i1, w0, w1 = _linear_axis(int(x.shape[1]), size[0], start, stop)
    low, high = int(i0.min()), int(i1.max()) + 1
    planes = x[:, low:high].float()
    if tuple(planes.shape[2:]) != size[1:]:
        planes = F.interpolate(planes, size=size[1:], mode="bilinear", align_corners=False)
    # row by row, a*w0 + b*w1 rounded as two products and one sum, straight from the planes: no gathered copies
    out = torch.empty((planes.shape[0], stop - start, *size[1:]), dtype=torch.float32, device=planes.device)
    term = torch.empty((planes.shape[0], *size[1:]), dtype=torch.float32, device=planes.device)
    for row, (a, b, wa, wb) in enumerate(zip((i0 - low).tolist(), (i1 - low).tolist(), w0.tolist(), w1.tolist())):
        torch.mul(planes[:, a], wa, out=out[:, row])
        out[:, row].add_(torch.mul(planes[:, b], wb, out=term))
    return out


def soft_labels(label_map, labels: Sequence[int]) -> torch.Tensor:
    """One-hot float32 ``(1 + len(labels), *spatial)`` of a FLARE-id label map: channel ``i + 1`` is
    ``labels[i]``, channel 0 everything else (so a stage's local ids, as :func:`remap_labels` gives them)."""
    if labels is None:
        raise ValueError("soft labels need the stage's labels")
    m = _spatial_mask(label_map)
    organs = [m == int(label) for label in labels]
    background = ~torch.stack(organs).any(0) if organs else torch.ones_like(m, dtype=torch.bool)
    return torch.stack([background] + organs).to(torch.float32)


def crop_resize(img, box: Box, spatial_size: Sequence[int], mode: str = "trilinear") -> torch.Tensor:
    """Cut ``box`` out of a channel-first ``img`` and resize the crop to ``spatial_size`` (plain tensor).

    Only the crop is resampled; the full-resolution volume is never copied or converted.
    """
    t = _plain(img)
    return resize_spatial(t[(slice(None),) + box_slices(box)], spatial_size, mode)


def paste_into(volume_shape: Sequence[int], box: Box, crop, mode: str = "nearest", fill=0) -> torch.Tensor:
    """Put ``crop`` back at ``box`` in a new volume of spatial shape ``volume_shape`` filled with ``fill``.

    ``crop`` is channel-first (the result is ``(C, *volume_shape)``) or spatial (result ``volume_shape``), on the
    box's grid or on a fixed grid; in the latter case it is first resized to the box size with ``mode`` (nearest
    for labels, linear for probabilities).
    """
    t = _plain(crop)
    volume_shape = tuple(int(s) for s in volume_shape)
    nd = len(volume_shape)
    spatial = t.ndim == nd
    if spatial:
        t = t[None]
    t = resize_spatial(t, box_size(box), mode)
    out = torch.full((t.shape[0],) + volume_shape, fill, dtype=t.dtype, device=t.device)
    out[(slice(None),) + box_slices(box)] = t
    return out[0] if spatial else out
