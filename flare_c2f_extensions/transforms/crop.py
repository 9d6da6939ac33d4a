"""Transforms of the cascade, MONAI style: an array version and a dictionary version of each."""

from __future__ import annotations

import functools
import logging
import warnings
from collections.abc import Hashable, Mapping, Sequence

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.data.meta_obj import get_track_meta
from monai.data.utils import affine_to_spacing
from monai.transforms import InvertibleTransform, MapTransform, RandomizableTransform, ScaleIntensityRanged
from monai.transforms.inverse import TraceableTransform
from monai.utils import TraceKeys, TransformBackends, convert_to_numpy, convert_to_tensor, ensure_tuple_rep
from monai.utils.misc import fall_back_tuple

from flare_c2f_extensions.transforms.boxes import (
    BOX_META_KEY,
    SKIPPED_META_KEY,
    Box,
    _per_axis,
    _plain,
    _spatial_mask,
    affine_of,
    box_affine,
    box_from_mask,
    box_size,
    box_slices,
    expand_box_mm,
    fov_affine,
    label_names,
    map_box,
)
from flare_c2f_extensions.transforms.resizing import crop_resize, paste_into, resize_spatial, soft_labels

__all__ = [
    "RENAMED_KEYWORDS", "ClipIntensityd", "CropFromMask", "CropFromMaskd", "RandCropFromMask", "RandCropFromMaskd",
    "ResizeToGridd",
]

logger = logging.getLogger(__name__)


class ClipIntensityd(ScaleIntensityRanged):
    """0.1.0 configs' clip to ``[minv, maxv]``: MONAI's ``ScaleIntensityRanged`` with an identity range and
    ``clip=True`` (what the bundles now use; exact for [0, 1]). Kept for one release for trained bundles' configs."""

    def __init__(self, keys: KeysCollection, minv: float = 0.0, maxv: float = 1.0, allow_missing_keys: bool = False):
        super().__init__(keys, minv, maxv, minv, maxv, clip=True, allow_missing_keys=allow_missing_keys)


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
        return expand_box_mm(tight, img_shape, spacing, self.margin_mm, self.min_size_mm, shift_mm, extra_margin_mm)

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
    Without ``d[mask_key]`` (a stage bundle served by MONAI Label or MONAI Deploy gets the image alone) the whole
    volume is the box: the stage runs from the image alone, on the whole field of view.
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
        whole = (tuple(0 for _ in ref.shape[1:]), tuple(int(s) for s in ref.shape[1:]))
        if self.mask_key in d:
            box = self.cropper.compute_box(ref, d[self.mask_key], *self._jitter(len(ref.shape) - 1))
            if box is None:
                self.cropper.warn_skipped()
        else:  # the image alone (a stage bundle served by MONAI Label or Deploy): its organs looked for everywhere
            logger.info("no %s mask given: the whole volume is the box", self.mask_key)
            box = whole
        for key, mode in self.key_iterator(d, self.mode):
            d[key] = self.cropper.crop(d[key], box, mode)
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
