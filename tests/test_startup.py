"""Start-up: networks built on the meta device hold exactly the checkpoint's weights and give the outputs of a
network built and loaded the usual way; a checkpoint's hash is remembered between processes and never stale."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import time
from concurrent.futures import Future

import pytest
import torch
from monai.bundle import ConfigParser

from flare_c2f_extensions.cascade import engines
from flare_c2f_extensions.cascade.configs import read_stage_config
from flare_c2f_extensions.cascade.networks import ResUNetASPP
from flare_c2f_extensions.cascade.stages import build_with_weights, load_stage
from flare_c2f_extensions.cascade.weights import load_weights
from flare_c2f_extensions.errors import InputError
from flare_c2f_extensions.io import files

from helpers import BUNDLES, REPO, TINY_CHANNELS, TINY_GRID

OVERRIDES = {"spatial_size": TINY_GRID, "network_def#channels": TINY_CHANNELS}


def _checkpoint(path, seed=1, dtype=torch.float32, wrap=True):
    torch.manual_seed(seed)
    state = {k: v.to(dtype) for k, v in ResUNetASPP(out_channels=5, channels=TINY_CHANNELS).state_dict().items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": state} if wrap else state, path)
    return path


def _reference(checkpoint):
    """The network built the usual way (random initialisation) and then loaded."""
    torch.manual_seed(123)
    network = ResUNetASPP(out_channels=5, channels=TINY_CHANNELS)
    return load_weights(network, checkpoint, "solid").eval()


def _solid(root, **options):
    return load_stage("solid", BUNDLES / "flare22_fine_solid", "cpu", {"bundle_root": str(root), **OVERRIDES},
                      engine="torch", **options)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_a_network_built_without_initialisation_holds_the_checkpoint_exactly(tmp_path, dtype):
    checkpoint = _checkpoint(tmp_path / "models" / "model.pt", dtype=dtype)
    parser = read_stage_config(BUNDLES / "flare22_fine_solid", {"bundle_root": str(tmp_path), **OVERRIDES})
    network = build_with_weights(parser, checkpoint, "solid")
    saved = torch.load(checkpoint, weights_only=True)["model"]
    reference = _reference(checkpoint)
    own = network.state_dict()
    assert own.keys() == saved.keys() == reference.state_dict().keys()
    for key, value in own.items():
        assert not value.is_meta and value.dtype == torch.float32 and value.is_contiguous()
        assert torch.equal(value, saved[key].float()), key
    assert all(isinstance(p, torch.nn.Parameter) and p.requires_grad for p in network.parameters())
    x = torch.rand(1, 1, *TINY_GRID, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(network.eval()(x), reference(x))


def test_a_stage_loads_its_weights_through_the_meta_build(tmp_path):
    checkpoint = _checkpoint(tmp_path / "models" / "model.pt", seed=3, wrap=False)
    stage = _solid(tmp_path)
    x = torch.rand(1, *TINY_GRID, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = torch.softmax(_reference(checkpoint)(x[None]), dim=1)
    assert torch.equal(stage.predict(x, amp=False), expected)
    assert not stage.network.training


def test_a_checkpoint_that_does_not_fit_is_still_one_clear_error(tmp_path):
    checkpoint = tmp_path / "models" / "model.pt"
    checkpoint.parent.mkdir(parents=True)
    torch.save(ResUNetASPP(out_channels=5, channels=[4, 8, 8, 8, 16]).state_dict(), checkpoint)
    with pytest.raises(InputError, match="does not fit the stage's network"):
        _solid(tmp_path)


class WithBuffer(torch.nn.Module):
    """A module with a tensor no checkpoint holds (a non-persistent buffer, set by its constructor)."""

    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(3, 2)
        self.register_buffer("offset", torch.arange(2.0) + 0.5, persistent=False)

    def forward(self, x):
        return self.linear(x) + self.offset


class ComputesOnInit(torch.nn.Module):
    """A constructor that reads a value out of its own tensor: it cannot run on the meta device."""

    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(3, 2)
        self.scale = float(torch.ones(1).sum().item())


@pytest.mark.parametrize("module", [WithBuffer, ComputesOnInit])
def test_a_network_the_meta_build_cannot_make_is_built_the_usual_way(tmp_path, module):
    torch.manual_seed(5)
    saved = module().state_dict()
    torch.save(saved, tmp_path / "model.pt")
    parser = ConfigParser({"network_def": {"_target_": f"{__name__}.{module.__name__}"}})
    network = build_with_weights(parser, tmp_path / "model.pt", "test")
    assert not any(t.is_meta for t in [*network.parameters(), *network.buffers()])
    for key, value in saved.items():
        assert torch.equal(network.state_dict()[key], value)
    if module is WithBuffer:
        assert torch.equal(network.offset, torch.tensor([0.5, 1.5]))


# -- the checkpoint hash, remembered between processes -------------------------------------------------------------


@pytest.fixture
def hashing(tmp_path, monkeypatch):
    """A private cache and a count of the checkpoint reads that hashing does."""
    monkeypatch.setenv("FLARE_C2F_CACHE", str(tmp_path / "cache"))
    reads = []
    original = files.file_sha256

    def counted(path):
        reads.append(path)
        return original(path)

    monkeypatch.setattr(files, "file_sha256", counted)
    return reads


def _write(path, content: bytes):
    path.write_bytes(content)
    time.sleep(0.05)  # the next hash starts after the file's last change, by more than a clock tick


def test_a_remembered_hash_spares_reading_the_checkpoint_again(tmp_path, hashing, monkeypatch):
    monkeypatch.setattr(files, "HASH_MEMO_MARGIN_S", 0.0)
    checkpoint = tmp_path / "model.pt"
    _write(checkpoint, b"weights" * 1000)
    expected = hashlib.sha256(checkpoint.read_bytes()).hexdigest()
    assert engines.checkpoint_sha256(checkpoint) == expected
    assert engines.checkpoint_sha256(checkpoint) == expected
    assert len(hashing) == 1


def test_a_checkpoint_changed_in_place_is_hashed_again_even_with_its_old_mtime(tmp_path, hashing, monkeypatch):
    monkeypatch.setattr(files, "HASH_MEMO_MARGIN_S", 0.0)
    checkpoint = tmp_path / "model.pt"
    _write(checkpoint, b"a" * 4096)
    before = checkpoint.stat()
    first = engines.checkpoint_sha256(checkpoint)
    with open(checkpoint, "r+b") as handle:  # same size, same inode
        handle.seek(100)
        handle.write(b"b")
    os.utime(checkpoint, ns=(before.st_atime_ns, before.st_mtime_ns))  # as a copy that keeps times would
    assert checkpoint.stat().st_mtime_ns == before.st_mtime_ns and checkpoint.stat().st_size == before.st_size
    changed = engines.checkpoint_sha256(checkpoint)
    assert changed != first and changed == hashlib.sha256(checkpoint.read_bytes()).hexdigest()
    replaced = tmp_path / "other.pt"
    _write(replaced, b"c" * 4096)
    os.replace(replaced, checkpoint)  # another file moved over it
    assert engines.checkpoint_sha256(checkpoint) == hashlib.sha256(b"c" * 4096).hexdigest()
    assert len(hashing) == 3


def test_a_hash_taken_right_after_a_change_is_not_remembered(tmp_path, hashing):
    checkpoint = tmp_path / "model.pt"
    checkpoint.write_bytes(b"fresh" * 100)  # changed now: within the margin, the file's stamps cannot be trusted
    assert engines.checkpoint_sha256(checkpoint) == engines.checkpoint_sha256(checkpoint)
    assert len(hashing) == 2
    assert not (tmp_path / "cache" / "openvino" / "sha256").exists()


# -- OpenVINO models compiled in the background ---------------------------------------------------------------------


def _coarse_stage(root, engine="openvino"):
    overrides = {"bundle_root": str(root), **OVERRIDES}
    return load_stage("coarse", BUNDLES / "flare22_coarse", "cpu", overrides, engine=engine, amp=False)


def _coarse_checkpoint(root):
    torch.manual_seed(7)
    checkpoint = root / "models" / "model.pt"
    checkpoint.parent.mkdir(parents=True, exist_ok=True)
    torch.save(ResUNetASPP(out_channels=14, channels=TINY_CHANNELS).state_dict(), checkpoint)


def test_a_cached_model_compiled_in_the_background_gives_the_converted_models_output(tmp_path, monkeypatch):
    monkeypatch.setenv("FLARE_C2F_CACHE", str(tmp_path / "cache"))
    _coarse_checkpoint(tmp_path)
    converted = _coarse_stage(tmp_path)  # converted now and cached
    cached = _coarse_stage(tmp_path)  # from the cache: compiled on the background thread
    assert cached.network is None and isinstance(cached.engine._compiled, Future)
    x = torch.rand(1, *TINY_GRID, generator=torch.Generator().manual_seed(2))
    assert torch.equal(cached.predict(x, amp=False), converted.predict(x, amp=False))
    reference = _coarse_stage(tmp_path, engine="torch").predict(x, amp=False)
    assert torch.allclose(cached.predict(x, amp=False), reference, atol=1e-4)


def test_a_cached_model_that_cannot_be_compiled_says_which_file_to_delete(tmp_path, monkeypatch):
    monkeypatch.setenv("FLARE_C2F_CACHE", str(tmp_path / "cache"))
    _coarse_checkpoint(tmp_path)
    _coarse_stage(tmp_path)
    (xml,) = (tmp_path / "cache" / "openvino").glob("*/model.xml")
    xml.write_text("<net><layers>truncated")
    stage = _coarse_stage(tmp_path)
    with pytest.raises(engines.EngineError, match=f"{xml}: the cached OpenVINO model of the coarse stage"):
        stage.predict(torch.zeros(1, *TINY_GRID), amp=False)


# -- the package's imports --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("before", [True, False])
def test_importing_the_package_leaves_garbage_collection_as_it_was(before):
    code = (
        "import gc\n"
        f"{'' if before else 'gc.disable()'}\n"
        "import flare_c2f_extensions.__main__\n"
        "print(gc.isenabled())\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert result.stdout.strip() == str(before)


def test_the_command_line_freezes_the_imports_objects():
    code = (
        "import gc\n"
        "from flare_c2f_extensions.__main__ import main\n"
        "try:\n"
        "    main(['segment'])\n"
        "except SystemExit as exit:\n"
        "    print(exit.code)\n"
        "print(gc.get_freeze_count() > 10000, gc.isenabled())\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert result.stdout.splitlines()[-1] == "True True"
    assert result.stdout.splitlines()[-2].startswith("error: segment needs an input and an output")


def test_program_exit_keeps_status_and_outputs(tmp_path):
    """The program skips the interpreter's teardown: its exit status and written files must be as before."""
    import subprocess
    import sys

    import nibabel as nib

    def program(*args):
        return subprocess.run([sys.executable, "-m", "flare_c2f_extensions", *args], capture_output=True, text=True,
                              cwd=tmp_path, timeout=300)

    done = program("phantom", "--out", str(tmp_path / "cohort"), "--n", "1", "--shape", "32,32,16")
    assert done.returncode == 0, done.stderr
    images = sorted((tmp_path / "cohort" / "imagesTr").glob("*.nii.gz"))
    assert len(images) == 1 and nib.load(str(images[0])).get_fdata().shape == (32, 32, 16)
    missing = program("segment", "-i", str(tmp_path / "absent.nii.gz"), "-o", str(tmp_path / "out"))
    assert missing.returncode == 1 and "absent.nii.gz" in missing.stderr and "Traceback" not in missing.stderr
    assert program("no_such_command").returncode == 2


def test_segment_imports_neither_ignite_nor_pydicom_for_a_nifti_and_still_reads_a_dicom_series(tmp_path):
    """Issue 21: MONAI imports ignite, pydicom, scipy.signal and scipy.sparse whenever they are installed (about 1.5 s
    of every start); ``segment`` does not use ignite or those two parts of scipy, and pydicom only for a DICOM input,
    where it is imported on the way. The quality signals still use scipy.ndimage."""
    import json

    import nibabel as nib

    from helpers import TINY_STAGES, write_dicom_series, write_phantom

    nifti = write_phantom(tmp_path / "a_0000.nii.gz")
    series = write_dicom_series(nib.load(str(nifti)), tmp_path / "series")
    options = ["--require_weights", "false", "--threads", "1", "--stage_overrides", json.dumps(TINY_STAGES)]
    code = (
        "import sys\n"
        "from flare_c2f_extensions.cli.commands import main\n"
        f"main(['segment', '-i', {str(nifti)!r}, '-o', {str(tmp_path / 'a.nii.gz')!r}, *{options!r}])\n"
        "print('after nifti', 'ignite' in sys.modules, 'pydicom' in sys.modules)\n"
        "print('scipy parts', *(name in sys.modules for name in ('scipy.signal', 'scipy.sparse', 'scipy.ndimage')))\n"
        f"main(['segment', '-i', {str(series)!r}, '-o', {str(tmp_path / 's.nii.gz')!r}, *{options!r}])\n"
        "print('after series', 'ignite' in sys.modules, 'pydicom' in sys.modules)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "after nifti False False" in result.stdout, result.stdout
    assert "after series False True" in result.stdout, result.stdout
    assert "scipy parts False False True" in result.stdout, result.stdout
    assert nib.load(str(tmp_path / "s.nii.gz")).shape == nib.load(str(nifti)).shape
