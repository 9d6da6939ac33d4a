"""Tests of the cascade's transforms: crop from mask (invertible), label remap, largest component."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from monai.data import DataLoader, Dataset, MetaTensor, decollate_batch
from monai.transforms import (
    Compose,
    CropForegroundd,
    Invertd,
    MapLabelValued,
    Resize,
    ScaleIntensityRanged,
)
from monai.utils import set_determinism

from flare_c2f_extensions.labels import GROUPS
from flare_c2f_extensions.transforms.boxes import box_from_mask, box_slices, expand_box, get_crop_box, map_box
from flare_c2f_extensions.transforms.crop import (
    ClipIntensityd,
    CropFromMask,
    CropFromMaskd,
    RandCropFromMask,
    RandCropFromMaskd,
)
from flare_c2f_extensions.transforms.postprocessing import (
    KeepLargestComponent,
    KeepLargestComponentd,
    RemapLabels,
    RemapLabelsd,
    keep_largest_component,
)
from flare_c2f_extensions.transforms.resizing import paste_into, resize_spatial

SPACING = (0.8, 0.8, 2.5)
SHAPE = (64, 56, 40)


def make_affine(spacing=SPACING, origin=(-20.0, 13.0, 100.0)):
    aff = np.diag(list(spacing) + [1.0])
    aff[:3, 3] = origin
    return torch.as_tensor(aff, dtype=torch.float64)


def ellipsoid(shape, centre, radii):
    grid = np.meshgrid(*[np.arange(s, dtype=np.float64) for s in shape], indexing="ij")
    return sum(((g - c) / r) ** 2 for g, c, r in zip(grid, centre, radii)) <= 1.0


def blob_case(shape=SHAPE, spacing=SPACING):
    """Image and label map (MetaTensors, channel-first) with four 'solid' organs and a pancreas."""
    lab = np.zeros(shape, np.uint8)
    lab[ellipsoid(shape, (22, 20, 18), (9, 8, 5))] = 1
    lab[ellipsoid(shape, (40, 22, 16), (5, 4, 4))] = 2
    lab[ellipsoid(shape, (24, 36, 20), (6, 5, 4))] = 3
    lab[ellipsoid(shape, (42, 36, 22), (5, 5, 4))] = 13
    lab[ellipsoid(shape, (32, 30, 28), (6, 3, 3))] = 4
    aff = make_affine(spacing)
    rng = np.random.default_rng(0)
    img = lab.astype(np.float32) * 0.05 + rng.normal(0, 0.01, shape).astype(np.float32)
    return MetaTensor(torch.from_numpy(img)[None], affine=aff), MetaTensor(torch.from_numpy(lab)[None], affine=aff)


def dsc(a, b):
    a, b = np.asarray(a, bool), np.asarray(b, bool)
    return 2.0 * (a & b).sum() / max(a.sum() + b.sum(), 1)


def tight_box(lab, labels):
    return box_from_mask(np.asarray(lab), labels)


# --------------------------------------------------------------------------------------------------------------
# boxes
# --------------------------------------------------------------------------------------------------------------


def test_margin_in_mm_with_anisotropic_spacing():
    img, _ = blob_case()
    lab = torch.zeros((1,) + SHAPE, dtype=torch.uint8)
    lab[0, 20:30, 15:25, 10:20] = 1
    lab = MetaTensor(lab, affine=img.affine)
    d = CropFromMaskd(["image", "label"], "label", box_labels=(1,), spatial_size=32, margin_mm=4.0)(
        {"image": img, "label": lab}
    )
    # 4 mm -> ceil(4 / 0.8) = 5 voxels in-plane, ceil(4 / 2.5) = 2 voxels across slices
    assert d["crop_box"].tolist() == [[15, 10, 8], [35, 30, 22]]
    assert d["crop_skipped"] is False
    assert d["image"].shape == (1, 32, 32, 32) and d["label"].shape == (1, 32, 32, 32)
    # per-axis margin
    d = CropFromMaskd(["image"], "label", box_labels=(1,), spatial_size=32, margin_mm=(1.6, 0.0, 5.0))(
        {"image": img, "label": lab}
    )
    assert d["crop_box"].tolist() == [[18, 15, 8], [32, 25, 22]]


def test_box_clamped_to_volume():
    img, _ = blob_case()
    lab = torch.zeros((1,) + SHAPE, dtype=torch.uint8)
    lab[0, 0:5, 50:56, 35:40] = 7
    lab = MetaTensor(lab, affine=img.affine)
    d = CropFromMaskd("image", "label", box_labels=(7,), spatial_size=16, margin_mm=8.0)({"image": img, "label": lab})
    assert d["crop_box"].tolist() == [[0, 40, 31], [15, 56, 40]]
    assert d["image"].shape == (1, 16, 16, 16)


def test_min_size_mm_centred_and_kept_inside():
    img, _ = blob_case()
    lab = torch.zeros((1,) + SHAPE, dtype=torch.uint8)
    lab[0, 30:33, 20:23, 20:22] = 9
    lab = MetaTensor(lab, affine=img.affine)
    t = CropFromMaskd("image", "label", box_labels=(9,), spatial_size=16, margin_mm=0.0, min_size_mm=(16.0, 16.0, 25.0))
    d = t({"image": img, "label": lab})
    start, stop = d["crop_box"]
    assert (stop - start).tolist() == [20, 20, 10]  # 16/0.8, 16/0.8, 25/2.5
    centre = (start + stop - 1) / 2.0
    assert np.all(np.abs(centre - np.array([31, 21, 20.5])) <= 0.5)
    # a box larger than min_size is untouched
    big = CropFromMaskd("image", "label", box_labels=(9,), spatial_size=16, min_size_mm=1.0)
    big = big({"image": img, "label": lab})
    assert big["crop_box"].tolist() == [[30, 20, 20], [33, 23, 22]]
    # at the border the minimum-size box slides inside the volume and keeps its size
    lab2 = torch.zeros_like(lab)
    lab2[0, 0:2, 54:56, 0:1] = 9
    d = t({"image": img, "label": lab2})
    assert d["crop_box"].tolist() == [[0, 36, 0], [20, 56, 10]]


def test_expand_and_map_box_helpers():
    assert expand_box(((5, 5), (10, 10)), (20, 20), margin=2) == ((3, 3), (12, 12))
    assert expand_box(((5, 5), (10, 10)), (20, 20), margin=[[1, 2], [0, 3]], shift=(-10, 1)) == ((0, 6), (2, 14))
    ident = np.eye(4)
    box = ((3, 4, 5), (10, 11, 12))
    assert map_box(box, ident) == box
    # a coarse grid of half the size covering the same field of view: coarse voxel j covers fine voxels 2j, 2j+1
    from flare_c2f_extensions.transforms.boxes import fov_affine

    assert map_box(((1, 2, 3), (4, 5, 6)), fov_affine((8, 8, 8), (16, 16, 16))) == ((2, 4, 6), (8, 10, 12))


def test_label_boxes_are_find_objects_whatever_the_memory_order():
    """label_boxes scans a Fortran-ordered label map (as nibabel reads one) through its C-ordered transpose, which is
    several times faster; the boxes must be find_objects' own, for every label, present or not."""
    from scipy import ndimage

    from flare_c2f_extensions.transforms.boxes import label_boxes

    rng = np.random.default_rng(0)
    labels = np.zeros((23, 17, 11), np.uint8)
    for label in (1, 2, 5, 13):  # 3, 4 and 6..12 are missing
        start = rng.integers(0, 8, 3)
        labels[tuple(slice(s, s + int(rng.integers(1, 9))) for s in start)] = label
    fortran = np.asfortranarray(labels)
    assert fortran.flags.f_contiguous and not fortran.flags.c_contiguous
    expected = ndimage.find_objects(labels, max_label=13)
    assert sum(box is not None for box in expected) == 4
    assert label_boxes(fortran, 13) == expected
    assert label_boxes(labels, 13) == expected
    assert label_boxes(fortran[:, ::-1], 13) == ndimage.find_objects(labels[:, ::-1], max_label=13)  # a strided view


def test_box_from_coarse_mask_on_another_grid():
    img, lab = blob_case()
    labels = GROUPS["solid"]
    truth = tight_box(lab, labels)
    coarse = Resize((24, 24, 24), mode="nearest")(lab)  # MetaTensor with the coarse grid's affine
    assert coarse.shape[1:] == (24, 24, 24)
    kw = dict(box_labels=labels, spatial_size=32, margin_mm=0.0)
    d_aff = CropFromMaskd("image", "coarse", **kw)({"image": img, "coarse": coarse})
    d_fov = CropFromMaskd("image", "coarse", **kw)({"image": img, "coarse": coarse.as_tensor()})  # plain: same fov
    assert d_aff["crop_box"].tolist() == d_fov["crop_box"].tolist()
    start, stop = d_aff["crop_box"]
    coarse_vox = np.array(SHAPE) / 24.0  # size of a coarse voxel in image voxels
    # the box lands on the organs: within about one coarse voxel of the true box
    assert np.all(np.abs(start - np.array(truth[0])) <= np.ceil(coarse_vox) + 1)
    assert np.all(np.abs(stop - np.array(truth[1])) <= np.ceil(coarse_vox) + 1)
    # and a coarse mask that holds exactly the image's box maps back exactly
    exact = torch.zeros((1, 32, 28, 20), dtype=torch.uint8)  # half the image size on each axis
    exact[0, 5:10, 3:7, 2:4] = 1
    exact = MetaTensor(exact, affine=Resize((32, 28, 20))(img).affine)
    d = CropFromMaskd("image", "m", box_labels=(1,), spatial_size=16)({"image": img, "m": exact})
    assert d["crop_box"].tolist() == [[10, 6, 4], [20, 14, 8]]


def test_box_from_coarse_mask_with_a_different_affine():
    """A mask resampled to another spacing and origin (not a whole-volume resize) is mapped through affines."""
    img, lab = blob_case()
    # a grid at 2x coarser spacing, shifted by one fine voxel: coarse voxel j centre = fine voxel 2j + 1.5
    fine_aff = img.affine.numpy()
    to_fine = np.diag([2.0, 2.0, 2.0, 1.0])
    to_fine[:3, 3] = 1.5
    coarse_aff = fine_aff @ to_fine
    coarse = np.zeros((30, 26, 18), np.uint8)
    coarse[4:8, 5:9, 2:5] = 3
    coarse = MetaTensor(torch.from_numpy(coarse)[None], affine=torch.as_tensor(coarse_aff))
    d = CropFromMaskd("image", "m", box_labels=(3,), spatial_size=16)({"image": img, "m": coarse})
    # coarse voxel j covers fine [2j + 1, 2j + 2] (centres), so [4, 8) -> [9, 17)
    assert d["crop_box"].tolist() == [[9, 11, 5], [17, 19, 11]]


# --------------------------------------------------------------------------------------------------------------
# inversion
# --------------------------------------------------------------------------------------------------------------


def big_blob_label(shape=(160, 150, 64)):
    lab = np.zeros(shape, np.uint8)
    lab[ellipsoid(shape, (58, 60, 30), (42, 40, 22))] = 1
    lab[ellipsoid(shape, (122, 55, 30), (20, 20, 14))] = 2
    lab[ellipsoid(shape, (62, 122, 30), (22, 20, 14))] = 3
    lab[ellipsoid(shape, (122, 112, 30), (20, 20, 14))] = 13
    return MetaTensor(torch.from_numpy(lab)[None], affine=make_affine())


@pytest.mark.parametrize("case", ["upsampling", "downsampling"])
def test_inverse_restores_grid_and_labels(case):
    if case == "upsampling":  # box about 43 x 38 x 19 voxels -> 48^3
        img, lab = blob_case()
        spatial_size = (48, 48, 48)
    else:  # box about 135 x 131 x 49 voxels -> 128 x 112 x 48
        lab = big_blob_label()
        img = MetaTensor(lab.as_tensor().float() * 0.1, affine=lab.affine)
        spatial_size = (128, 112, 48)
    shape = tuple(lab.shape[1:])
    labels = GROUPS["solid"]
    t = CropFromMaskd(["image", "label"], "label", box_labels=labels, spatial_size=spatial_size, margin_mm=3.0,
                      mode=("trilinear", "nearest"))
    d = t({"image": img, "label": lab})
    assert d["label"].dtype == torch.uint8 and d["image"].dtype == torch.float32
    assert tuple(d["label"].shape[1:]) == spatial_size
    box = get_crop_box(d["image"])
    assert box == tuple(tuple(v) for v in d["crop_box"].tolist()) == get_crop_box(d["label"])
    assert np.all(np.array(box[1]) - np.array(box[0]) != np.array(spatial_size))  # a real resize on every axis
    # the cropped affine puts the crop's centre where the box's centre is in the world
    centre_crop = (np.array(spatial_size) - 1) / 2.0
    centre_img = (np.array(box[0]) + np.array(box[1]) - 1) / 2.0
    w1 = d["image"].affine.numpy() @ np.append(centre_crop, 1)
    w2 = img.affine.numpy() @ np.append(centre_img, 1)
    np.testing.assert_allclose(w1, w2, atol=1e-6)

    inv = t.inverse(d)
    for key, ref in (("label", lab), ("image", img)):
        assert inv[key].shape == ref.shape
        np.testing.assert_allclose(inv[key].affine.numpy(), ref.affine.numpy(), rtol=0, atol=1e-9)
        assert inv[key].applied_operations == []
        assert "crop_box" not in inv[key].meta
    assert inv["label"].dtype == torch.uint8
    back = inv["label"].numpy()[0]
    orig = lab.numpy()[0]
    for organ in labels:
        assert dsc(back == organ, orig == organ) >= (0.999 if case == "upsampling" else 0.99), organ
    outside = np.ones(shape, bool)
    outside[box_slices(box)] = False
    assert not back[outside].any() and not inv["image"].numpy()[0][outside].any()


def test_integer_upsampling_inverts_exactly():
    img, lab = blob_case()
    d = CropFromMaskd("label", "label", box_labels=(1,), spatial_size=-1, mode="nearest")({"label": lab})
    box = tuple(tuple(v) for v in d["crop_box"].tolist())
    size = [b - a for a, b in zip(*box)]
    t = CropFromMaskd("label", "label", box_labels=(1,), spatial_size=[2 * s for s in size], mode="nearest")
    d = t({"label": lab})
    back = t.inverse(d)["label"]
    np.testing.assert_array_equal(back.numpy()[0][box_slices(box)], lab.numpy()[0][box_slices(box)])


def test_array_form_and_inverse():
    img, lab = blob_case()
    t = CropFromMask(box_labels=(2, 13), spatial_size=40, margin_mm=2.0, mode="nearest")
    out = t(lab, lab)
    assert out.shape == (1, 40, 40, 40)
    assert out.meta["crop_skipped"] is False
    back = t.inverse(out)
    assert back.shape == lab.shape
    np.testing.assert_allclose(back.affine.numpy(), lab.affine.numpy(), atol=1e-9)
    for organ in (2, 13):
        assert dsc(back.numpy()[0] == organ, lab.numpy()[0] == organ) >= 0.99


def test_invertd_labels_and_probabilities():
    img, lab = blob_case()
    pre = Compose(
        [
            CropFromMaskd(["image", "label"], "label", box_labels=GROUPS["solid"], spatial_size=(64, 64, 32),
                          margin_mm=5.0, mode=("trilinear", "nearest")),
        ]
    )
    d = pre({"image": img, "label": lab})
    # a "prediction" on the fixed grid: the cropped label map, and one-hot probabilities
    d["pred"] = d["label"].clone()
    onehot = torch.stack([(d["label"][0] == k).float() for k in (0, 1, 2, 3, 13)])
    d["prob"] = MetaTensor(onehot)
    inv_lab = Invertd("pred", pre, orig_keys="image", nearest_interp=True)(dict(d))["pred"]
    inv_prob = Invertd("prob", pre, orig_keys="image", nearest_interp=False)(dict(d))["prob"]
    for out in (inv_lab, inv_prob):
        assert tuple(out.shape[1:]) == SHAPE
        np.testing.assert_allclose(out.affine.numpy(), img.affine.numpy(), atol=1e-9)
    assert inv_prob.shape[0] == 5 and inv_prob.dtype == torch.float32
    amax = torch.tensor([0, 1, 2, 3, 13])[inv_prob.argmax(0)].numpy()
    for organ in GROUPS["solid"]:
        assert dsc(inv_lab.numpy()[0] == organ, lab.numpy()[0] == organ) >= 0.99
        assert dsc(amax == organ, lab.numpy()[0] == organ) >= 0.99
    # the original image key is untouched by Invertd
    assert d["image"].shape == (1, 64, 64, 32)


def test_invertd_after_dataloader_collate():
    img, lab = blob_case()
    img2, lab2 = blob_case(shape=(60, 50, 36))
    pre = Compose(
        [
            RandCropFromMaskd(["image", "label"], "label", box_labels=GROUPS["solid"], spatial_size=(72, 72, 40),
                              margin_mm=4.0, mode=("trilinear", "nearest"), jitter_margin_mm=5.0, jitter_shift_mm=3.0),
        ]
    )
    ds = Dataset([{"image": img, "label": lab}, {"image": img2, "label": lab2}], transform=pre)
    batch = next(iter(DataLoader(ds, batch_size=2, num_workers=0)))
    assert batch["image"].shape == (2, 1, 72, 72, 40)
    batch["pred"] = batch["label"].clone()
    post = Invertd("pred", pre, orig_keys="image", nearest_interp=True)
    for item, ref in zip(decollate_batch(batch), (lab, lab2)):
        out = post(item)["pred"]
        assert out.shape == ref.shape
        np.testing.assert_allclose(out.affine.numpy(), ref.affine.numpy(), atol=1e-9)
        for organ in GROUPS["solid"]:
            assert dsc(out.numpy()[0] == organ, ref.numpy()[0] == organ) >= 0.99


def test_paste_into_and_resize_helpers():
    crop = torch.arange(8, dtype=torch.float32).reshape(1, 2, 2, 2)
    box = ((1, 2, 3), (3, 4, 5))
    out = paste_into((5, 6, 7), box, crop)
    assert out.shape == (1, 5, 6, 7)
    assert torch.equal(out[0, 1:3, 2:4, 3:5], crop[0]) and out.sum() == crop.sum()
    out3 = paste_into((5, 6, 7), ((0, 0, 0), (4, 4, 4)), crop[0], mode="nearest")  # spatial crop, resized
    assert out3.shape == (5, 6, 7) and torch.equal(out3[:4, :4, :4], crop[0].repeat_interleave(2, 0)
                                                   .repeat_interleave(2, 1).repeat_interleave(2, 2))
    lab = torch.randint(0, 14, (1, 9, 9, 9), dtype=torch.int64)
    assert resize_spatial(lab, (5, 5, 5), "nearest").dtype == torch.int64


# --------------------------------------------------------------------------------------------------------------
# jitter, skipping
# --------------------------------------------------------------------------------------------------------------


def _jitter_boxes(seed, n=6):
    img, lab = blob_case()
    set_determinism(seed=seed)
    try:
        pre = Compose(
            [RandCropFromMaskd("image", "label", box_labels=GROUPS["solid"], spatial_size=16, margin_mm=2.0,
                               jitter_margin_mm=8.0, jitter_shift_mm=(4.0, 4.0, 10.0))]
        )
        return [pre({"image": img, "label": lab})["crop_box"].tolist() for _ in range(n)]
    finally:
        set_determinism(seed=None)


def test_jitter_reproducible_with_set_determinism():
    a, b, c = _jitter_boxes(0), _jitter_boxes(0), _jitter_boxes(1)
    assert a == b
    assert a != c
    assert len({str(x) for x in a}) > 1  # the box does move from call to call
    # explicit random state on the array form
    img, lab = blob_case()
    t1 = RandCropFromMask(box_labels=(1,), spatial_size=8, jitter_margin_mm=5.0, jitter_shift_mm=5.0)
    t2 = RandCropFromMask(box_labels=(1,), spatial_size=8, jitter_margin_mm=5.0, jitter_shift_mm=5.0)
    t1.set_random_state(7)
    t2.set_random_state(7)
    assert get_crop_box(t1(img, lab)) == get_crop_box(t2(img, lab))
    # no jitter: the same box as the deterministic transform
    t0 = RandCropFromMaskd("image", "label", box_labels=(1,), spatial_size=8, margin_mm=3.0)
    det = CropFromMaskd("image", "label", box_labels=(1,), spatial_size=8, margin_mm=3.0)
    data = {"image": img, "label": lab}
    assert t0(data)["crop_box"].tolist() == det(data)["crop_box"].tolist()


def test_jitter_only_grows_or_moves_the_box():
    img, lab = blob_case()
    truth = tight_box(lab, GROUPS["solid"])
    t = RandCropFromMaskd("image", "label", box_labels=GROUPS["solid"], spatial_size=8, jitter_margin_mm=6.0)
    t.set_random_state(3)
    for _ in range(10):
        start, stop = t({"image": img, "label": lab})["crop_box"]
        assert np.all(start <= truth[0]) and np.all(stop >= truth[1])
        assert np.all(np.array(truth[0]) - start <= np.ceil(6.0 / np.array(SPACING)))


def test_mask_without_the_labels_is_skipped(caplog):
    img, lab = blob_case()
    t = CropFromMaskd(["image", "label"], "label", box_labels=GROUPS["vessels"], spatial_size=16,
                      mode=("trilinear", "nearest"))
    with caplog.at_level(logging.WARNING):
        d = t({"image": img, "label": lab})
    assert d["crop_skipped"] is True
    assert "no aorta, inferior_vena_cava in mask: stage skipped" in caplog.text
    assert d["crop_box"].tolist() == [[0, 0, 0], list(SHAPE)]
    assert d["image"].shape == (1, 16, 16, 16)  # still the fixed grid: a batch still collates
    assert d["image"].meta["crop_skipped"] is True and get_crop_box(d["image"]) is None
    back = t.inverse(d)
    assert back["image"].shape == img.shape
    # empty mask, array form, random form
    empty = MetaTensor(torch.zeros_like(lab.as_tensor()), affine=lab.affine)
    assert CropFromMask(box_labels=None, spatial_size=8)(img, empty).meta["crop_skipped"] is True
    r = RandCropFromMaskd("image", "label", box_labels=(5,), spatial_size=8, jitter_shift_mm=3.0)
    assert r({"image": img, "label": lab})["crop_skipped"] is True
    assert box_from_mask(empty, (1,)) is None


# --------------------------------------------------------------------------------------------------------------
# remap
# --------------------------------------------------------------------------------------------------------------


def test_remap_round_trip():
    rng = np.random.default_rng(1)
    lab = MetaTensor(torch.from_numpy(rng.integers(0, 14, (1, 10, 11, 12)).astype(np.uint8)), affine=make_affine())
    group = GROUPS["digestive"]  # (4, 11, 12)
    local = RemapLabels(group, to_local=True)(lab)
    assert local.dtype == torch.uint8 and isinstance(local, MetaTensor)
    np.testing.assert_allclose(local.affine.numpy(), lab.affine.numpy())
    for i, organ in enumerate(group):
        assert torch.equal(local == i + 1, lab == organ)
    assert torch.equal(local == 0, ~torch.isin(lab, torch.tensor(group, dtype=torch.uint8)))
    flare = RemapLabels(group, to_local=False)(local)
    expected = torch.where(torch.isin(lab, torch.tensor(group, dtype=torch.uint8)), lab, torch.zeros_like(lab))
    assert torch.equal(flare.as_tensor(), expected.as_tensor())
    # invertible: the dictionary form's inverse maps a local map back to FLARE ids
    t = RemapLabelsd("label", group, to_local=True)
    d = t({"label": lab})
    assert torch.equal(t.inverse(d)["label"].as_tensor(), expected.as_tensor())
    # numpy and float label maps keep their type
    arr = RemapLabels((5, 6), to_local=True)(np.array([[0, 5, 6, 7]], dtype=np.float32))
    assert arr.dtype == torch.float32 and arr.tolist() == [[0, 1, 2, 0]]


# --------------------------------------------------------------------------------------------------------------
# largest connected component
# --------------------------------------------------------------------------------------------------------------


def test_keep_largest_component_per_label_26_connectivity():
    lab = np.zeros((20, 20, 20), np.uint8)
    lab[2:6, 2:6, 2:6] = 1  # label 1, large piece
    lab[10:12, 10:12, 10:12] = 1  # label 1, small separate piece: removed
    lab[6, 6, 6] = 1  # touches the large piece only at a corner: the same component, kept
    lab[14:18, 14:18, 14:18] = 2  # label 2: two pieces touching only at a corner form ONE component
    lab[18:20, 18:20, 18:20] = 2
    lab[0:2, 15:20, 0:3] = 3  # label 3: one large piece and a small one
    lab[5, 18, 0] = 3
    lab[7:9, 2:6, 2:6] = 4  # label 4 next to label 1 (touching): labels never merge
    out = keep_largest_component(lab)
    expected = lab.copy()
    expected[10:12, 10:12, 10:12] = 0
    expected[5, 18, 0] = 0
    np.testing.assert_array_equal(out, expected)
    assert out.dtype == np.uint8
    # only selected labels are cleaned
    out = keep_largest_component(lab, labels=(3,))
    assert out[10, 10, 10] == 1 and out[5, 18, 0] == 0
    # 6-connectivity would split the corner-touching pieces
    out6 = keep_largest_component(lab, connectivity=6)
    assert out6[6, 6, 6] == 0 and out6[18, 18, 18] == 0


def test_keep_largest_component_keeps_type_dtype_meta():
    lab = np.zeros((12, 12, 12), np.uint8)
    lab[1:5, 1:5, 1:5] = 13
    lab[8:10, 8:10, 8:10] = 13
    aff = make_affine()
    mt = MetaTensor(torch.from_numpy(lab)[None], affine=aff, meta={"filename_or_obj": "case.nii.gz"})
    out = KeepLargestComponent()(mt)
    assert isinstance(out, MetaTensor) and out.dtype == torch.uint8 and out.shape == (1, 12, 12, 12)
    assert out.meta["filename_or_obj"] == "case.nii.gz"
    np.testing.assert_allclose(out.affine.numpy(), aff.numpy())
    assert int(out[0, 8, 8, 8]) == 0 and int(out[0, 2, 2, 2]) == 13
    assert mt[0, 8, 8, 8] == 13  # the input is not modified
    plain = KeepLargestComponent()(torch.from_numpy(lab.astype(np.int64)))  # plain 3D tensor
    assert plain.dtype == torch.int64 and plain.shape == (12, 12, 12) and int(plain[8, 8, 8]) == 0
    arr = KeepLargestComponent()(lab.astype(np.float32))  # float label maps (as loaded) work too
    assert isinstance(arr, np.ndarray) and arr.dtype == np.float32 and arr[8, 8, 8] == 0
    d = KeepLargestComponentd("pred")({"pred": mt})
    assert torch.equal(d["pred"].as_tensor(), out.as_tensor())
    empty = KeepLargestComponent()(np.zeros((4, 4, 4), np.uint8))
    assert not empty.any()


def test_keep_largest_component_matches_scipy_reference_any_memory_order():
    from scipy import ndimage

    rng = np.random.default_rng(3)
    lab = np.zeros((30, 28, 26), np.uint8)
    for organ in (1, 2, 5, 13):  # noisy organs: one big ellipsoid plus random specks of the same label
        lab[ellipsoid(lab.shape, rng.uniform(8, 20, 3), rng.uniform(3, 7, 3))] = organ
        specks = rng.random(lab.shape) < 0.01
        lab[specks] = organ
    ref = lab.copy()
    for organ in (1, 2, 5, 13):
        cc, n = ndimage.label(lab == organ, structure=np.ones((3, 3, 3)))
        sizes = np.bincount(cc.ravel())
        sizes[0] = 0
        assert np.sort(sizes)[-1] > np.sort(sizes)[-2]  # no tie for the largest
        ref[(cc > 0) & (cc != sizes.argmax())] = 0
    np.testing.assert_array_equal(keep_largest_component(lab), ref)
    np.testing.assert_array_equal(keep_largest_component(np.asfortranarray(lab)), ref)  # nibabel's order
    np.testing.assert_array_equal(keep_largest_component(lab[:, ::-1][:, ::-1]), ref)  # strided view
    out = KeepLargestComponent()(torch.from_numpy(lab).permute(2, 1, 0))
    np.testing.assert_array_equal(out.permute(2, 1, 0).numpy(), ref)


def test_invertd_through_orientation_to_the_original_file_grid():
    """LPS-stored case: reorient to RAS, crop from the label, invert a prediction back to the stored grid."""
    from monai.transforms import Orientationd

    _, lab = blob_case()
    lps = make_affine()
    lps[0, 0] *= -1
    lps[1, 1] *= -1
    lab = MetaTensor(lab.as_tensor(), affine=lps)
    img = MetaTensor(lab.as_tensor().float(), affine=lps)
    pre = Compose(
        [
            Orientationd(["image", "label"], axcodes="RAS"),
            CropFromMaskd(["image", "label"], "label", box_labels=GROUPS["solid"], spatial_size=(64, 64, 32),
                          margin_mm=4.0, mode=("trilinear", "nearest")),
        ]
    )
    d = pre({"image": img, "label": lab})
    d["pred"] = d["label"].clone()
    out = Invertd("pred", pre, orig_keys="image", nearest_interp=True)(d)["pred"]
    assert out.shape == lab.shape
    np.testing.assert_allclose(out.affine.numpy(), lps.numpy(), atol=1e-9)
    for organ in GROUPS["solid"]:
        assert dsc(out.numpy()[0] == organ, lab.numpy()[0] == organ) >= 0.99


def test_soft_targets_for_other_classes_than_the_box():
    """The locator crops the box of all foreground but learns only the small organs: soft one-hot of those."""
    import torch
    from monai.data import MetaTensor

    from flare_c2f_extensions.transforms.crop import CropFromMaskd

    label = torch.zeros(1, 40, 40, 30, dtype=torch.uint8)
    label[0, 5:30, 5:30, 5:25] = 1  # a big organ: only defines the box
    label[0, 10:14, 10:14, 10:14] = 7
    affine = torch.diag(torch.tensor([0.8, 0.8, 2.5, 1.0]))
    data = {"image": MetaTensor(label.float(), affine=affine), "label": MetaTensor(label, affine=affine)}
    out = CropFromMaskd(
        ["image", "label"], "label", box_labels=None, spatial_size=20, mode=["trilinear", "soft"], target_labels=(7, 8)
    )(data)["label"]
    assert out.shape == (3, 20, 20, 20)
    assert torch.allclose(out.sum(0), torch.ones(20, 20, 20))
    assert out[1].sum() > 0 and out[2].sum() == 0  # organ 7 present, organ 8 absent; the liver is background
    assert tuple(int(v) for v in data["label"].shape[1:]) == (40, 40, 30)


def test_crop_keywords_of_0_1_0_still_work_with_a_warning():
    with pytest.warns(FutureWarning, match="labels= is now box_labels="):
        old = CropFromMaskd("image", "label", labels=(1,), soft_classes=(1, 2), spatial_size=8)
    assert (old.cropper.box_labels, old.cropper.target_labels) == ((1,), (1, 2))


# -- where MONAI does the job, and where ours stays (and why) ---------------------------------------------------------


def test_monai_clip_in_the_bundles_is_exactly_a_clamp():
    x = torch.rand(1, 16, 16, 16, generator=torch.Generator().manual_seed(0)) * 3 - 1  # [-1, 2]
    clipped = ScaleIntensityRanged("image", 0.0, 1.0, 0.0, 1.0, clip=True)({"image": x})["image"]
    assert torch.equal(torch.as_tensor(clipped), x.clamp(0.0, 1.0))
    assert torch.equal(torch.as_tensor(ClipIntensityd("image")({"image": x})["image"]), x.clamp(0.0, 1.0))


def test_remap_zeroes_other_organs_and_inverts_where_monai_map_label_value_does_not():
    digestive = GROUPS["digestive"]  # (4, 11, 12) -> 1, 2, 3
    lab = MetaTensor(torch.tensor([[[[0, 1, 4, 11, 12, 2]]]], dtype=torch.uint8))  # liver (1), right kidney (2) too
    remap = RemapLabelsd("label", digestive)
    ours = remap({"label": lab})["label"]
    assert ours.flatten().tolist() == [0, 0, 1, 2, 3, 0]
    monai = MapLabelValued("label", list(digestive), [1, 2, 3])({"label": lab})["label"]
    assert torch.as_tensor(monai).flatten().tolist() == [0, 1, 1, 2, 3, 2]  # liver reads as pancreas (1)
    back = remap.inverse({"label": ours})["label"]
    assert torch.as_tensor(back).flatten().tolist() == [0, 0, 4, 11, 12, 0]


def test_one_pass_largest_component_equals_one_labelling_per_organ():
    """MONAI's KeepLargestConnectedComponent labels each organ in a pass of its own (and needs scikit-image on the
    CPU); ours is one cc3d pass for all organs. The result is the same as labelling each organ alone."""
    from scipy import ndimage

    rng = np.random.default_rng(3)
    lab = rng.choice([0, 0, 1, 4, 9], size=(24, 20, 16)).astype(np.uint8)  # many components of every organ
    expected = np.zeros_like(lab)
    for organ in (1, 4, 9):
        components, _ = ndimage.label(lab == organ, structure=np.ones((3, 3, 3)))  # 26-connectivity
        largest = np.argmax(np.bincount(components.ravel())[1:]) + 1
        expected[components == largest] = organ
    ours = keep_largest_component(lab)
    assert np.array_equal(ours, expected) and not np.array_equal(ours, lab)


def test_margin_is_in_millimetres_where_monai_crop_foreground_counts_voxels():
    img, lab = blob_case(spacing=(0.8, 0.8, 2.5))
    tight = CropFromMaskd(["image", "label"], "label", box_labels=(1,), spatial_size=-1)({"image": img, "label": lab})
    ours = CropFromMaskd(["image", "label"], "label", box_labels=(1,), spatial_size=-1, margin_mm=5.0)
    grown = ours({"image": img, "label": lab})
    growth = (grown["crop_box"][1] - grown["crop_box"][0]) - (tight["crop_box"][1] - tight["crop_box"][0])
    assert growth.tolist() == [2 * 7, 2 * 7, 2 * 2]  # 5 mm: ceil(5 / 0.8) = 7 voxels in-plane, 2 across slices
    monai = CropForegroundd(["image"], "label", select_fn=lambda x: x == 1, margin=5)({"image": img, "label": lab})
    assert monai["image"].shape[1:] != grown["image"].shape[1:]  # 5 voxels = 4 mm in-plane, 12.5 mm across slices
