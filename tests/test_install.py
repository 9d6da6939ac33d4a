"""Installable: a wheel built from the repository carries the bundles' configs (not weights), and once installed into
a fresh virtual environment it runs ``flare-c2f segment`` from a folder outside the repository, without the network.

The environment is made with ``--system-site-packages`` (plus the test environment's own site-packages, when that is
a virtual environment) and the wheel installed with ``--no-deps``, so torch, MONAI and the other dependencies come
from the test environment; ``PYTHONPATH`` and ``$FLARE_C2F_BUNDLES`` are cleared so
that only the installed copy can be imported and its shipped bundles are the ones found.
"""

from __future__ import annotations

import json
import os
import shutil
import site
import subprocess
import sys
import zipfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from flare_c2f_extensions.paths import CASCADE_BUNDLE, ENV_VAR, STAGE_BUNDLES

from helpers import REPO, TINY_STAGES, write_phantom

SOURCES = ["pyproject.toml", "README.md", "LICENSE", "bundles", "flare_c2f_extensions"]
OFFLINE = {"PIP_NO_INDEX": "1", "PIP_DISABLE_PIP_VERSION_CHECK": "1"}


def run(command, cwd: Path, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([str(c) for c in command], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """(venv folder, its environment variables) with the package installed from a freshly built wheel."""
    root = tmp_path_factory.mktemp("install")
    source = root / "source"  # a copy, so the build leaves nothing in the repository
    source.mkdir()
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info", "eval", "*.pt", "*.ts")
    for name in SOURCES:
        if (REPO / name).is_dir():
            shutil.copytree(REPO / name, source / name, ignore=ignore)
        else:
            shutil.copy(REPO / name, source / name)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", ENV_VAR)} | OFFLINE
    built = run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", root / "dist",
                 source], root, env)
    assert built.returncode == 0, built.stderr
    (wheel,) = (root / "dist").glob("*.whl")
    venv = root / "venv"
    made = run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", venv], root, env)
    assert made.returncode == 0, made.stderr
    python = venv / "bin" / "python"
    # --system-site-packages gives the base interpreter's packages; when the tests run in a virtual environment,
    # its packages (torch, MONAI, pip, ...) are elsewhere: a .pth line adds them, after the new venv's own
    purelib = run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], root, env)
    assert purelib.returncode == 0, purelib.stderr
    (Path(purelib.stdout.strip()) / "test_environment.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    done = run([python, "-m", "pip", "install", "--no-deps", wheel], root, env)  # pip from the test environment
    assert done.returncode == 0, done.stderr
    return wheel, venv, env


def test_wheel_ships_configs_not_weights(installed):
    wheel, _, _ = installed
    names = zipfile.ZipFile(wheel).namelist()
    for bundle in [*STAGE_BUNDLES.values(), CASCADE_BUNDLE]:
        prefix = f"flare_c2f_extensions/bundles/{bundle}"
        for part in ("configs/inference.json", "configs/metadata.json", "docs/README.md", "LICENSE"):
            assert f"{prefix}/{part}" in names
    assert not [name for name in names if name.endswith((".pt", ".ts")) or "/eval/" in name]


def test_installed_command_segments_from_anywhere(installed, tmp_path):
    _, venv, env = installed
    work = tmp_path / "elsewhere"  # outside the repository, no bundles/ beside anything
    work.mkdir()
    write_phantom(work / "ct.nii.gz")
    (work / "tiny.json").write_text(json.dumps(TINY_STAGES))
    where = run([venv / "bin" / "python", "-c", "import flare_c2f_extensions as f, flare_c2f_extensions.paths as p; "
                 "print(f.__file__); print(p.bundles_dir())"], work, env)
    assert where.returncode == 0, where.stderr
    module, bundles = (Path(line) for line in where.stdout.split())
    assert module.is_relative_to(venv) and bundles == module.parent / "bundles"

    command = [venv / "bin" / "flare-c2f", "segment", "-i", "ct.nii.gz", "-o", "seg.nii.gz"]
    refused = run(command, work, env)  # an installed copy has no weights: one line says what to do
    assert refused.returncode == 1
    assert refused.stderr.strip().count("\n") == 0 and "no trained weights" in refused.stderr
    assert "--require_weights false" in refused.stderr and "--bundles_dir" in refused.stderr
    assert not (work / "seg.nii.gz").exists()

    done = run([*command, "--require_weights", "false", "--stage_overrides", "tiny.json", "--threads", "1"], work, env)
    assert done.returncode == 0, done.stderr
    written, source = nib.load(str(work / "seg.nii.gz")), nib.load(str(work / "ct.nii.gz"))
    assert written.shape == source.shape and np.array_equal(written.affine, source.affine)
    report = json.loads((work / "seg_report.json").read_text())
    assert all(Path(stage.split(": ")[1]).is_relative_to(bundles) for stage in report["random_weight_stages"])
