"""Shared fixtures: a small generated cohort and helpers that run a bundle config the MONAI way."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from flare_c2f_extensions.quickstart import bundle_workflow  # noqa: F401  (the tests run bundles the quickstart's way)

REPO = Path(__file__).resolve().parents[1]
BUNDLES = REPO / "bundles"
# The MONAI bundle metadata schema is not in the repository; point this variable at a local copy to check the
# bundles' metadata against it (CI sets it). Without it the schema checks skip and say how to enable them.
SCHEMA_ENV = "FLARE_C2F_METADATA_SCHEMA"

# one thread: the tests' tiny networks gain nothing from two, and one keeps runs repeatable under load
torch.set_num_threads(1)

# Tiny network and grid for CPU tests; set through config overrides only, as a user would.
TINY = {
    "spatial_size": [32, 32, 32],
    "network_def#channels": [4, 8, 8, 8, 8],
    "num_workers": 0,
}
TINY_TRAIN = {**TINY, "batch_size": 2, "num_val": 1, "max_epochs": 1, "val_interval": 1}


@pytest.fixture(scope="session")
def cohort(tmp_path_factory):
    """Four small training cases (RAS and LPS alternate) and two held-out cases in the FLARE layout."""
    from flare_c2f_extensions.phantom import write_cohort

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
