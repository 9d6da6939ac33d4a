"""The training sampler that makes each sample in one resampling on the training device (``sampling.py``): the same
samples as today's crop -> resize -> deform for fixed parameters, the same distribution of parameters as today's MONAI
transforms, reproducible from a seed, and a resumed training that keeps the evaluator's best metric and its epoch.
Tiny volumes, grids and networks, CPU."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser
from monai.data import MetaTensor
from monai.transforms import Affine, Rand3DElasticd, RandAffined, Resample
from monai.transforms.utils import create_grid

from flare_c2f_extensions.paths import BUNDLES_DIR
from flare_c2f_extensions.training.sampling import (
    DeviceTrainingLoader,
    SampleDraw,
    draw_sample,
    elastic_field,
    recipe_from_transforms,
    sample_case,
    sample_rng,
    stage_labels,
)
from flare_c2f_extensions.transforms.boxes import box_from_mask
from flare_c2f_extensions.transforms.crop import CropFromMask
from flare_c2f_extensions.transforms.resizing import resize_spatial

SPACING = (1.2, 1.0, 2.5)
SHAPE = (48, 44, 28)


def _ellipsoid(shape, centre, radii):
    grid = np.meshgrid(*[np.arange(s, dtype=np.float64) for s in shape], indexing="ij")
    return sum(((g - c) / r) ** 2 for g, c, r in zip(grid, centre, radii)) <= 1.0


def case(shape=SHAPE, spacing=SPACING):
    """A smooth image (so that one interpolation and two agree closely) and a label map with solid organs."""
    grid = np.meshgrid(*[np.linspace(0, 1, s) for s in shape], indexing="ij")
    image = 0.5 + 0.25 * np.sin(3 * grid[0] + 1) * np.cos(2 * grid[1]) + 0.2 * grid[2]
    label = np.zeros(shape, np.uint8)
    label[_ellipsoid(shape, (18, 18, 12), (8, 7, 5))] = 1
    label[_ellipsoid(shape, (32, 20, 14), (5, 4, 4))] = 2
    label[_ellipsoid(shape, (22, 30, 16), (5, 5, 4))] = 3
    label[_ellipsoid(shape, (32, 30, 10), (4, 4, 3))] = 13
    label[_ellipsoid(shape, (10, 34, 8), (3, 3, 3))] = 6  # not a solid organ: background for the stage
    affine = torch.as_tensor(np.diag([*spacing, 1.0]))
    return (MetaTensor(torch.as_tensor(image, dtype=torch.float32)[None], affine=affine),
            MetaTensor(torch.as_tensor(label)[None], affine=affine))


def bundle_parts(bundle: str, grid: int, **overrides):
    parser = ConfigParser()
    parser.read_config(str(BUNDLES_DIR / bundle / "configs" / "train.json"))
    parser["spatial_size"] = [grid] * 3
    for key, value in overrides.items():
        parser[key] = value
    crop = parser.get_parsed_content("train#crop") if "crop" in parser["train"] else None
    return crop, parser.get_parsed_content("train#augmentation_transforms")


def solid_recipe(grid=16, **overrides):
    crop, augmentations = bundle_parts("flare22_fine_solid", grid, **overrides)
    return recipe_from_transforms([grid] * 3, crop, augmentations), crop, augmentations


def coarse_recipe(grid=16, **overrides):
    crop, augmentations = bundle_parts("flare22_coarse", grid, **overrides)
    return recipe_from_transforms([grid] * 3, crop, augmentations), augmentations


def plain(draw: SampleDraw, **changes) -> SampleDraw:
    fields = {"affine": None, "elastic": None, "intensity": tuple(None for _ in draw.intensity), **changes}
    return SampleDraw(draw.box, fields["affine"], fields["elastic"], fields["intensity"])


def test_recipe_is_read_from_the_bundles_transforms():
    recipe, crop, _ = solid_recipe(elastic_prob=0.3)
    assert recipe.crop and recipe.label_mode == "soft" and recipe.target_labels == (1, 2, 3, 13)
    assert (recipe.margin_mm, recipe.jitter_margin_mm, recipe.jitter_shift_mm) == (15.0, 20.0, 10.0)
    assert recipe.elastic_prob == 0.3 and recipe.sigma_range == (3, 5) and recipe.magnitude_range == (100, 200)
    assert [name for name, *_ in recipe.intensity] == ["scale", "gamma", "range"]
    coarse, _ = coarse_recipe()
    assert not coarse.crop and coarse.label_mode == "nearest" and coarse.affine_prob == 0.5
    assert coarse.scale_range == (0.1, 0.1, 0.1) and coarse.translate_range == (1, 1, 1)  # 16 // 10 voxels
    with pytest.raises(ValueError, match="does not know"):
        recipe_from_transforms([16] * 3, crop, [torch.nn.Identity()])


@pytest.mark.parametrize("grid", [16, 40])  # down- and up-sampling of the box
def test_without_deformation_the_sample_is_exactly_the_boxs_crop(grid):
    recipe, _, _ = solid_recipe(grid)
    image, label = case()
    tight = box_from_mask(label, recipe.box_labels)
    draw = plain(draw_sample(recipe, tight, SHAPE, np.asarray(SPACING), sample_rng(0, 1, 0)))
    out_image, out_label = sample_case(image.as_tensor(), stage_labels(label[0].as_tensor(), recipe), recipe, draw)
    cropper = CropFromMask(recipe.box_labels, grid, target_labels=recipe.target_labels)
    assert torch.equal(out_image, cropper.crop(image, draw.box, "trilinear").as_tensor())
    torch.testing.assert_close(out_label, cropper.crop(label, draw.box, "soft").as_tensor(), atol=1e-5, rtol=0)
    # the coarse stage: the whole volume, nearest labels, as ResizeToGridd
    coarse, _ = coarse_recipe(grid)
    whole = draw_sample(coarse, None, SHAPE, np.asarray(SPACING), sample_rng(0, 1, 0))
    assert whole.box == ((0, 0, 0), SHAPE)
    out_image, out_label = sample_case(image.as_tensor(), label[0].as_tensor(), coarse, plain(whole))
    assert torch.equal(out_image, resize_spatial(image, [grid] * 3, "trilinear"))
    assert torch.equal(out_label, resize_spatial(label, [grid] * 3, "nearest").float())


def _monai_resample(x: torch.Tensor, field: torch.Tensor, mode: str) -> torch.Tensor:
    """Today's elastic step on a crop for a given displacement: MONAI's grid plus the field, resampled with zeros
    padding (``Rand3DElastic`` does this with its own noise)."""
    grid = create_grid(tuple(x.shape[1:]), backend="torch").to(torch.float32)
    grid[:3] += field
    return Resample(mode=mode, padding_mode="zeros")(x, grid)


def test_one_resampling_equals_crop_resize_then_deform_for_fixed_parameters():
    grid = 24
    recipe, _, _ = solid_recipe(grid)
    image, label = case()
    tight = box_from_mask(label, recipe.box_labels)
    draw = plain(draw_sample(recipe, tight, SHAPE, np.asarray(SPACING), sample_rng(3, 1, 0)),
                 elastic=(3.5, 150.0, 1234))
    out_image, out_label = sample_case(image.as_tensor(), stage_labels(label[0].as_tensor(), recipe), recipe, draw)
    cropper = CropFromMask(recipe.box_labels, grid, target_labels=recipe.target_labels)
    field = elastic_field([grid] * 3, 3.5, 150.0, 1234)
    assert field.abs().max() > 0.5  # a real deformation
    ref_image = _monai_resample(cropper.crop(image, draw.box, "trilinear").as_tensor(), field, "bilinear")
    ref_label = _monai_resample(cropper.crop(label, draw.box, "soft").as_tensor(), field, "nearest")
    difference = (out_image - ref_image).abs()
    assert difference.mean() < 2e-3 and difference.max() < 0.05  # one linear interpolation against two
    same = torch.isclose(out_label, ref_label, atol=1e-5).all(0)
    assert same.float().mean() > 0.995  # the label moves by nearest in both: equal but for rounding ties
    # the coarse stage: resize, affine, elastic
    coarse, _ = coarse_recipe(grid)
    affine = np.eye(4)
    affine[:3, :3] = np.diag([1.08, 0.93, 1.02])
    affine[:3, 3] = [1.5, -2.0, 0.5]
    whole = plain(draw_sample(coarse, None, SHAPE, np.asarray(SPACING), sample_rng(0, 1, 0)),
                  affine=affine, elastic=(4.0, 120.0, 99))
    out_image, out_label = sample_case(image.as_tensor(), label[0].as_tensor(), coarse, whole)
    field = elastic_field([grid] * 3, 4.0, 120.0, 99)
    resized_image = resize_spatial(image, [grid] * 3, "trilinear")
    resized_label = resize_spatial(label, [grid] * 3, "nearest").float()
    moved = [Affine(affine=torch.as_tensor(affine), image_only=True, mode=m, padding_mode="zeros")(x)
             for x, m in ((resized_image, "bilinear"), (resized_label, "nearest"))]
    ref_image = _monai_resample(torch.as_tensor(moved[0]), field, "bilinear")
    ref_label = _monai_resample(torch.as_tensor(moved[1]), field, "nearest")
    difference = (out_image - ref_image).abs()
    inner = (slice(None), *[slice(5, -5)] * 3)  # where no step reads zero padding
    assert difference[inner].mean() < 2e-3 and difference[inner].max() < 0.05
    assert difference.mean() < 0.02  # at the border, blurred zero padding once against twice
    assert (out_label == ref_label)[inner].float().mean() > 0.93  # nearest thrice against once: organ boundaries
    assert abs((out_label == 0).float().mean() - (ref_label == 0).float().mean()) < 0.02


def test_labels_stay_in_the_label_set_and_seeds_reproduce():
    grid = 16
    recipe, _, _ = solid_recipe(grid, elastic_prob=1.0)
    image, label = case()
    local = stage_labels(label[0].as_tensor(), recipe)
    tight = box_from_mask(label, recipe.box_labels)
    coarse, _ = coarse_recipe(grid, elastic_prob=1.0)
    for position in range(6):
        draw = draw_sample(recipe, tight, SHAPE, np.asarray(SPACING), sample_rng(7, 2, position))
        out_image, out_label = sample_case(image.as_tensor(), local, recipe, draw)
        assert out_label.shape == (5, grid, grid, grid) and out_label.min() >= 0 and out_label.max() <= 1 + 1e-6
        total = out_label.sum(0)
        assert torch.all((total.abs() < 1e-6) | ((total - 1).abs() < 1e-5))  # a distribution, or zero padding
        assert out_image.min() >= 0 and out_image.max() <= 1
        again = sample_case(image.as_tensor(), local, recipe,
                            draw_sample(recipe, tight, SHAPE, np.asarray(SPACING), sample_rng(7, 2, position)))
        assert torch.equal(again[0], out_image) and torch.equal(again[1], out_label)
        whole = draw_sample(coarse, None, SHAPE, np.asarray(SPACING), sample_rng(7, 2, position))
        _, ids = sample_case(image.as_tensor(), label[0].as_tensor(), coarse, whole)
        assert set(ids.unique().tolist()) <= {0, 1, 2, 3, 6, 13}
    other = draw_sample(recipe, tight, SHAPE, np.asarray(SPACING), sample_rng(8, 2, 0))
    assert other != draw_sample(recipe, tight, SHAPE, np.asarray(SPACING), sample_rng(7, 2, 0))


def _write_cases(folder, n=3):
    import nibabel as nib

    cases = []
    for i in range(n):
        image, label = case()
        paths = {"image": folder / f"c{i}_0000.nii.gz", "label": folder / f"c{i}.nii.gz"}
        hu = (image[0].numpy() * 400 - 100).astype(np.int16)
        nib.save(nib.Nifti1Image(np.roll(hu, i, 0), np.diag([*SPACING, 1.0])), paths["image"])
        nib.save(nib.Nifti1Image(np.roll(label[0].numpy(), i, 0), np.diag([*SPACING, 1.0])), paths["label"])
        cases.append({k: str(v) for k, v in paths.items()})
    return cases


def test_loader_epochs_reproduce_and_a_resumed_epoch_draws_the_same(tmp_path):
    parser = ConfigParser()
    parser.read_config(str(BUNDLES_DIR / "flare22_fine_solid" / "configs" / "train.json"))
    parser["spatial_size"] = [16] * 3
    crop = parser.get_parsed_content("train#crop")
    cases = _write_cases(tmp_path)

    def loader():
        return DeviceTrainingLoader(cases, parser.get_parsed_content("load_transforms"), [16] * 3, crop,
                                    parser.get_parsed_content("train#augmentation_transforms"), batch_size=2)

    first, second = loader(), loader()
    assert len(first) == 2
    epochs = [list(first) for _ in range(3)]
    assert [b["image"].shape[0] for b in epochs[0]] == [2, 1] and epochs[0][0]["label"].shape == (2, 5, 16, 16, 16)
    assert not torch.equal(epochs[0][0]["image"], epochs[1][0]["image"])  # a new epoch, new samples

    class Engine:  # a trainer resumed after epoch 2: its loader starts at epoch 3
        class state:
            epoch = 3

    second.attach(Engine)
    resumed = list(second)
    for a, b in zip(resumed, epochs[2]):
        assert torch.equal(a["image"], b["image"]) and torch.equal(a["label"], b["label"])


def _stats(values: np.ndarray):
    return values.mean(0), values.std(0)


def test_box_affine_and_intensity_distributions_match_todays_transforms():
    """Over many draws: the boxes of RandCropFromMaskd, the affine matrices of RandAffined (scale, translation and,
    with a rotate_range, angles) and the intensity values match today's MONAI transforms in mean and spread."""
    draws = 600
    recipe, crop, _ = solid_recipe(16)
    big = (110, 120, 56)  # room around the organs for every margin and shift: no clamping to the volume
    affine = torch.as_tensor(np.diag([*SPACING, 1.0]))
    label = torch.zeros(big, dtype=torch.uint8)
    label[45:65, 50:75, 22:34] = 1
    label[60:70, 55:62, 25:30] = 13
    image, label = MetaTensor(torch.zeros((1, *big)), affine=affine), MetaTensor(label[None], affine=affine)
    tight = box_from_mask(label, recipe.box_labels)
    crop.set_random_state(0)
    today = np.array([np.ravel(crop({"image": image, "label": label})["crop_box"]) for _ in range(draws)])
    ours = np.array([np.ravel(draw_sample(recipe, tight, big, np.asarray(SPACING), sample_rng(1, 1, p)).box)
                     for p in range(draws)])
    assert today.min() > 0 and np.all(today[:, 3:] < np.array(big))
    (m1, s1), (m2, s2) = _stats(today.astype(float)), _stats(ours.astype(float))
    assert np.all(np.abs(m1 - m2) <= 4 * s1 / np.sqrt(draws)) and np.all(np.abs(s1 - s2) <= 0.12 * s1)

    rotating = RandAffined(keys="image", prob=0.5, rotate_range=[0.3, 0.2, 0.1], scale_range=[0.1] * 3,
                           translate_range=[3, 3, 3], padding_mode="zeros")
    recipe = recipe_from_transforms([16] * 3, None, [rotating])
    rotating.set_random_state(0)
    today, applied = [], 0
    for _ in range(draws):
        rotating.randomize(None)
        if rotating._do_transform:
            applied += 1
            grid = rotating.rand_affine.rand_affine_grid
            grid.randomize()
            grid(spatial_size=(4, 4, 4), randomize=False)
            today.append(np.asarray(grid.get_transformation_matrix())[:3].ravel())
    mine = [draw_sample(recipe, None, SHAPE, np.asarray(SPACING), sample_rng(2, 1, p)).affine for p in range(draws)]
    ours = np.array([m[:3].ravel() for m in mine if m is not None])
    assert abs(applied - len(ours)) < 4 * np.sqrt(draws * 0.25)
    (m1, s1), (m2, s2) = _stats(np.array(today)), _stats(ours)
    assert np.all(np.abs(m1 - m2) <= 4 * np.maximum(s1, 1e-3) / np.sqrt(len(ours)))
    assert np.all(np.abs(s1 - s2) <= 0.15 * np.maximum(s1, 1e-3))

    recipe, _, _ = solid_recipe(16)
    values = np.array([[np.nan if v is None else v for v in
                        draw_sample(recipe, tight, SHAPE, np.asarray(SPACING), sample_rng(3, 1, p)).intensity[:2]]
                       for p in range(draws)])
    for column, (low, high) in zip(values.T, [(-0.4, 0.4), (0.6, 1.4)]):
        applied = column[~np.isnan(column)]
        assert abs(len(applied) - draws / 2) < 4 * np.sqrt(draws / 4)
        assert low <= applied.min() and applied.max() <= high
        assert abs(applied.mean() - (low + high) / 2) < 4 * (high - low) / np.sqrt(12 * len(applied))


def _ramp_displacements(transform: Rand3DElasticd, grid: int, draws: int) -> np.ndarray:
    """Today's elastic displacements, measured: a coordinate ramp image through Rand3DElastic (linear interpolation
    of a linear ramp is exact), the interior voxels only (no zero padding there)."""
    ramps = create_grid((grid,) * 3, homogeneous=False, backend="torch").to(torch.float32)
    inner = slice(6, grid - 6)
    out = []
    for _ in range(draws):
        moved = torch.as_tensor(transform({"image": ramps.clone()})["image"])
        out.append((moved - ramps)[:, inner, inner, inner].reshape(3, -1))
    return torch.cat(out, 1).numpy()


def test_elastic_displacement_magnitudes_match_todays_rand3delastic():
    """The field for given sigma and magnitude (today's measured through a ramp), and the draws of both."""
    grid, draws = 40, 10
    inner = slice(6, grid - 6)
    for sigma, magnitude in ((3.0, 100.0), (5.0, 200.0)):
        today = Rand3DElasticd(keys="image", prob=1.0, sigma_range=(sigma, sigma), mode="bilinear",
                               magnitude_range=(magnitude, magnitude), padding_mode="zeros")
        today.set_random_state(0)
        measured = _ramp_displacements(today, grid, draws)
        ours = torch.cat([elastic_field([grid] * 3, sigma, magnitude, seed)[:, inner, inner, inner].reshape(3, -1)
                          for seed in range(draws)], 1).numpy()
        length_today, length_ours = np.linalg.norm(measured, axis=0), np.linalg.norm(ours, axis=0)
        assert abs(length_ours.mean() / length_today.mean() - 1) < 0.12
        assert abs(np.percentile(length_ours, 95) / np.percentile(length_today, 95) - 1) < 0.12
        assert abs(ours.std() / measured.std() - 1) < 0.12 and abs(ours.mean()) < 0.1 * ours.std()
    today = Rand3DElasticd(keys="image", prob=0.5, sigma_range=(3, 5), magnitude_range=(100, 200))
    recipe = recipe_from_transforms([grid] * 3, None, [today])
    drawn = [draw_sample(recipe, None, SHAPE, np.asarray(SPACING), sample_rng(5, 1, p)).elastic for p in range(800)]
    drawn = np.array([d[:2] for d in drawn if d is not None])
    assert abs(len(drawn) - 400) < 4 * np.sqrt(200)
    assert drawn[:, 0].min() >= 3 and drawn[:, 0].max() <= 5 and abs(drawn[:, 0].mean() - 4) < 0.1
    assert drawn[:, 1].min() >= 100 and drawn[:, 1].max() <= 200 and abs(drawn[:, 1].mean() - 150) < 5


# -- resume: the evaluator's best metric and its epoch -----------------------------------------------------------


TINY = ["spatial_size=[32,32,32]", "network_def#channels=[4,8,8,8,8]", "num_workers=0", "batch_size=2",
        "val_interval=1", "learning_rate=0.02"]
RECORD_BEST = (  # at the trainer's start (after the resume loader) and at its end
    "$@train#trainer.add_event_handler(ignite.engine.Events.{event}, lambda e: torch.save("
    "{{'best': float(@validate#evaluator.state.best_metric), 'epoch': int(@validate#evaluator.state.best_metric_epoch),"
    " 'at': int(e.state.epoch)}}, @bundle_root + '/best_{event}.pt'))"
)
RUN = [RECORD_BEST.format(event="STARTED"), RECORD_BEST.format(event="COMPLETED"), "$@train#trainer.run()"]
FAIL_IN_EPOCH_3 = [  # 2 training cases, batch 2: 1 iteration an epoch, the 3rd is epoch 3's
    "$@train#trainer.add_event_handler(ignite.engine.Events.ITERATION_COMPLETED(once=3), "
    "lambda e: (_ for _ in ()).throw(RuntimeError('injected failure')))",
    *RUN,
]


def test_resumed_run_keeps_the_evaluators_best_metric_and_epoch(cohort, tmp_path):
    from flare_c2f_extensions.training.train import train_cascade

    common = dict(stages="solid", device="cpu", num_val=2, evaluate=False, progress=False, epochs=4)
    straight = tmp_path / "straight"
    train_cascade(cohort, straight, overrides=[*TINY, {"solid": {"run": RUN}}], **common)
    resumed = tmp_path / "resumed"
    with pytest.raises(Exception):
        train_cascade(cohort, resumed, overrides=[*TINY, {"solid": {"run": FAIL_IN_EPOCH_3}}], **common)
    interrupted = torch.load(resumed / "flare22_fine_solid" / "best_STARTED.pt")
    train_cascade(cohort, resumed, overrides=[*TINY, {"solid": {"run": RUN}}], **common)
    at_start = torch.load(resumed / "flare22_fine_solid" / "best_STARTED.pt")
    assert interrupted["at"] == 0 and at_start["at"] == 2  # resumed after epoch 2
    done = json.loads((straight / "flare22_fine_solid" / "logs" / "train_solid.done.json").read_text())
    best_after_2 = max((h["val_mean_dice"], -h["epoch"]) for h in done["history"][:2])
    assert (at_start["best"], at_start["epoch"]) == (pytest.approx(best_after_2[0], abs=1e-5), -best_after_2[1])
    end_straight = torch.load(straight / "flare22_fine_solid" / "best_COMPLETED.pt")
    end_resumed = torch.load(resumed / "flare22_fine_solid" / "best_COMPLETED.pt")
    assert end_resumed["best"] == pytest.approx(end_straight["best"], abs=1e-6)
    assert end_resumed["epoch"] == end_straight["epoch"]
