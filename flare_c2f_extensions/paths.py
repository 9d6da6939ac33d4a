"""Where the stage bundles live: one rule for a checkout, an editable install and an installed wheel.

The bundles folder (the stage bundles' configs, docs and licences; weights only where someone put them) is, in
this order:

1. ``$FLARE_C2F_BUNDLES`` if it is set;
2. ``bundles/`` beside the package folder: a git checkout, or an editable install (``pip install -e .``), where the
   checkout's ``bundles/`` is the source of truth;
3. the copy shipped inside the installed package (``pip install .`` or a wheel): configs, docs and licences, no
   weights (``flare_c2f_extensions/bundles/``).

Weights never ship with the package: point ``flare-c2f segment --bundles_dir DIR`` (or ``--stage_dirs``) at a folder
of trained stage bundles.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["BUNDLES_DIR", "CASCADE_BUNDLE", "ENV_VAR", "STAGE_BUNDLES", "bundles_dir"]

ENV_VAR = "FLARE_C2F_BUNDLES"
PACKAGE_DIR = Path(__file__).resolve().parent
CHECKOUT_BUNDLES = PACKAGE_DIR.parent / "bundles"  # a checkout or an editable install
SHIPPED_BUNDLES = PACKAGE_DIR / "bundles"  # package data of an installed copy (pyproject.toml)

# cascade stage -> its bundle's folder name
STAGE_BUNDLES = {
    "coarse": "flare22_coarse",
    "solid": "flare22_fine_solid",
    "digestive": "flare22_fine_digestive",
    "vessels": "flare22_fine_vessels",
    "locator": "flare22_small_locator",
    "refiner": "flare22_small_refiner",
}
CASCADE_BUNDLE = "flare22_cascade"


def bundles_dir() -> Path:
    """The bundles folder by the rule in the module docstring (read now: the environment variable may change)."""
    configured = os.environ.get(ENV_VAR)
    if configured:
        return Path(configured).expanduser()
    if (CHECKOUT_BUNDLES / STAGE_BUNDLES["coarse"] / "configs").is_dir():
        return CHECKOUT_BUNDLES
    return SHIPPED_BUNDLES


BUNDLES_DIR = bundles_dir()  # as found at import; code that runs later calls bundles_dir()
