"""Geometric ceiling of the cascade (issue "fine stages", Must show 1).

The ground truth of a clinical-size LPS case goes through each stage's geometry exactly as the bundles do it
(NIfTI -> LoadImage -> Orientation RAS -> crop/resize with nearest -> inverse -> back to LPS); see
``benchmarks/geometric_ceiling.py``, whose ``measure`` these tests run (nearest path only).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import nibabel as nib
import pytest

from flare_c2f_extensions.labels import GROUPS, ORGANS

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "geometric_ceiling.py"
SMALL = GROUPS["small"]
GROUPED = [k for name in ("solid", "digestive", "vessels") for k in GROUPS[name]]


def _load_script():
    spec = importlib.util.spec_from_file_location("geometric_ceiling", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def ceiling():
    """512 x 512 x 120 at 0.8 x 0.8 x 2.5 mm, stored LPS (about 15 s on 2 cores)."""
    result = _load_script().measure(
        seed=0, shape=(512, 512, 120), spacing=(0.8, 0.8, 2.5), orientation="LPS", variants=("nearest",)
    )
    assert nib.aff2axcodes(result["case"].affine) == ("L", "P", "S")
    assert set(result["dsc"]) == {"coarse", "group", "locator", "refiner"}
    return result["dsc"]


def _below(dsc: dict, organs, threshold: float) -> dict:
    return {ORGANS[k]: round(dsc[k], 4) for k in organs if dsc[k] < threshold}


def test_refiner_keeps_every_small_organ(ceiling):
    # the refiner's boxes are upsampled to 128^3 on every axis: nearest up and back down is exact
    assert not _below(ceiling["refiner"], SMALL, 0.99)


def test_vessels_keep_their_organs(ceiling):
    # the vessel box (about 133 x 109 x 120 voxels) is upsampled to 160^3 as well
    assert not _below(ceiling["group"], GROUPS["vessels"], 0.99)


def test_groups_stay_within_the_sampling_loss(ceiling):
    # what 160^3 nearest costs a 385-voxel-wide solid box (about 1.9 mm samples in-plane) is 0.976..0.992 on
    # seeds 0..3; a box or affine off by half a voxel would cost another ~0.03 on the kidneys
    assert not _below(ceiling["group"], GROUPED, 0.97)


@pytest.mark.xfail(
    strict=True,
    reason="geometric ceiling of 160^3 nearest on a 0.8 mm case: kidneys, spleen, pancreas and duodenum keep "
    "0.977..0.983 (seed 0); needs soft targets + linear fusion (0.994) or a finer group grid (256^3)",
)
def test_groups_keep_every_organ_at_099(ceiling):
    assert not _below(ceiling["group"], GROUPED, 0.99)


def test_coarse_path_is_measurably_worse(ceiling):
    coarse, fine = ceiling["coarse"], {**ceiling["group"], **ceiling["refiner"]}
    assert min(coarse[k] for k in SMALL) < min(fine[k] for k in SMALL) - 0.05
    assert {ORGANS[k]: (coarse[k], fine[k]) for k in ORGANS if coarse[k] >= fine[k]} == {}
    assert set(ceiling["locator"]) == set(SMALL)
