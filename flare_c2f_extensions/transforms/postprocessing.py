"""Label post-processing transforms: clear skipped crops, remap FLARE ids, keep the largest component."""

from __future__ import annotations

import logging
from collections.abc import Hashable, Mapping, Sequence

import cc3d
import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.data.meta_obj import get_track_meta
from monai.transforms import InvertibleTransform, MapTransform, Transform
from monai.utils import TraceKeys, TransformBackends, convert_to_tensor

from flare_c2f_extensions.transforms.boxes import SKIPPED_META_KEY, _plain, _profile_box, box_slices

__all__ = [
    "ClearIfSkippedd", "KeepLargestComponent", "KeepLargestComponentd", "RemapLabels", "RemapLabelsd",
    "dropped_components", "keep_largest_component", "remap_labels",
]

logger = logging.getLogger(__name__)


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
