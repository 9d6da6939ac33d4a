"""Shared fixtures: a small generated cohort and helpers that run a bundle config the MONAI way."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from helpers import SCHEMA_ENV

# one thread: the tests' tiny networks gain nothing from two, and one keeps runs repeatable under load
torch.set_num_threads(1)



@pytest.fixture(scope="session")
def cohort(tmp_path_factory):
    """Four small training cases (RAS and LPS alternate) and two held-out cases in the FLARE layout."""
    from flare_c2f_extensions.synthetic.phantom import write_cohort

    out = tmp_path_factory.mktemp("cohort")
    write_cohort(out, n=4, n_test=2, seed=7, shape=(48, 48, 32))
    return out


@pytest.fixture(scope="session")
def schema() -> str:
    """Path of the MONAI metadata schema (``meta_schema_20240725.json``) from ``$FLARE_C2F_METADATA_SCHEMA``."""
    import os

    path = os.environ.get(SCHEMA_ENV)
    if not path:
        pytest.skip(f"set {SCHEMA_ENV} to a copy of MONAI's meta_schema_20240725.json to check bundle metadata")
    assert Path(path).is_file(), f"{SCHEMA_ENV}={path} is not a file"
    return path


@pytest.fixture(scope="module")
def cascade():
    """The tiny random-weight cascade of the hostile-input tests."""
    from helpers import tiny_cascade

    return tiny_cascade()


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    """A good synthetic CT (int16 HU, LPS storage): its path, voxels and affine."""
    import numpy as np

    from flare_c2f_extensions.synthetic.phantom import make_case

    from helpers import save

    case = make_case(5, shape=(40, 36, 24), orientation="LPS")
    path = save(case.image, case.affine, tmp_path_factory.mktemp("good") / "good_0000.nii.gz", np.int16)
    return path, case.image, case.affine
