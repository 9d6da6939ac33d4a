"""Transforms of the cascade, MONAI style: an array version and a dictionary version of each."""

from __future__ import annotations

import functools
import logging
import warnings
from collections.abc import Hashable, Mapping, Sequence

import cc3d
import numpy as np
import torch
import torch.nn.functional as F
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.data.meta_obj import get_track_meta
from monai.data.utils import affine_to_spacing, to_affine_nd
from monai.transforms import (
    InvertibleTransform,
    MapTransform,
    RandomizableTransform,
    ScaleIntensityRanged,
    Transform,
)
from monai.transforms.inverse import TraceableTransform
from monai.utils import TraceKeys, TransformBackends, convert_to_numpy, convert_to_tensor, ensure_tuple_rep
from monai.utils.misc import fall_back_tuple

from .labels import ORGANS

__all__ = [
    "BOX_META_KEY", "RENAMED_KEYWORDS", "SKIPPED_META_KEY", "ClearIfSkippedd", "ClipIntensityd",
    "CropFromMask", "CropFromMaskd", "KeepLargestComponent", "KeepLargestComponentd", "RandCropFromMask",
    "RandCropFromMaskd", "RemapLabels", "RemapLabelsd", "ResizeToGridd", "affine_of", "box_affine", "box_from_mask",
    "box_size", "box_slices", "crop_resize", "expand_box", "fov_affine", "get_crop_box", "keep_largest_component",
    "label_names", "map_box", "paste_into", "remap_labels", "resize_spatial", "soft_labels",
]

logger = logging.getLogger(__name__)


class ClipIntensityd(ScaleIntensityRanged):
    """0.1.0 configs' clip to ``[minv, maxv]``: MONAI's ``ScaleIntensityRanged`` with an identity range and
    ``clip=True`` (what the bundles now use; exact for [0, 1]). Kept for one release for trained bundles' configs."""

    def __init__(self, keys: KeysCollection, minv: float = 0.0, maxv: float = 1.0, allow_missing_keys: bool = False):
        super().__init__(keys, minv, maxv, minv, maxv, clip=True, allow_missing_keys=allow_missing_keys)


# ---------------------------------------------------------------------------------------------------------------
# Boxes: plain helpers (no MetaTensor machinery), used by the transforms below and by the cascade's manual fusion.
#
# A box is ``(start, stop)``: two tuples of voxel indices on one grid, ``stop`` exclusive, so that
# ``volume[box_slices(box)]`` is the crop. Voxel ``i`` covers the continuous voxel coordinates ``[i - 0.5, i + 0.5]``
# (NIfTI/MONAI convention: the affine maps voxel centres), and every resize here uses half-pixel geometry
# (``align_corners=False``, "nearest" done as torch's ``nearest-exact``), which is what MONAI's ``Resize`` records in
# the affine. That makes crop -> resize -> resize back -> paste consistent with the affines.
# ---------------------------------------------------------------------------------------------------------------

Box = tuple[tuple[int, ...], tuple[int, ...]]

SKIPPED_META_KEY = "crop_skipped"
BOX_META_KEY = "crop_box"

_LINEAR_MODES = {1: "linear", 2: "bilinear", 3: "trilinear"}
_TOL = 1e-3  # voxels: floating-point slack when mapping box corners between grids


def _plain(x) -> torch.Tensor:
    """``x`` as a plain torch tensor (no copy for tensors and CPU arrays)."""
    if isinstance(x, MetaTensor):
        return x.as_tensor()
    return x if isinstance(x, torch.Tensor) else torch.as_tensor(np.asarray(x))


def _spatial_mask(mask, ndim: int | None = None) -> torch.Tensor:
    """A label map as a spatial tensor: accepts channel-first with one channel or plain spatial."""
    m = _plain(mask)
    if ndim is None:
        ndim = 3 if m.ndim >= 4 else m.ndim
    if m.ndim == ndim + 1:
        if m.shape[0] != 1:
            raise ValueError(f"mask must be a label map with one channel, got shape {tuple(m.shape)}")
        m = m[0]
    if m.ndim != ndim:
        raise ValueError(f"mask must have {ndim} spatial dims (optionally one channel first), got {tuple(m.shape)}")
    return m


def _per_axis(value, ndim: int, name: str) -> np.ndarray:
    arr = np.asarray(value, dtype=np.float64)
    if arr.ndim == 0:
        return np.full(ndim, float(arr))
    if arr.shape != (ndim,):
        raise ValueError(f"{name} must be a scalar or have {ndim} values, got {value!r}")
    return arr


def _per_side(value, ndim: int, name: str) -> np.ndarray:
    """A margin as an ``(ndim, 2)`` array (low side, high side): scalar, per axis, or per axis and side."""
    arr = np.asarray(value, dtype=np.float64)
    if arr.ndim == 2:
        if arr.shape != (ndim, 2):
            raise ValueError(f"{name} given per axis and side must have shape ({ndim}, 2), got {value!r}")
        return arr
    return np.repeat(_per_axis(arr, ndim, name)[:, None], 2, axis=1)


def label_names(labels: Sequence[int] | None) -> str:
    """Readable names of FLARE ids for messages: ``"liver, spleen"``; ``"foreground"`` for ``None``."""
    if labels is None:
        return "foreground"
    return ", ".join(ORGANS.get(int(label), str(label)) for label in labels)


def box_slices(box: Box) -> tuple[slice, ...]:
    """Slices of the spatial axes that cut ``box`` out of a volume (prepend ``slice(None)`` for channels)."""
    return tuple(slice(int(a), int(b)) for a, b in zip(*box))


def box_size(box: Box) -> tuple[int, ...]:
    return tuple(int(b) - int(a) for a, b in zip(*box))


def expand_box(
    box: Box,
    shape: Sequence[int],
    margin=0,
    min_size: Sequence[int] | int | None = None,
    shift: Sequence[int] | int | None = None,
) -> Box:
    """Grow a box by ``margin`` voxels, to at least ``min_size`` voxels, move it by ``shift``, clamp to ``shape``.

    - ``margin``: scalar, per axis, or per axis and side (``(ndim, 2)``; negative values shrink).
    - ``min_size``: per-axis minimum size; a smaller box grows symmetrically about its centre and, where it would
      leave the volume, slides inside it (so a box of an organ at the border keeps its physical size).
    - ``shift``: per-axis displacement in voxels.
    - The result is clamped to ``[0, shape)`` and holds at least one voxel per axis.
    """
    nd = len(shape)
    shape_a = np.asarray(shape, dtype=np.int64)
    start = np.asarray(box[0], dtype=np.int64).copy()
    stop = np.asarray(box[1], dtype=np.int64).copy()
    m = np.rint(_per_side(margin, nd, "margin")).astype(np.int64)
    start -= m[:, 0]
    stop += m[:, 1]
    if shift is not None:
        s = np.rint(_per_axis(shift, nd, "shift")).astype(np.int64)
        start += s
        stop += s
    start = np.clip(start, 0, shape_a - 1)
    stop = np.clip(stop, start + 1, shape_a)
    if min_size is not None:  # after clipping: margin outside the volume must not count towards the minimum
        need = np.minimum(np.rint(_per_axis(min_size, nd, "min_size")).astype(np.int64), shape_a)
        deficit = np.maximum(need - (stop - start), 0)
        start -= deficit // 2
        stop += deficit - deficit // 2
        low = start < 0  # slide inside the volume, which is at least ``need`` long
        stop[low] -= start[low]
        start[low] = 0
        high = stop > shape_a
        start[high] -= stop[high] - shape_a[high]
        stop[high] = shape_a[high]
    return tuple(int(v) for v in start), tuple(int(v) for v in stop)


def _foreground(m, labels: Sequence[int] | None):
    """Boolean map of ``labels`` (any nonzero for ``None``); numpy on the CPU (several times faster than torch
    for uint8 compares there), torch on other devices."""
    if isinstance(m, torch.Tensor) and m.device.type == "cpu":
        m = m.detach().numpy()
    if labels is None:
        return m != 0
    fg = None
    for label in labels:  # a few compares beat isin / lookup tables on uint8 volumes
        hit = m == int(label)
        fg = hit if fg is None else fg.__ior__(hit)
    return fg


def _profile_box(fg) -> Box | None:
    """Tight box of a boolean map (numpy or torch), narrowing the volume axis by axis."""
    nd = fg.ndim
    start, stop = [0] * nd, [0] * nd
    view = fg
    for axis in range(nd):
        others = tuple(a for a in range(nd) if a != axis)
        if isinstance(view, np.ndarray):
            idx = np.flatnonzero(view.any(axis=others) if others else view)
        else:
            idx = torch.nonzero(view.amax(dim=others) if others else view).flatten().cpu().numpy()
        if idx.size == 0:
            return None
        start[axis], stop[axis] = int(idx[0]), int(idx[-1]) + 1
        sl = [slice(None)] * nd
        sl[axis] = slice(start[axis], stop[axis])
        view = view[tuple(sl)]
    return tuple(start), tuple(stop)


def box_from_mask(
    mask,
    labels: Sequence[int] | None = None,
    margin_vox=0,
    min_size_vox: Sequence[int] | int | None = None,
    shape: Sequence[int] | None = None,
) -> Box | None:
    """Bounding box of the voxels of ``mask`` whose value is in ``labels`` (any nonzero value for ``None``).

    ``mask`` is a label map (numpy or torch, spatial or channel-first with one channel), on its own grid.
    The tight box is grown by ``margin_vox`` and to ``min_size_vox`` and clamped to ``shape`` (the mask's
    shape by default), see :func:`expand_box`. Returns ``None`` when no voxel has one of the labels.
    """
    m = _spatial_mask(mask)
    tight = _profile_box(_foreground(m, labels))
    if tight is None:
        return None
    shape = tuple(m.shape) if shape is None else tuple(shape)
    return expand_box(tight, shape, margin_vox, min_size_vox)


def fov_affine(src_shape: Sequence[int], dst_shape: Sequence[int]) -> np.ndarray:
    """Voxel-to-voxel affine from a grid of ``src_shape`` to one of ``dst_shape`` spanning the same field of view.

    Half-pixel geometry, as MONAI's ``Resize`` records it: src voxel ``j`` -> dst ``(j + 0.5) * dst/src - 0.5``.
    """
    s = np.asarray(dst_shape, dtype=np.float64) / np.asarray(src_shape, dtype=np.float64)
    m = np.eye(len(s) + 1)
    m[:-1, :-1] = np.diag(s)
    m[:-1, -1] = (s - 1.0) / 2.0
    return m


def map_box(box: Box, src_to_dst: np.ndarray, dst_shape: Sequence[int] | None = None) -> Box:
    """The smallest box of the destination grid that covers every voxel of ``box`` (a box of the source grid).

    ``src_to_dst`` maps source voxel coordinates to destination voxel coordinates, e.g.
    ``inv(dst_affine) @ src_affine`` or :func:`fov_affine`. Voxels are mapped as cubes (their 2^n corners), so a
    box from a coarse grid covers the whole physical extent of its coarse voxels.
    """
    nd = len(box[0])
    lo = np.asarray(box[0], dtype=np.float64) - 0.5
    hi = np.asarray(box[1], dtype=np.float64) - 0.5
    corners = np.array(np.meshgrid(*[[lo[i], hi[i]] for i in range(nd)], indexing="ij")).reshape(nd, -1)
    mat = np.asarray(src_to_dst, dtype=np.float64)
    pts = mat[:nd, :nd] @ corners + mat[:nd, nd:]
    a, b = pts.min(axis=1), pts.max(axis=1)
    start = np.floor(a - 0.5 + _TOL).astype(np.int64) + 1
    stop = np.ceil(b + 0.5 - _TOL).astype(np.int64)
    if dst_shape is not None:
        shape_a = np.asarray(dst_shape, dtype=np.int64)
        start = np.clip(start, 0, shape_a - 1)
        stop = np.clip(stop, start + 1, shape_a)
    return tuple(int(v) for v in start), tuple(int(v) for v in stop)


def box_affine(box: Box, spatial_size: Sequence[int]) -> np.ndarray:
    """Voxel affine from the fixed grid of ``spatial_size`` (a resized crop) to the grid the box was cut from."""
    start = np.asarray(box[0], dtype=np.float64)
    m = fov_affine(spatial_size, box_size(box))
    m[:-1, -1] += start
    return m


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
    shape = (1, -1, 1, 1)
    w0_t = torch.from_numpy(w0).to(planes.device).view(shape)
    w1_t = torch.from_numpy(w1).to(planes.device).view(shape)
    out = planes[:, torch.from_numpy(i0 - low).to(planes.device)].mul_(w0_t)
    return out.add_(planes[:, torch.from_numpy(i1 - low).to(planes.device)].mul_(w1_t))


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


def affine_of(x, ndim: int | None = None) -> np.ndarray:
    """The float64 voxel-to-world affine of a MetaTensor (as ``ndim`` spatial dimensions if given), else identity."""
    if isinstance(x, MetaTensor):
        affine = convert_to_numpy(x.affine, wrap_sequence=True)
        return (to_affine_nd(ndim, affine) if ndim else affine).astype(np.float64)
    return np.eye((ndim or 3) + 1)


def get_crop_box(x) -> Box | None:
    """The box of the most recent crop-from-mask recorded on a MetaTensor (``None`` if it was skipped or none)."""
    for op in reversed(getattr(x, "applied_operations", [])):
        info = op.get(TraceKeys.EXTRA_INFO, {})
        if isinstance(info, Mapping) and "box_start" in info and "box_stop" in info:
            if bool(info.get("skipped", False)):
                return None
            return tuple(int(v) for v in info["box_start"]), tuple(int(v) for v in info["box_stop"])
    return None


# ---------------------------------------------------------------------------------------------------------------
# Crop from mask, resized to a fixed grid, invertible
# ---------------------------------------------------------------------------------------------------------------


RENAMED_KEYWORDS = {"labels": "box_labels", "soft_classes": "target_labels"}  # 0.1.0 names, accepted until 0.2.0


def _renamed_keywords(init):
    """Accept the crop transforms' 0.1.0 keywords (``labels``, ``soft_classes``) with a FutureWarning."""

    @functools.wraps(init)
    def wrapper(self, *args, **kwargs):
        for old, new in RENAMED_KEYWORDS.items():
            if old in kwargs:
                warnings.warn(f"{type(self).__name__}: {old}= is now {new}=", FutureWarning, stacklevel=2)
                kwargs[new] = kwargs.pop(old)
        return init(self, *args, **kwargs)

    return wrapper


class CropFromMask(InvertibleTransform):
    """Crop the box of some labels of a mask (plus a margin in mm) from an image and resize it to a fixed grid.

    Args:
        box_labels: FLARE ids whose union defines the box, e.g. ``GROUPS["solid"]``; ``None`` for any nonzero
            label.
        spatial_size: the fixed output grid, e.g. 160 or (160, 160, 160); non-positive entries keep the box size.
        margin_mm: margin added on each side of the tight box, in millimetres (scalar, per axis, or per axis and
            side); converted with the image's spacing (from its affine) and rounded up to whole voxels. Not MONAI's
            ``CropForeground``, whose margin is in voxels: CT slices are often several times thicker than a pixel.
        min_size_mm: optional per-axis minimum box size in millimetres; a smaller box grows about the organ's
            centre (and slides inside the volume at the border).
        mode: interpolation of the crop: ``"trilinear"`` for images, ``"nearest"`` for label maps, ``"soft"`` for
            training targets: a FLARE-id label map becomes background + ``target_labels`` (default ``box_labels``; the
            locator crops the box of all foreground but learns only the small organs) one-hot inside the crop and is
            resized linearly, so the target holds the fraction of each class in each output voxel. A network
            trained on soft targets and fused linearly (as the cascade does) keeps organ boundaries that a hard
            nearest-resized target loses at 160^3 (see ``benchmarks/geometric_ceiling.py``).
        mask_grid: how the mask's voxels relate to the image's:
            ``"auto"`` (default): the same grid if the spatial shapes agree; otherwise through the affines if the
            mask is a MetaTensor; otherwise ``"fov"``.
            ``"same"``: the mask is on the image's grid.
            ``"affine"``: map the mask's box corners to image voxels with ``inv(image.affine) @ mask.affine``
            (e.g. the coarse stage's 128^3 prediction, whose affine MONAI's ``Resize`` has updated).
            ``"fov"``: the mask covers exactly the image's field of view (a plain tensor from a whole-volume
            resize).

    Call: ``cropper(img, mask)``; ``img`` is channel-first on its original (RAS) grid. The box is computed on the
    mask's grid, mapped to the image's voxel grid (a coarse voxel counts with its whole extent), grown by the
    margin and the minimum size, and clamped to the volume. Only the crop is resampled.

    Skipping: when the mask holds none of ``box_labels``, nothing is raised; the box becomes the whole volume (so
    the output still has ``spatial_size`` and still inverts exactly), the output's meta gets
    ``crop_skipped=True`` and the recorded operation ``skipped=True``, and a warning
    ``"no <organs> in mask: stage skipped"`` is logged. :func:`get_crop_box` then returns ``None``.

    The output MetaTensor's affine is updated and the operation (box, mode, output size) is recorded in
    ``applied_operations``; its meta holds ``crop_box`` (``[start, stop]``, image voxels) and ``crop_skipped``.
    ``inverse`` resizes back to the box size (with the recorded mode, or nearest after ``Invertd`` with
    ``nearest_interp=True``) and pastes into zeros of the original shape, restoring the original affine.
    Inverting multi-channel outputs materialises them at full resolution; the cascade fuses with
    :func:`paste_into`/:func:`resize_spatial` inside boxes instead.
    """

    backend = [TransformBackends.TORCH]

    @_renamed_keywords
    def __init__(
        self,
        box_labels: Sequence[int] | None = None,
        spatial_size: Sequence[int] | int = 160,
        margin_mm=0.0,
        min_size_mm: Sequence[float] | float | None = None,
        mode: str = "trilinear",
        mask_grid: str = "auto",
        target_labels: Sequence[int] | None = None,
    ):
        self.box_labels = None if box_labels is None else tuple(int(v) for v in box_labels)
        self.target_labels = self.box_labels if target_labels is None else tuple(int(v) for v in target_labels)
        self.spatial_size = spatial_size
        self.margin_mm = margin_mm
        self.min_size_mm = min_size_mm
        self.mode = mode
        if mask_grid not in ("auto", "same", "affine", "fov"):
            raise ValueError(f"mask_grid must be auto, same, affine or fov, got {mask_grid!r}")
        self.mask_grid = mask_grid

    # -- geometry -------------------------------------------------------------------------------------------------

    def _mask_to_image(self, img, mask, img_shape: tuple[int, ...]) -> np.ndarray | None:
        """Voxel affine from the mask's grid to the image's (``None``: same grid)."""
        nd = len(img_shape)
        m_shape = tuple(_spatial_mask(mask, nd).shape)
        grid = self.mask_grid
        if grid == "auto":
            if m_shape == img_shape:
                grid = "same"
            elif isinstance(mask, MetaTensor):
                grid = "affine"
            else:
                grid = "fov"
        if grid == "same":
            if m_shape != img_shape:
                raise ValueError(f"mask_grid='same' but mask shape {m_shape} != image shape {img_shape}")
            return None
        if grid == "affine":
            if not isinstance(mask, MetaTensor):
                raise ValueError("mask_grid='affine' needs the mask as a MetaTensor with its affine")
            return np.linalg.inv(affine_of(img, nd)) @ affine_of(mask, nd)
        return fov_affine(m_shape, img_shape)

    def compute_box(self, img, mask, extra_margin_mm=None, shift_mm=None) -> Box | None:
        """The box in the image's voxel grid, or ``None`` when the mask holds none of the labels.

        ``extra_margin_mm`` (``(ndim, 2)``, per axis and side) and ``shift_mm`` (per axis) are the jitter.
        """
        img_shape = tuple(int(s) for s in img.shape[1:])
        nd = len(img_shape)
        tight = box_from_mask(_spatial_mask(mask, nd), self.box_labels)
        if tight is None:
            return None
        src_to_dst = self._mask_to_image(img, mask, img_shape)
        if src_to_dst is not None:
            tight = map_box(tight, src_to_dst, img_shape)
        spacing = np.asarray(affine_to_spacing(affine_of(img, nd), r=nd), dtype=np.float64)
        margin_mm = _per_side(self.margin_mm, nd, "margin_mm")
        if extra_margin_mm is not None:
            margin_mm = margin_mm + _per_side(extra_margin_mm, nd, "extra_margin_mm")
        margin_vox = np.ceil(margin_mm / spacing[:, None] - 1e-6)
        min_vox = None
        if self.min_size_mm is not None:
            min_vox = np.ceil(_per_axis(self.min_size_mm, nd, "min_size_mm") / spacing - 1e-6)
        shift_vox = None if shift_mm is None else np.rint(_per_axis(shift_mm, nd, "shift_mm") / spacing)
        return expand_box(tight, img_shape, margin_vox, min_vox, shift_vox)

    def warn_skipped(self) -> None:
        logger.warning("no %s in mask: stage skipped", label_names(self.box_labels))

    # -- forward / inverse ----------------------------------------------------------------------------------------

    def crop(self, img, box: Box | None, mode: str | None = None) -> torch.Tensor:
        """Crop ``box`` (``None``: skipped, the whole volume) from ``img``, resize, record the operation."""
        img_t = convert_to_tensor(img, track_meta=get_track_meta())
        orig_size = tuple(int(s) for s in img_t.shape[1:])
        skipped = box is None
        if skipped:
            box = (tuple(0 for _ in orig_size), orig_size)
        wanted = ensure_tuple_rep(self.spatial_size, len(orig_size))
        out_size = tuple(int(s) for s in fall_back_tuple(wanted, box_size(box)))
        mode = self.mode if mode is None else mode
        if mode == "soft":
            data = soft_labels(img_t[(slice(None),) + box_slices(box)], self.target_labels)
            data = resize_spatial(data, out_size, "trilinear")
        else:
            data = crop_resize(img_t, box, out_size, mode)
        if out_size == box_size(box):
            data = data.clone()  # no resize happened: never alias the input
        if not isinstance(img_t, MetaTensor):
            return data
        extra_info = {
            "box_start": list(box[0]),
            "box_stop": list(box[1]),
            "spatial_size": list(out_size),
            "mode": mode,
            "skipped": skipped,
        }
        meta_info = TraceableTransform.track_transform_meta(
            img_t,
            sp_size=out_size,
            affine=box_affine(box, out_size),
            extra_info=extra_info,
            orig_size=orig_size,
            transform_info=self.get_transform_info(),
            lazy=False,
        )
        out = MetaTensor(data).copy_meta_from(meta_info)
        out.meta[BOX_META_KEY] = np.asarray(box, dtype=np.int64)
        out.meta[SKIPPED_META_KEY] = skipped
        return out

    def __call__(self, img, mask, mode: str | None = None) -> torch.Tensor:
        box = self.compute_box(img, mask)
        if box is None:
            self.warn_skipped()
        return self.crop(img, box, mode)

    def inverse(self, data: torch.Tensor) -> torch.Tensor:
        transform = self.pop_transform(data)
        return self.inverse_transform(data, transform)

    def inverse_transform(self, data: torch.Tensor, transform) -> torch.Tensor:
        info = transform[TraceKeys.EXTRA_INFO]
        orig_size = tuple(int(s) for s in convert_to_numpy(transform[TraceKeys.ORIG_SIZE], wrap_sequence=True))
        box = (
            tuple(int(v) for v in convert_to_numpy(info["box_start"], wrap_sequence=True)),
            tuple(int(v) for v in convert_to_numpy(info["box_stop"], wrap_sequence=True)),
        )
        out_size = tuple(int(v) for v in convert_to_numpy(info["spatial_size"], wrap_sequence=True))
        mode = "trilinear" if info["mode"] == "soft" else info["mode"]
        restored = paste_into(orig_size, box, _plain(data), mode=mode)
        if not isinstance(data, MetaTensor):
            return restored
        back = TraceableTransform.track_transform_meta(
            data, affine=np.linalg.inv(box_affine(box, out_size)), transform_info={TraceKeys.TRACING: False}
        )
        out = MetaTensor(restored).copy_meta_from(back)
        out.meta.pop(BOX_META_KEY, None)
        out.meta.pop(SKIPPED_META_KEY, None)
        return out


class _BoxJitter(RandomizableTransform):
    """Random extra margin (uniform in ``[0, jitter_margin_mm]`` per axis and side) and shift (uniform in
    ``[-jitter_shift_mm, jitter_shift_mm]`` per axis) of the box; drawn with ``self.R`` (``set_random_state``,
    ``monai.utils.set_determinism`` through ``Compose``). With probability ``1 - prob`` no jitter is applied."""

    def _init_jitter(self, jitter_margin_mm, jitter_shift_mm, prob: float) -> None:
        RandomizableTransform.__init__(self, prob)
        self.jitter_margin_mm = jitter_margin_mm
        self.jitter_shift_mm = jitter_shift_mm
        self._extra_margin_mm: np.ndarray | None = None
        self._shift_mm: np.ndarray | None = None

    def randomize(self, ndim: int) -> None:  # type: ignore[override]
        super().randomize(None)
        margin = _per_axis(self.jitter_margin_mm, ndim, "jitter_margin_mm")
        extra = self.R.uniform(0.0, 1.0, (ndim, 2)) * margin[:, None]
        shift = self.R.uniform(-1.0, 1.0, ndim) * _per_axis(self.jitter_shift_mm, ndim, "jitter_shift_mm")
        self._extra_margin_mm, self._shift_mm = (extra, shift) if self._do_transform else (None, None)


class RandCropFromMask(_BoxJitter, CropFromMask):
    """:class:`CropFromMask` with a random jitter of the box's margin and position (training)."""

    @_renamed_keywords
    def __init__(
        self,
        box_labels: Sequence[int] | None = None,
        spatial_size: Sequence[int] | int = 160,
        margin_mm=0.0,
        min_size_mm: Sequence[float] | float | None = None,
        mode: str = "trilinear",
        mask_grid: str = "auto",
        jitter_margin_mm=0.0,
        jitter_shift_mm=0.0,
        prob: float = 1.0,
        target_labels: Sequence[int] | None = None,
    ):
        CropFromMask.__init__(
            self, box_labels=box_labels, spatial_size=spatial_size, margin_mm=margin_mm, min_size_mm=min_size_mm,
            mode=mode, mask_grid=mask_grid, target_labels=target_labels,
        )
        self._init_jitter(jitter_margin_mm, jitter_shift_mm, prob)

    def __call__(self, img, mask, mode: str | None = None, randomize: bool = True) -> torch.Tensor:
        if randomize:
            self.randomize(len(img.shape) - 1)
        box = self.compute_box(img, mask, self._extra_margin_mm, self._shift_mm)
        if box is None:
            self.warn_skipped()
        return self.crop(img, box, mode)


class CropFromMaskd(MapTransform, InvertibleTransform):
    """Dictionary form of :class:`CropFromMask`: one box, read from ``d[mask_key]``, crops all ``keys``.

    The same transform serves training (``mask_key="label"``, usually also one of ``keys``) and inference
    (``mask_key="coarse"``, the coarse prediction on its own 128^3 grid, see ``mask_grid``). The box is computed
    before any key is cropped; the geometry (shape, affine, spacing) is that of the first key present, and all
    ``keys`` must share it. ``mode`` is per key (e.g. ``("trilinear", "nearest")``).

    Besides the per-key meta (see :class:`CropFromMask`), the dictionary gets ``d[box_key]`` (int64 array
    ``[start, stop]`` in image voxels; the whole volume when skipped) and ``d[skipped_key]`` (bool); either key
    can be disabled with ``None``. Skipping never raises and logs ``"no <organs> in mask: stage skipped"``.
    """

    backend = CropFromMask.backend

    @_renamed_keywords
    def __init__(
        self,
        keys: KeysCollection,
        mask_key: str,
        box_labels: Sequence[int] | None = None,
        spatial_size: Sequence[int] | int = 160,
        margin_mm=0.0,
        min_size_mm: Sequence[float] | float | None = None,
        mode: Sequence[str] | str = "trilinear",
        mask_grid: str = "auto",
        box_key: str | None = BOX_META_KEY,
        skipped_key: str | None = SKIPPED_META_KEY,
        allow_missing_keys: bool = False,
        target_labels: Sequence[int] | None = None,
    ):
        MapTransform.__init__(self, keys, allow_missing_keys)
        self.mask_key = mask_key
        self.mode = ensure_tuple_rep(mode, len(self.keys))
        self.box_key, self.skipped_key = box_key, skipped_key
        self.cropper = CropFromMask(
            box_labels=box_labels, spatial_size=spatial_size, margin_mm=margin_mm, min_size_mm=min_size_mm,
            mode=self.mode[0], mask_grid=mask_grid, target_labels=target_labels,
        )

    def _jitter(self, ndim: int):
        return None, None

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        ref_key = self.first_key(d)
        if ref_key == []:
            return d
        ref = d[ref_key]
        box = self.cropper.compute_box(ref, d[self.mask_key], *self._jitter(len(ref.shape) - 1))
        if box is None:
            self.cropper.warn_skipped()
        for key, mode in self.key_iterator(d, self.mode):
            d[key] = self.cropper.crop(d[key], box, mode)
        whole = (tuple(0 for _ in ref.shape[1:]), tuple(int(s) for s in ref.shape[1:]))
        if self.box_key is not None:
            d[self.box_key] = np.asarray(whole if box is None else box, dtype=np.int64)
        if self.skipped_key is not None:
            d[self.skipped_key] = box is None
        return d

    def inverse(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.cropper.inverse(d[key])
        return d


class RandCropFromMaskd(_BoxJitter, CropFromMaskd):
    """:class:`CropFromMaskd` with a random jitter of the box's margin and position (training).

    ``jitter_margin_mm``: extra margin drawn uniformly in ``[0, jitter_margin_mm]`` per axis and side;
    ``jitter_shift_mm``: shift drawn uniformly in ``[-jitter_shift_mm, jitter_shift_mm]`` per axis; both in mm
    (scalar or per axis), converted with the image's spacing. Reproducible with ``set_random_state`` or
    ``monai.utils.set_determinism`` (through ``Compose``).
    """

    @_renamed_keywords
    def __init__(
        self,
        keys: KeysCollection,
        mask_key: str,
        box_labels: Sequence[int] | None = None,
        spatial_size: Sequence[int] | int = 160,
        margin_mm=0.0,
        min_size_mm: Sequence[float] | float | None = None,
        mode: Sequence[str] | str = "trilinear",
        mask_grid: str = "auto",
        jitter_margin_mm=0.0,
        jitter_shift_mm=0.0,
        prob: float = 1.0,
        box_key: str | None = BOX_META_KEY,
        skipped_key: str | None = SKIPPED_META_KEY,
        allow_missing_keys: bool = False,
        target_labels: Sequence[int] | None = None,
    ):
        CropFromMaskd.__init__(
            self, keys, mask_key, box_labels=box_labels, spatial_size=spatial_size, margin_mm=margin_mm,
            min_size_mm=min_size_mm, mode=mode, mask_grid=mask_grid, box_key=box_key, skipped_key=skipped_key,
            allow_missing_keys=allow_missing_keys, target_labels=target_labels,
        )
        self._init_jitter(jitter_margin_mm, jitter_shift_mm, prob)

    def _jitter(self, ndim: int):
        self.randomize(ndim)
        return self._extra_margin_mm, self._shift_mm


class ClearIfSkippedd(MapTransform):
    """Set ``keys`` to background where the stage was skipped (``d[skipped_key]`` from :class:`CropFromMaskd`).

    A skipped stage still runs its network on the whole volume (so batches keep one shape); its output must
    not count.
    """

    def __init__(self, keys: KeysCollection, skipped_key: str = SKIPPED_META_KEY, allow_missing_keys: bool = False):
        super().__init__(keys, allow_missing_keys)
        self.skipped_key = skipped_key

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        if bool(d.get(self.skipped_key, False)):
            for key in self.key_iterator(d):
                d[key] = d[key] * 0
        return d


class ResizeToGridd(MapTransform, InvertibleTransform):
    """Resize whole volumes to a fixed grid, invertibly: :class:`CropFromMaskd` with the box always the whole
    volume, so the coarse stage shares the crops' half-pixel geometry (``"nearest"`` is torch's
    ``nearest-exact``, also when ``Invertd(nearest_interp=True)`` maps a prediction back)."""

    backend = CropFromMask.backend

    def __init__(
        self, keys: KeysCollection, spatial_size: Sequence[int] | int, mode: Sequence[str] | str = "trilinear",
        allow_missing_keys: bool = False,
    ):
        MapTransform.__init__(self, keys, allow_missing_keys)
        self.mode = ensure_tuple_rep(mode, len(self.keys))
        self.resizer = CropFromMask(None, spatial_size, mode=self.mode[0])

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        for key, mode in self.key_iterator(d, self.mode):
            whole = (tuple(0 for _ in d[key].shape[1:]), tuple(int(s) for s in d[key].shape[1:]))
            d[key] = self.resizer.crop(d[key], whole, mode)
        return d

    def inverse(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.resizer.inverse(d[key])
        return d


# ---------------------------------------------------------------------------------------------------------------
# Label remap between FLARE ids and a stage's local ids
# ---------------------------------------------------------------------------------------------------------------


def remap_labels(img, labels: Sequence[int], to_local: bool = True):
    """``to_local``: FLARE id ``labels[i]`` -> ``i + 1``, everything else -> 0; otherwise local ``i + 1`` ->
    ``labels[i]``, everything else -> 0. Keeps dtype, device and (for MetaTensors) meta."""
    labels = tuple(int(v) for v in labels)
    local = tuple(range(1, len(labels) + 1))
    src, dst = (labels, local) if to_local else (local, labels)
    t = _plain(img)
    out = torch.zeros_like(t)
    for s, v in zip(src, dst):
        out.masked_fill_(t == s, v)
    if isinstance(img, MetaTensor):
        return MetaTensor(out).copy_meta_from(img)
    if isinstance(img, np.ndarray):
        return out.numpy()
    return out


class RemapLabels(InvertibleTransform):
    """Map a label map between FLARE ids and a stage's local ids (see :func:`remap_labels`).

    ``labels``: the stage's FLARE ids in local order, e.g. ``GROUPS["digestive"] == (4, 11, 12)``.
    Invertible: ``inverse`` maps the other way (so ``Invertd`` turns a local prediction into FLARE ids); labels
    outside the stage are lost by the forward map. Not MONAI's ``MapLabelValue``: that one keeps the ids it is not
    given (another organ's id would read as a local class) and has no inverse.
    """

    backend = [TransformBackends.TORCH]

    def __init__(self, labels: Sequence[int], to_local: bool = True):
        self.labels = tuple(int(v) for v in labels)
        self.to_local = bool(to_local)

    def __call__(self, img):
        img_t = convert_to_tensor(img, track_meta=get_track_meta())
        out = remap_labels(img_t, self.labels, self.to_local)
        if isinstance(out, MetaTensor):
            self.push_transform(out, extra_info={"to_local": self.to_local})
        return out

    def inverse(self, data):
        transform = self.pop_transform(data)
        to_local = bool(transform[TraceKeys.EXTRA_INFO]["to_local"])
        return remap_labels(data, self.labels, not to_local)


class RemapLabelsd(MapTransform, InvertibleTransform):
    backend = RemapLabels.backend

    def __init__(
        self, keys: KeysCollection, labels: Sequence[int], to_local: bool = True, allow_missing_keys: bool = False
    ):
        MapTransform.__init__(self, keys, allow_missing_keys)
        self.remap = RemapLabels(labels, to_local)

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.remap(d[key])
        return d

    def inverse(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.remap.inverse(d[key])
        return d


# ---------------------------------------------------------------------------------------------------------------
# Largest connected component per label (cc3d)
# ---------------------------------------------------------------------------------------------------------------


def keep_largest_component(
    label_map: np.ndarray, labels: Sequence[int] | None = None, connectivity: int = 26
) -> np.ndarray:
    """For each label (every nonzero label for ``None``), keep only its largest connected component.

    ``label_map`` is a 2D/3D integer numpy array; returns a new array of the same dtype. One multi-label cc3d pass
    (components never join different labels) inside the bounding box of the foreground, then one lookup.
    Ties keep the component met first in memory order. Not MONAI's ``KeepLargestConnectedComponent``: that one labels
    each organ in a pass of its own (and needs scikit-image on the CPU); the result is the same (tested).
    """
    arr = np.asarray(label_map)
    if arr.flags.f_contiguous and not arr.flags.c_contiguous:
        # Fortran order (as nibabel loads): work on the C-ordered transposed view, components do not care
        return keep_largest_component(arr.T, labels, connectivity).T
    out = arr.copy()
    tight = _profile_box(arr != 0)
    if tight is None:
        return out
    bbox = box_slices(tight)
    sub = arr[bbox]
    work = sub
    if work.dtype == bool:
        work = work.view(np.uint8)
    elif work.dtype.kind == "f":
        work = np.rint(work).astype(np.int32)
    cc, n = cc3d.connected_components(work, connectivity=connectivity, return_N=True)
    if n <= 1 and labels is None:
        return out
    # flatten both in cc's memory order (cc3d may answer in Fortran order): no copy of the component map
    order = "F" if cc.flags.f_contiguous and not cc.flags.c_contiguous else "C"
    flat = cc.ravel(order=order)
    if flat.dtype == np.uint32:
        flat_t = torch.from_numpy(flat.view(np.int32))  # n < 2**31; torch's bincount is much faster than numpy's
    elif flat.dtype == np.uint64:
        flat_t = torch.from_numpy(flat.astype(np.int64))
    else:
        flat_t = torch.from_numpy(flat.astype(np.int32))
    sizes = torch.bincount(flat_t, minlength=n + 1).numpy()
    comp_label = np.zeros(n + 1, dtype=np.int64)
    comp_label[flat] = work.ravel(order=order)
    wanted = np.unique(comp_label[1:]) if labels is None else np.asarray([int(v) for v in labels])
    drop = np.zeros(n + 1, dtype=bool)
    ids_all = np.arange(n + 1)
    for label in wanted:
        ids = ids_all[1:][comp_label[1:] == label]
        if ids.size > 1:
            drop[ids] = True
            drop[ids[np.argmax(sizes[ids])]] = False
    if not drop.any():
        return out
    out[bbox][drop[cc]] = 0
    return out


def dropped_components(before: np.ndarray, after: np.ndarray, connectivity: int = 26) -> dict[int, dict[str, int]]:
    """What :func:`keep_largest_component` removed from ``before`` to give ``after``, per label:
    ``{label: {"components": k, "voxels": n}}`` for each label that lost voxels.

    The removed components of one label were apart in ``before`` (else they would have been one), so the
    connected components of the removed voxels are exactly the dropped components.
    """
    before, after = np.asarray(before), np.asarray(after)
    removed = np.where(before != after, before, 0)
    tight = _profile_box(removed != 0)
    if tight is None:
        return {}
    sub = np.ascontiguousarray(removed[box_slices(tight)])
    cc, n = cc3d.connected_components(sub, connectivity=connectivity, return_N=True)
    label_of = np.zeros(n + 1, dtype=np.int64)
    label_of[cc.ravel()] = sub.ravel()
    components = np.bincount(label_of[1:], minlength=int(sub.max()) + 1)
    voxels = np.bincount(sub.ravel().astype(np.int64), minlength=int(sub.max()) + 1)
    return {
        int(label): {"components": int(components[label]), "voxels": int(voxels[label])}
        for label in np.flatnonzero(voxels[1:]) + 1
    }


class KeepLargestComponent(Transform):
    """Keep the largest connected component of each label (26-connectivity by default, cc3d).

    Input: a label map, channel-first with one channel or plain spatial; numpy, tensor or MetaTensor, any device
    (processed on the CPU). Output: same type, shape, dtype, device and meta. ``labels=None``: every nonzero
    label; otherwise only those labels are cleaned and the others are kept as they are.
    """

    backend = [TransformBackends.NUMPY, TransformBackends.TORCH]

    def __init__(self, labels: Sequence[int] | None = None, connectivity: int = 26):
        self.labels = None if labels is None else tuple(int(v) for v in labels)
        self.connectivity = connectivity

    def __call__(self, img):
        t = _plain(img)
        channel = t.ndim == 4  # channel-first 3D; a 3D input is a plain volume
        if channel and t.shape[0] != 1:
            raise ValueError(f"expected a one-channel label map, got shape {tuple(t.shape)}")
        arr = t.detach().cpu().numpy()
        res = keep_largest_component(arr[0] if channel else arr, self.labels, self.connectivity)
        if channel:
            res = res[None]
        if isinstance(img, np.ndarray):
            return res
        out = torch.from_numpy(res).to(t.device)
        if isinstance(img, MetaTensor):
            return MetaTensor(out).copy_meta_from(img)
        return out


class KeepLargestComponentd(MapTransform):
    backend = KeepLargestComponent.backend

    def __init__(
        self,
        keys: KeysCollection,
        labels: Sequence[int] | None = None,
        connectivity: int = 26,
        allow_missing_keys: bool = False,
    ):
        super().__init__(keys, allow_missing_keys)
        self.keep = KeepLargestComponent(labels, connectivity)

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.keep(d[key])
        return d
