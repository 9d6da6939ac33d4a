"""Transforms of the cascade, MONAI style: an array version and a dictionary version of each."""

from __future__ import annotations

from collections.abc import Hashable, Mapping

import torch
from monai.config import KeysCollection
from monai.transforms import MapTransform, Transform


class ClipIntensity(Transform):
    """Clip intensities to ``[minv, maxv]`` (the last step of the paper's augmentation: clip to [0, 1])."""

    def __init__(self, minv: float = 0.0, maxv: float = 1.0):
        self.minv, self.maxv = minv, maxv

    def __call__(self, img):
        img = img if isinstance(img, torch.Tensor) else torch.as_tensor(img)
        return img.clamp(self.minv, self.maxv)


class ClipIntensityd(MapTransform):
    def __init__(self, keys: KeysCollection, minv: float = 0.0, maxv: float = 1.0, allow_missing_keys: bool = False):
        super().__init__(keys, allow_missing_keys)
        self.clip = ClipIntensity(minv, maxv)

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.clip(d[key])
        return d
