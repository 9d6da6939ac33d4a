"""Training samples in one resampling, on the training device.

Today's recipe (the stage bundles' ``train#crop`` and ``train#augmentation_transforms``) crops the box around the
guide from the full-resolution volume, resizes it to the stage's grid, then (coarse stage) applies a random affine
and (every stage, with ``elastic_prob``) an elastic deformation, each step resampling the output of the previous one
in CPU workers. Here the same random parameters, drawn from the same distributions, are composed into one map from
the output grid to the source volume, applied once:

- the image with ``torch.nn.functional.grid_sample`` (trilinear);
- the label with the same coordinates: ``"nearest"`` (torch's ``nearest-exact`` convention, as the crops use) or
  ``"soft"`` (trilinear weights of the one-hot classes, as :class:`~.transforms.CropFromMask` makes training
  targets), gathered from the uint8 label map, never one-hot at full resolution.

Each step's ``padding_mode="zeros"`` (a deformation that reaches past its input's grid reads zeros) is kept: the
image is weighted by the fraction a linear interpolation would take from inside, the label zeroed where the nearest
voxel is outside, so near the crop's border the samples look as today's do.

The elastic field is today's in distribution (uniform noise smoothed by a Gaussian of ``sigma`` in
``sigma_range``, times ``magnitude``), drawn on a grid ``elastic_grid_factor`` times coarser with the kernel scaled
alike and linearly upsampled, its variance corrected so that each voxel's displacement has today's spread; the
correlation length is today's. Every random number of a sample comes from ``(seed, epoch, position in the epoch)``,
so a run resumed at an epoch draws what the uninterrupted run drew (on the same device type).

:class:`DeviceTrainingLoader` holds the decoded training cases on the training device (when they fit, else in pinned
CPU memory, slicing each sample's box over to the device) and yields batches ready for the network. It reads the
recipe from the bundle's own transform objects (:func:`recipe_from_transforms`), so the configs keep describing the
augmentation and their overrides (``elastic_prob``, margins, grid) apply to both paths.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace

import numpy as np
import torch
import torch.nn.functional as F
from monai.data.utils import affine_to_spacing

from flare_c2f_extensions.transforms.boxes import (
    Box,
    _per_axis,
    _spatial_mask,
    affine_of,
    box_from_mask,
    expand_box_mm,
    label_names,
)

__all__ = [
    "AugmentationRecipe", "DeviceTrainingLoader", "FollowEpochs", "SampleDraw", "draw_sample", "elastic_field",
    "recipe_from_transforms", "sample_case", "stage_labels",
]

logger = logging.getLogger(__name__)

GAMMA_EPSILON = 1e-7  # MONAI's AdjustContrast


@dataclass(frozen=True)
class AugmentationRecipe:
    """What a stage's training transforms do, as numbers (see :func:`recipe_from_transforms`).

    Crop: ``crop`` (``False``: the whole volume, the coarse stage), ``box_labels`` (FLARE ids of the guide box;
    ``None`` for any foreground), ``margin_mm``, ``min_size_mm``, ``jitter_margin_mm`` (extra margin uniform in
    ``[0, jitter_margin_mm]`` per axis and side), ``jitter_shift_mm`` (uniform in ``[-s, s]`` per axis),
    ``jitter_prob``. Label: ``label_mode`` ``"soft"`` (channels: background then ``target_labels``) or
    ``"nearest"`` (FLARE ids as floats, one channel). Affine (MONAI ``RandAffine``): ``affine_prob``,
    ``rotate_range``/``shear_range``/``translate_range`` (voxels)/``scale_range`` as MONAI reads them. Elastic
    (``Rand3DElastic``): ``elastic_prob``, ``sigma_range``, ``magnitude_range`` (output voxels). ``intensity``:
    ``(name, prob, parameters)`` in order: ``"scale"`` (``factors``), ``"gamma"`` (``gamma`` range) and ``"range"``
    (``ScaleIntensityRange``'s ``a_min, a_max, b_min, b_max, clip``).
    """

    spatial_size: tuple[int, ...]
    crop: bool = True
    box_labels: tuple[int, ...] | None = None
    target_labels: tuple[int, ...] | None = None
    label_mode: str = "soft"
    margin_mm: object = 0.0
    min_size_mm: object = None
    jitter_margin_mm: object = 0.0
    jitter_shift_mm: object = 0.0
    jitter_prob: float = 1.0
    affine_prob: float = 0.0
    rotate_range: tuple = ()
    shear_range: tuple = ()
    translate_range: tuple = ()
    scale_range: tuple = ()
    elastic_prob: float = 0.0
    sigma_range: tuple[float, float] = (3.0, 5.0)
    magnitude_range: tuple[float, float] = (100.0, 200.0)
    intensity: tuple = field(default_factory=tuple)

    @property
    def num_label_channels(self) -> int:
        return 1 + len(self.target_labels) if self.label_mode == "soft" else 1


def _ranges(values) -> tuple:
    return tuple(v for v in (values or ()) if v is not None)


def recipe_from_transforms(spatial_size, crop=None, augmentations=(), label_key: str = "label") -> AugmentationRecipe:
    """The recipe of a stage bundle's training transforms: its ``RandCropFromMaskd`` (``None``: the coarse stage's
    whole-volume resize) and its ``augmentation_transforms`` (``RandAffined``, ``Rand3DElasticd``,
    ``RandScaleIntensityd``, ``RandAdjustContrastd``, ``ScaleIntensityRanged``); any other transform is refused,
    rather than silently left out."""
    from monai.transforms import (
        Rand3DElasticd,
        RandAdjustContrastd,
        RandAffined,
        RandScaleIntensityd,
        ScaleIntensityRanged,
    )

    from flare_c2f_extensions.transforms.crop import RandCropFromMaskd

    size = tuple(int(s) for s in np.broadcast_to(np.asarray(spatial_size), (3,)))
    settings: dict = {"spatial_size": size}
    if crop is not None:
        if not isinstance(crop, RandCropFromMaskd):
            raise ValueError(f"the device sampler crops like RandCropFromMaskd, not {type(crop).__name__}")
        cropper = crop.cropper
        mode = dict(zip(crop.keys, crop.mode)).get(label_key, "soft")
        settings.update(
            crop=True, box_labels=cropper.box_labels, target_labels=cropper.target_labels,
            label_mode="soft" if mode == "soft" else "nearest", margin_mm=cropper.margin_mm,
            min_size_mm=cropper.min_size_mm, jitter_margin_mm=crop.jitter_margin_mm,
            jitter_shift_mm=crop.jitter_shift_mm, jitter_prob=float(crop.prob),
        )
        if tuple(int(s) for s in np.broadcast_to(np.asarray(cropper.spatial_size), (3,))) != size:
            raise ValueError(f"the crop's spatial_size {cropper.spatial_size} is not the stage's {size}")
    else:
        settings.update(crop=False, label_mode="nearest")
    intensity = []
    for t in augmentations:
        if isinstance(t, RandAffined):
            grid = t.rand_affine.rand_affine_grid
            settings.update(
                affine_prob=float(t.prob), rotate_range=_ranges(grid.rotate_range),
                shear_range=_ranges(grid.shear_range), translate_range=_ranges(grid.translate_range),
                scale_range=_ranges(grid.scale_range),
            )
        elif isinstance(t, Rand3DElasticd):
            elastic = t.rand_3d_elastic
            if any(_ranges(r) for r in (elastic.rand_affine_grid.rotate_range, elastic.rand_affine_grid.shear_range,
                                        elastic.rand_affine_grid.translate_range,
                                        elastic.rand_affine_grid.scale_range)):
                raise ValueError("the device sampler takes Rand3DElasticd without its own affine ranges")
            settings.update(
                elastic_prob=float(t.prob), sigma_range=tuple(float(s) for s in elastic.sigma_range),
                magnitude_range=tuple(float(m) for m in elastic.magnitude_range),
            )
        elif isinstance(t, RandScaleIntensityd):
            intensity.append(("scale", float(t.prob), tuple(float(f) for f in t.scaler.factors)))
        elif isinstance(t, RandAdjustContrastd):
            adjuster = t.adjuster
            if adjuster.invert_image or adjuster.retain_stats:
                raise ValueError("the device sampler takes RandAdjustContrastd without invert_image/retain_stats")
            intensity.append(("gamma", float(t.prob), tuple(float(g) for g in adjuster.gamma)))
        elif isinstance(t, ScaleIntensityRanged):
            s = t.scaler
            intensity.append(("range", 1.0, (s.a_min, s.a_max, s.b_min, s.b_max, bool(s.clip))))
        else:
            raise ValueError(f"the device sampler does not know {type(t).__name__}: train with the MONAI path")
    settings["intensity"] = tuple(intensity)
    return AugmentationRecipe(**settings)


# -- one sample's random parameters ------------------------------------------------------------------------------


@dataclass(frozen=True)
class SampleDraw:
    """Everything random about one sample: its box (source voxels), the affine (``4x4`` on centred output voxel
    coordinates, MONAI's convention; ``None``: none), the elastic field's ``(sigma, magnitude, noise seed)``
    (``None``: none) and the intensity steps' values (``None`` where a step's coin said no)."""

    box: Box
    affine: np.ndarray | None
    elastic: tuple[float, float, int] | None
    intensity: tuple


def sample_rng(seed: int, epoch: int, position: int) -> np.random.Generator:
    """The random stream of the sample at ``position`` of ``epoch``: independent of every other sample's."""
    return np.random.default_rng(np.random.SeedSequence([int(seed), int(epoch), int(position)]))


def _uniform_params(rng: np.random.Generator, ranges, add: float = 0.0) -> list[float]:
    """MONAI's ``RandAffineGrid`` reading of a range: a pair is ``[min, max)``, a number ``r`` is ``[-r, r)``."""
    out = []
    for r in ranges:
        low, high = (r[0], r[1]) if isinstance(r, (tuple, list)) else (-r, r)
        out.append(float(rng.uniform(low, high)) + add)
    return out


def jittered_box(recipe: AugmentationRecipe, tight: Box | None, shape, spacing, extra_mm=None, shift_mm=None) -> Box:
    """:meth:`CropFromMask.compute_box` from a tight box already found: the margin (plus ``extra_mm`` per axis and
    side), the minimum size, the shift, all in mm through ``spacing``; the whole volume when there is no box."""
    shape = tuple(int(s) for s in shape)
    if not recipe.crop or tight is None:
        return tuple(0 for _ in shape), shape
    return expand_box_mm(tight, shape, spacing, recipe.margin_mm, recipe.min_size_mm, shift_mm, extra_mm)


def draw_sample(recipe: AugmentationRecipe, tight: Box | None, shape, spacing, rng: np.random.Generator) -> SampleDraw:
    """One sample's parameters, each from today's distribution (same coins, same ranges)."""
    from monai.transforms.utils import create_rotate, create_scale, create_shear, create_translate

    nd = len(shape)
    extra = shift = None
    if recipe.crop:
        jitter = rng.uniform() < recipe.jitter_prob
        margin = _per_axis(recipe.jitter_margin_mm, nd, "jitter_margin_mm")
        extra_draw = rng.uniform(0.0, 1.0, (nd, 2)) * margin[:, None]
        shift_draw = rng.uniform(-1.0, 1.0, nd) * _per_axis(recipe.jitter_shift_mm, nd, "jitter_shift_mm")
        if jitter:
            extra, shift = extra_draw, shift_draw
    box = jittered_box(recipe, tight, shape, np.asarray(spacing, dtype=np.float64), extra, shift)
    affine = None
    if recipe.affine_prob > 0 and rng.uniform() < recipe.affine_prob:
        affine = np.eye(nd + 1)
        rotate = _uniform_params(rng, recipe.rotate_range)
        shear = _uniform_params(rng, recipe.shear_range)
        translate = _uniform_params(rng, recipe.translate_range)
        scale = _uniform_params(rng, recipe.scale_range, 1.0)
        if rotate:
            affine = affine @ np.asarray(create_rotate(nd, rotate))
        if shear:
            affine = affine @ np.asarray(create_shear(nd, shear))
        if translate:
            affine = affine @ np.asarray(create_translate(nd, translate))
        if scale:
            affine = affine @ np.asarray(create_scale(nd, scale))
    elastic = None
    if recipe.elastic_prob > 0 and rng.uniform() < recipe.elastic_prob:
        sigma = float(rng.uniform(*recipe.sigma_range))
        magnitude = float(rng.uniform(*recipe.magnitude_range))
        elastic = (sigma, magnitude, int(rng.integers(2**62)))
    intensity = []
    for name, prob, params in recipe.intensity:
        if name == "range" or rng.uniform() >= prob:
            intensity.append(None)
        else:
            intensity.append(float(rng.uniform(params[0], params[1])))
    return SampleDraw(box, affine, elastic, tuple(intensity))


# -- the elastic field ----------------------------------------------------------------------------------------


def _kernel(sigma: float) -> torch.Tensor:
    from monai.networks.layers.convutils import gaussian_1d

    return gaussian_1d(torch.tensor(float(sigma)), truncated=3.0, approx="erf").float()


def _smooth(x: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """Separable convolution of ``(1, C, *spatial)`` with ``kernel`` along each axis, zero padding (MONAI's
    ``GaussianFilter``)."""
    radius = (kernel.numel() - 1) // 2
    channels = x.shape[1]
    for axis in range(3):
        shape = [1, 1, 1]
        shape[axis] = kernel.numel()
        weight = kernel.to(x.device).reshape(1, 1, *shape).repeat(channels, 1, 1, 1, 1)
        padding = [0, 0, 0]
        padding[axis] = radius
        x = F.conv3d(x, weight, padding=tuple(padding), groups=channels)
    return x


def _interpolated_variance(coarse: int, fine: int, kernel: torch.Tensor) -> float:
    """Mean variance factor of a linear upsampling ``coarse -> fine`` (half-pixel) of a field whose neighbouring
    nodes correlate as ``kernel``'s autocorrelation at lag 1 says."""
    if coarse == fine:
        return 1.0
    k = kernel.double()
    rho = float((k[1:] * k[:-1]).sum() / (k * k).sum())
    src = np.clip((np.arange(fine) + 0.5) * coarse / fine - 0.5, 0, coarse - 1)
    t = src - np.floor(src)
    return float(np.mean((1 - t) ** 2 + t**2 + 2 * t * (1 - t) * rho))


def elastic_field(size: Sequence[int], sigma: float, magnitude: float, seed: int, device=None,
                  grid_factor: int = 2) -> torch.Tensor:
    """The displacement ``(3, *size)`` in output voxels of MONAI's ``Rand3DElastic`` (uniform(-1, 1) noise smoothed
    by a Gaussian of ``sigma`` voxels truncated at 3 sigma, times ``magnitude``), drawn ``grid_factor`` times
    coarser (``1``: exactly today's process) and linearly upsampled, scaled to today's per-voxel variance."""
    size = tuple(int(s) for s in size)
    device = torch.device(device or "cpu")
    factor = max(1, int(grid_factor))
    coarse = tuple(max(1, math.ceil(s / factor)) for s in size)
    generator = torch.Generator(device=device).manual_seed(int(seed) % (2**63))
    noise = torch.rand((1, 3, *coarse), generator=generator, device=device).mul_(2).sub_(1)
    fine_kernel = _kernel(sigma)
    coarse_kernel = _kernel(sigma / factor) if factor > 1 else fine_kernel
    field = _smooth(noise, coarse_kernel)
    gain = float(magnitude)
    if factor > 1:
        ratio = 1.0
        for c, s in zip(coarse, size):
            wanted = float((fine_kernel.double() ** 2).sum())
            got = float((coarse_kernel.double() ** 2).sum()) * _interpolated_variance(c, s, coarse_kernel)
            ratio *= wanted / got
        gain *= math.sqrt(ratio)
        field = F.interpolate(field, size=size, mode="trilinear", align_corners=False)
    return field[0].mul_(gain)


# -- one sample -------------------------------------------------------------------------------------------------


def _crop_axes(recipe: AugmentationRecipe, box: Box, device) -> list[torch.Tensor]:
    """Per axis, the source voxel coordinate of each crop-grid voxel: the crop's resize (half-pixel geometry,
    float32 as torch computes it, clamped to the box)."""
    out = []
    for n, a, b in zip(recipe.spatial_size, *box):
        scale = np.float32(b - a) / np.float32(n)
        s = (torch.arange(n, dtype=torch.float32, device=device) + 0.5) * float(scale) - 0.5
        out.append(torch.clamp(s, 0, b - a - 1) + a)
    return out


def _view(t: torch.Tensor, axis: int, nd: int = 3) -> torch.Tensor:
    return t.reshape([-1 if i == axis else 1 for i in range(nd)])


def _soft_crop(local: torch.Tensor, axes: list[torch.Tensor], channels: int) -> torch.Tensor:
    """The crop's soft target (trilinear weights of the one-hot channels of ``local``, uint8 channel ids) on the
    crop grid, separably: the 8 neighbours by index_select, one-hot where they agree (most voxels), weighted sums
    only at boundaries. Equals one-hot-then-resize (``CropFromMask``'s ``"soft"``) to float rounding."""
    size = tuple(a.numel() for a in axes)
    low, high, frac = [], [], []
    for s, n in zip(axes, local.shape):
        lo = torch.floor(s)
        frac.append(s - lo)
        lo = lo.to(torch.int64)
        low.append(lo)
        high.append(torch.clamp(lo + 1, max=n - 1))
    first_axis = [local.index_select(0, low[0]), local.index_select(0, high[0])]
    second = [p.index_select(1, i) for p in first_axis for i in (low[1], high[1])]
    corners = [p.index_select(2, i).reshape(-1) for p in second for i in (low[2], high[2])]
    first = corners[0]
    same = corners[1] == first
    for c in corners[2:]:
        same &= c == first
    out = torch.zeros((channels, first.numel()), dtype=torch.float32, device=local.device)
    out.scatter_(0, first[None].long(), 1.0)
    edge = (~same).nonzero().squeeze(1)
    if edge.numel():
        out[:, edge] = 0
        index = torch.unravel_index(edge, size)
        f = [x[i] for x, i in zip(frac, index)]
        k = 0
        for dx in (0, 1):
            wx = f[0] if dx else 1 - f[0]
            for dy in (0, 1):
                wxy = wx * (f[1] if dy else 1 - f[1])
                for dz in (0, 1):
                    out.index_put_((corners[k][edge].long(), edge), wxy * (f[2] if dz else 1 - f[2]), accumulate=True)
                    k += 1
    return out.reshape(channels, *size)


def _nearest_crop(label: torch.Tensor, axes: list[torch.Tensor]) -> torch.Tensor:
    """The crop's nearest resize (torch's ``nearest-exact``: ``floor(source + 0.5)``) as floats ``(1, *grid)``."""
    index = [torch.clamp(torch.floor(s + 0.5), 0, n - 1).to(torch.int64) for s, n in zip(axes, label.shape)]
    return label.index_select(0, index[0]).index_select(1, index[1]).index_select(2, index[2])[None].float()


def _outside_slabs(coord: torch.Tensor, axis: int, low: float, high: float) -> list[tuple[int, int]]:
    """The ranges of slices along ``axis`` where ``coord`` leaves ``[low, high]`` somewhere (one range from each
    end, covering every such slice)."""
    others = tuple(a for a in range(coord.ndim) if a != axis)
    flagged = ((coord.amin(dim=others) < low) | (coord.amax(dim=others) > high)).nonzero().flatten().tolist()
    n = coord.shape[axis]
    lower = [i for i in flagged if i < n // 2]
    upper = [i for i in flagged if i >= n // 2]
    return ([(0, lower[-1] + 1)] if lower else []) + ([(upper[0], n)] if upper else [])


def _zero_padding(coords: list[torch.Tensor], size, image: torch.Tensor, label: torch.Tensor | None) -> None:
    """What a resampling with ``padding_mode="zeros"`` of the grid ``size`` at ``coords`` does at its border, in
    place: ``image`` times the share a linear interpolation takes from inside, ``label`` zero where the nearest
    voxel is outside. Only slices that reach outside are computed."""
    for axis, (c, n) in enumerate(zip(coords, size)):
        for a, b in _outside_slabs(c, axis, 0.0, n - 1):
            part = c.narrow(axis, a, b - a)
            inside = torch.clamp(1 - torch.clamp(torch.maximum(-part, part - (n - 1)), min=0), min=0)
            image.narrow(axis + 1, a, b - a).mul_(inside)
            if label is not None:
                nearest = torch.floor(part + 0.5)
                label.narrow(axis + 1, a, b - a).mul_((nearest >= 0) & (nearest <= n - 1))


def deformed_grid(recipe: AugmentationRecipe, draw: SampleDraw, device=None, grid_factor: int = 2):
    """Where each output voxel reads the crop grid: ``(q, r)``, the elastic step's input coordinates (``None``
    without elastic) and the affine step's (``None`` without affine), full-size tensors per axis; ``(None, None)``
    when the sample is not deformed."""
    device = torch.device(device or "cpu")
    size = recipe.spatial_size
    nd = len(size)
    if draw.affine is None and draw.elastic is None:
        return None, None
    axes = [_view(torch.arange(n, dtype=torch.float32, device=device), k) for k, n in enumerate(size)]
    q = None
    if draw.elastic is not None:
        sigma, magnitude, seed = draw.elastic
        field = elastic_field(size, sigma, magnitude, seed, device, grid_factor)
        q = [field[k].add_(axes[k]) for k in range(nd)]
    r = None
    if draw.affine is not None:  # r = M (q - c) + c, centred on the grid's middle (MONAI's create_grid)
        m = np.asarray(draw.affine, dtype=np.float64)
        centred = [(q[j] if q is not None else axes[j]) - (size[j] - 1) / 2 for j in range(nd)]
        r = []
        for i in range(nd):
            total = None
            for j in range(nd):
                if m[i, j] != 0:
                    term = centred[j] * float(m[i, j])
                    total = term if total is None else total + term
            total = total + float(m[i, nd] + (size[i] - 1) / 2)
            r.append(total.expand(size) if tuple(total.shape) != tuple(size) else total)
    return q, r


def _image_at(image: torch.Tensor, coords: list[torch.Tensor], axes_to_source, box: Box) -> torch.Tensor:
    """Trilinear samples of ``image`` ``(1, *spatial)`` at crop-grid coordinates ``coords``, mapped through the crop's
    resize to the source (clamped to the box, as the resize reads it): one ``grid_sample``."""
    shape = image.shape[1:]
    grid = torch.empty((*coords[0].shape, 3), dtype=torch.float32, device=image.device)
    for axis, (c, n) in enumerate(zip(coords, shape)):
        scale, offset = axes_to_source[axis]
        a, b = box[0][axis], box[1][axis] - 1
        g = grid[..., 2 - axis]  # grid_sample's x is the last axis
        if n > 1:
            k = 2.0 / (n - 1)
            g.copy_(torch.clamp(c * (scale * k) + (offset * k - 1), a * k - 1, b * k - 1))
        else:
            g.zero_()
    return F.grid_sample(image[None], grid[None], mode="bilinear", padding_mode="border", align_corners=True)[0]


def _gather(crop: torch.Tensor, coords: list[torch.Tensor]) -> torch.Tensor:
    """``crop`` ``(C, *grid)`` read at the nearest voxel of ``coords`` (clamped; the zero padding is applied apart)."""
    size = crop.shape[1:]
    index = None
    for axis, (c, n) in enumerate(zip(coords, size)):
        i = torch.clamp(torch.floor(c + 0.5), 0, n - 1).to(torch.int64)
        stride = int(np.prod(size[axis + 1:]))
        i = i * stride if stride != 1 else i
        index = i if index is None else index + i
    flat = crop.reshape(crop.shape[0], -1)
    return flat.index_select(1, index.reshape(-1)).reshape(crop.shape[0], *coords[0].shape)


def stage_labels(label: torch.Tensor, recipe: AugmentationRecipe) -> torch.Tensor:
    """The label map as the sampler reads it: for soft targets the channel of each voxel (0 background, ``i + 1``
    for ``target_labels[i]``, uint8), computed once per case; FLARE ids for nearest sampling."""
    if recipe.label_mode != "soft":
        return label
    local = torch.zeros_like(label)
    for channel, value in enumerate(recipe.target_labels, start=1):
        local[label == int(value)] = channel
    return local


def apply_intensity(image: torch.Tensor, recipe: AugmentationRecipe, values: Sequence) -> torch.Tensor:
    """Today's intensity steps, in order, on one sample's image (in place where possible)."""
    for (name, _prob, params), value in zip(recipe.intensity, values):
        if name == "range":
            a_min, a_max, b_min, b_max, clip = params
            if (a_min, a_max, b_min, b_max) != (0.0, 1.0, 0.0, 1.0):
                image = (image - a_min) / (a_max - a_min) * (b_max - b_min) + b_min
            if clip:
                image = image.clamp_(b_min, b_max)
        elif value is None:
            continue
        elif name == "scale":
            image = image.mul_(1 + value)
        elif name == "gamma":
            low = image.min()
            span = image.max() - low
            image = ((image - low) / float(span + GAMMA_EPSILON)).pow_(value).mul_(span).add_(low)
    return image


def sample_case(image: torch.Tensor, label: torch.Tensor, recipe: AugmentationRecipe, draw: SampleDraw,
                offset: Sequence[int] | None = None, grid_factor: int = 2, intensity: bool = True):
    """One training sample of a case: ``image`` ``(1, *spatial)`` float32 and ``label`` (spatial uint8,
    :func:`stage_labels`) on the device the sample is made on; ``offset``: where their voxel 0 lies in the volume
    the draw's box refers to (they may be a slice of it). Returns ``(image (1, *grid), label (C, *grid))``.

    The image is resampled once from the source: without deformation the crop's resize itself (exactly today's
    crop), with one a ``grid_sample`` at the composed coordinates (crop, resize, affine, elastic). The label is the
    crop's target (soft or nearest, exactly today's) moved by the deformation with nearest, as today's
    deformations move it, zero where they reach outside."""
    size = recipe.spatial_size
    box = draw.box
    if offset is not None and any(offset):
        box = tuple(tuple(int(v) - int(o) for v, o in zip(corner, offset)) for corner in box)
    axes = _crop_axes(recipe, box, image.device)
    if recipe.label_mode == "soft":
        crop_label = _soft_crop(label, axes, recipe.num_label_channels)
    else:
        crop_label = _nearest_crop(label, axes)
    q, r = deformed_grid(recipe, draw, image.device, grid_factor)
    if q is None and r is None:
        from flare_c2f_extensions.transforms.resizing import crop_resize

        out_image = crop_resize(image, box, size, "trilinear")
        out_label = crop_label
    else:
        final = r if r is not None else q
        to_source = []
        for n, a, b in zip(size, *box):
            scale = float(np.float32(b - a) / np.float32(n))
            to_source.append((scale, a + 0.5 * scale - 0.5))
        out_image = _image_at(image, final, to_source, box)
        out_label = _gather(crop_label, final)
        if q is not None:
            _zero_padding(q, size, out_image, out_label)
        if r is not None:
            _zero_padding(r, size, out_image, out_label)
    if out_image.data_ptr() == image.data_ptr():
        out_image = out_image.clone()
    if intensity:
        out_image = apply_intensity(out_image, recipe, draw.intensity)
    return out_image, out_label


# -- the training set on the device ----------------------------------------------------------------------------


@dataclass
class _Case:
    image: torch.Tensor  # (1, *spatial) float32
    label: torch.Tensor  # spatial uint8, see stage_labels
    tight: Box | None
    spacing: np.ndarray

    @property
    def nbytes(self) -> int:
        return self.image.numel() * self.image.element_size() + self.label.numel()


def _as_uint8_labels(label) -> torch.Tensor:
    m = _spatial_mask(label)
    if m.dtype != torch.uint8:
        if m.is_floating_point():
            m = torch.round(m)
        if m.numel() and (int(m.min()) < 0 or int(m.max()) > 255):
            raise ValueError("label values outside 0..255")
        m = m.to(torch.uint8)
    return m.contiguous()


class DeviceTrainingLoader:
    """Training batches made on the training device, one resampling per sample (see the module's text).

    Args:
        data: the training cases (``{"image": path, "label": path}``).
        load_transforms: the bundle's deterministic loading (``LoadImaged``, ``Orientationd``,
            ``ScaleIntensityRanged``...), applied once per case.
        spatial_size, crop, augmentations: the stage's grid, ``train#crop`` (``None`` for the coarse stage) and
            ``train#augmentation_transforms``: the recipe (:func:`recipe_from_transforms`).
        batch_size, shuffle: as a ``DataLoader``'s (the last batch of an epoch may be smaller).
        device: where the network trains (the samples are made there).
        data_device: where the decoded cases stay: ``"auto"`` (the training device if they fit in
            ``memory_fraction`` of its free memory, else CPU memory, pinned when training on a GPU), or a device.
        seed: the samples' randomness (with the epoch and the position in the epoch).
        num_workers: threads that decode the cases at the start.
        elastic_grid_factor: the elastic noise's coarsening (see :func:`elastic_field`).

    Under ``torch.distributed`` each rank takes its share of every epoch's order (padded to equal shares, as
    MONAI's ``DistributedSampler(even_divisible=True)``). Attach it to the trainer (``FollowEpochs(loader)`` in
    ``train#handlers``) so that it knows the epoch, which makes a resumed run draw as the uninterrupted one did;
    unattached, it counts its own epochs from 1. The cases are decoded at the first iteration, not when the object
    is built.
    """

    def __init__(self, data, load_transforms, spatial_size, crop=None, augmentations=(), batch_size: int = 2,
                 shuffle: bool = True, device=None, data_device="auto", seed: int = 0, num_workers: int = 0,
                 elastic_grid_factor: int = 2, memory_fraction: float = 0.3, label_key: str = "label"):
        self.data = list(data)
        self.load_transforms = load_transforms
        self.recipe = recipe_from_transforms(spatial_size, crop, augmentations, label_key)
        self.batch_size = int(batch_size)
        self.shuffle = bool(shuffle)
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.data_device = data_device
        self.seed = int(seed)
        self.num_workers = int(num_workers)
        self.elastic_grid_factor = int(elastic_grid_factor)
        self.memory_fraction = float(memory_fraction)
        self.cases: list[_Case] | None = None
        self.storage: torch.device | None = None
        self.engine = None
        self._own_epoch = 0

    # -- the cases --

    def _load_one(self, item) -> _Case:
        from monai.transforms import Compose

        d = Compose(self.load_transforms)(dict(item)) if self.load_transforms else dict(item)
        image = d["image"]
        spacing = np.asarray(affine_to_spacing(affine_of(image, 3), r=3), dtype=np.float64)
        image_t = (image.as_tensor() if hasattr(image, "as_tensor") else torch.as_tensor(image)).float()
        if image_t.ndim == 3:
            image_t = image_t[None]
        label = _as_uint8_labels(d["label"])
        if tuple(label.shape) != tuple(image_t.shape[1:]):
            raise ValueError(f"{item.get('label')}: label shape {tuple(label.shape)} differs from the image's")
        tight = box_from_mask(label, self.recipe.box_labels) if self.recipe.crop else None
        if tight is None and self.recipe.crop:
            logger.warning("no %s in %s: its samples are whole volumes", label_names(self.recipe.box_labels),
                           item.get("label"))
        return _Case(image_t.contiguous(), stage_labels(label, self.recipe), tight, spacing)

    def _choose_storage(self, nbytes: int) -> torch.device:
        if self.data_device != "auto":
            return torch.device(self.data_device)
        if self.device.type == "cuda":
            free, _total = torch.cuda.mem_get_info(self.device)
            if nbytes <= self.memory_fraction * free:
                return self.device
        return torch.device("cpu")

    def prepare(self) -> None:
        """Decode every case once and place the set (idempotent)."""
        if self.cases is not None:
            return
        if self.num_workers > 1:
            with ThreadPoolExecutor(self.num_workers) as pool:
                cases = list(pool.map(self._load_one, self.data))
        else:
            cases = [self._load_one(item) for item in self.data]
        self.storage = self._choose_storage(sum(c.nbytes for c in cases))
        pin = self.storage.type == "cpu" and self.device.type == "cuda"
        for c in cases:
            c.image = c.image.to(self.storage)
            c.label = c.label.to(self.storage)
            if pin:
                c.image, c.label = c.image.pin_memory(), c.label.pin_memory()
        self.cases = cases
        logger.info("training set: %d case(s), %.0f MB, on %s (samples made on %s)", len(cases),
                    sum(c.nbytes for c in cases) / 2**20, self.storage, self.device)

    # -- the epochs --

    def attach(self, engine) -> None:
        """Read the trainer's epoch when an epoch's batches start (an ignite/MONAI handler)."""
        self.engine = engine

    def _shard(self, epoch: int) -> list[tuple[int, int]]:
        """``(position, case index)`` of this rank's samples of ``epoch``."""
        n = len(self.data)
        order = np.arange(n)
        if self.shuffle:
            order = np.random.default_rng(np.random.SeedSequence([self.seed, int(epoch), 2**31])).permutation(n)
        rank, world = 0, 1
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
        total = math.ceil(n / world) * world
        padded = np.concatenate([order, order[: total - n]]) if total > n else order
        return [(int(p), int(padded[p])) for p in range(rank, total, world)]

    def __len__(self) -> int:
        world = 1
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            world = torch.distributed.get_world_size()
        return math.ceil(math.ceil(len(self.data) / world) / self.batch_size)

    def draw(self, epoch: int, position: int, case: int) -> SampleDraw:
        c = self.cases[case]
        rng = sample_rng(self.seed, epoch, position)
        return draw_sample(self.recipe, c.tight, tuple(c.image.shape[1:]), c.spacing, rng)

    def sample(self, case: int, draw: SampleDraw):
        """One sample of case ``case`` with the parameters ``draw``, made on the training device."""
        c = self.cases[case]
        if self.storage == self.device:
            image, label, offset = c.image, c.label, None
        else:  # only the box goes over
            (a0, a1, a2), (b0, b1, b2) = draw.box
            image = c.image[:, a0:b0, a1:b1, a2:b2].to(self.device, non_blocking=True)
            label = c.label[a0:b0, a1:b1, a2:b2].to(self.device, non_blocking=True)
            offset = draw.box[0]
        return sample_case(image, label, self.recipe, draw, offset, self.elastic_grid_factor)

    def epoch_samples(self, epoch: int):
        """The ``(position, case, draw)`` of this rank's samples in ``epoch``, in order."""
        self.prepare()
        return [(p, i, self.draw(epoch, p, i)) for p, i in self._shard(epoch)]

    def __iter__(self):
        self.prepare()
        if self.engine is not None:
            epoch = int(self.engine.state.epoch)
        else:
            self._own_epoch += 1
            epoch = self._own_epoch
        shard = self._shard(epoch)
        for first in range(0, len(shard), self.batch_size):
            images, labels, names = [], [], []
            for position, case in shard[first: first + self.batch_size]:
                image, label = self.sample(case, self.draw(epoch, position, case))
                images.append(image)
                labels.append(label)
                names.append(str(self.data[case]["image"]))
            # the batch's files by name, as MONAI's meta tensors carry them (filename_or_obj)
            yield {"image": torch.stack(images), "label": torch.stack(labels), "filename_or_obj": names}

    def with_recipe(self, **changes) -> DeviceTrainingLoader:
        """A copy sharing the decoded cases, with recipe fields changed (tests, benchmarks)."""
        other = object.__new__(DeviceTrainingLoader)
        other.__dict__.update(self.__dict__)
        other.recipe = replace(self.recipe, **changes)
        return other


class FollowEpochs:
    """A trainer handler that tells ``loader`` (a :class:`DeviceTrainingLoader`) the trainer's epoch, so that a resumed
    run draws what the uninterrupted one drew. Harmless when the trainer reads another loader."""

    def __init__(self, loader: DeviceTrainingLoader):
        self.loader = loader

    def attach(self, engine) -> None:
        self.loader.attach(engine)
