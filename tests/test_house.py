"""The house's rules in code: importing the package changes nothing global, every stage bundle provides what the
cascade reads from it, and the trainable bundles' shared blocks stay equal."""

from __future__ import annotations

import os
import subprocess
import sys

from conftest import REPO

# Third-party modules import first: some of them add warning filters of their own, which are not ours to judge.
IMPORT_SIDE_EFFECTS = """
import sys, warnings
import monai.bundle, monai.data, monai.inferers, monai.metrics, monai.networks, monai.transforms, nibabel, torch
import cc3d, PIL, pydicom, scipy.ndimage, tqdm, yaml
hook, filters = sys.excepthook, list(warnings.filters)
import pkgutil, importlib, flare_c2f_extensions
for module in pkgutil.iter_modules(flare_c2f_extensions.__path__):
    importlib.import_module("flare_c2f_extensions." + module.name)
print(sys.excepthook is hook, warnings.filters == filters, [f for f in warnings.filters if f not in filters])
flare_c2f_extensions.errors.start_run()
print(sys.excepthook is hook, warnings.filters == filters)
"""


def test_importing_the_package_changes_no_hook_and_no_warning_filter():
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    result = subprocess.run(
        [sys.executable, "-c", IMPORT_SIDE_EFFECTS], capture_output=True, text=True, env=env, cwd=REPO, check=True
    )
    imported, started = result.stdout.strip().splitlines()[-2:]
    assert imported == "True True []"
    assert started == "False False"  # a run's entry point installs both
