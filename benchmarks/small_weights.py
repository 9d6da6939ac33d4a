"""Weights and cases for the engine benchmarks (``engine_agreement.py``, ``int8_engine.py``): a generated cohort,
seeded random weights saved as checkpoints, and small trained weights (a quickstart's, or trained here briefly).

Not a benchmark itself; the scripts beside it import it.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from flare_c2f_extensions.cascade.pipeline import Cascade
from flare_c2f_extensions.cascade.stages import needed_stages
from flare_c2f_extensions.cli.quickstart import QUICK_NETWORK, QUICK_STAGES, train_stages
from flare_c2f_extensions.paths import BUNDLES_DIR
from flare_c2f_extensions.synthetic.phantom import write_cohort

# trained here when no quickstart is given: the big-organ stages (no locator or refiners), quickstart grids, fewer
# epochs (about two minutes on two cores; the organs come out, the small ones are not attempted)
BRIEF_EPOCHS = {"coarse": 24, "solid": 12, "digestive": 8, "vessels": 8}


def cohort(work: Path, n_train: int, n_test: int, shape, seed: int = 3) -> Path:
    data = work / "data"
    if not (data / "imagesTs").is_dir():
        write_cohort(data, n=n_train, n_test=n_test, seed=seed, shape=tuple(shape))
    return data


def quickstart_overrides(quickstart: Path) -> dict:
    """Stage overrides of a quickstart's trained bundles (``python -m flare_c2f_extensions quickstart --out DIR``)."""
    return {
        name: {"bundle_root": str(quickstart / "bundles" / bundle), "spatial_size": settings["spatial_size"],
               **QUICK_NETWORK}
        for name, (bundle, settings) in QUICK_STAGES.items()
    }


def random_overrides(work: Path, seed: int = 0, small_organs=None, paper: bool = False, organs=None) -> dict:
    """Seeded random weights at the quickstart's network and grids (``paper``: the bundles' own, paper-size), saved
    as checkpoints (so that the default engine, OpenVINO, runs them from its cache as it runs trained ones)."""
    settings = {name: {"spatial_size": s["spatial_size"], **QUICK_NETWORK} for name, (_, s) in QUICK_STAGES.items()}
    if paper:
        settings = {name: {} for name in settings}
    folder = work / f"random_{'paper_' if paper else ''}{seed}"
    overrides = {name: {**s, "ckpt_path": str(folder / f"{name}.pt")} for name, s in settings.items()}
    needed = {name for name, _ in needed_stages(organs, small_organs)}
    if all(Path(overrides[name]["ckpt_path"]).is_file() for name in needed):
        return overrides
    torch.manual_seed(seed)
    logging.getLogger("flare_c2f_extensions.cascade.stages").setLevel(logging.ERROR)  # "random initialisation": meant
    random = Cascade.from_bundles(BUNDLES_DIR, device="cpu", stage_overrides=settings, require_weights=False,
                                  small_organs=small_organs, organs=organs, engine="torch")
    folder.mkdir(parents=True, exist_ok=True)
    for stage in random.stages:  # every refiner has the same shape: the last one's weights serve them all
        torch.save(stage.network.state_dict(), folder / f"{stage.name}.pt")
    return overrides


def trained_overrides(work: Path, data: Path, quickstart: Path | None) -> tuple[dict, list | None]:
    """(stage overrides, small organs) of trained weights: the quickstart's if given (every stage), else the
    big-organ stages trained here briefly (kept in ``work`` for the next run; no small organs)."""
    if quickstart is not None:
        return quickstart_overrides(quickstart), None
    out = work / "trained"
    stages = {name: (QUICK_STAGES[name][0], {**QUICK_STAGES[name][1], "max_epochs": epochs})
              for name, epochs in BRIEF_EPOCHS.items()}
    overrides = {name: {"bundle_root": str(out / bundle), "spatial_size": settings["spatial_size"], **QUICK_NETWORK}
                 for name, (bundle, settings) in stages.items()}
    if not all((Path(o["bundle_root"]) / "models" / "model.pt").is_file() for o in overrides.values()):
        print(f"training {', '.join(stages)} briefly in {out} (logs in {out / 'logs'})", flush=True)
        overrides = train_stages(data, out, QUICK_NETWORK, stages)
    return overrides, []
