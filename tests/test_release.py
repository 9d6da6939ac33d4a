"""Release zips: reproducible packing, ``monai.bundle download --url`` from a loopback server for every bundle,
the downloaded bundles run, ``monai.bundle load``, large_files.yml weights, and refusal of bad downloads."""

from __future__ import annotations

import functools
import hashlib
import http.server
import json
import os
import shutil
import subprocess
import sys
import threading
import zipfile
import zlib

import nibabel as nib
import pytest
import torch

from flare_c2f_extensions.paths import STAGE_BUNDLES as CASCADE_STAGES
from flare_c2f_extensions.releases.bundles import ReleaseError, download_release, pack, verify_release

from helpers import BUNDLES, TINY, TINY_CHANNELS

pytestmark = [
    pytest.mark.filterwarnings("ignore:No hash value provided"),  # monai.bundle download --url checks no hash
    pytest.mark.filterwarnings("ignore:parsing config_file"),  # monai.bundle load: we trust our own configs
]

STAGE_BUNDLES = list(CASCADE_STAGES.values())
ALL_BUNDLES = [*STAGE_BUNDLES, "flare22_cascade"]
ORGANS = ["right_adrenal_gland", "left_adrenal_gland", "gallbladder", "esophagus"]
VERSION = {b: json.loads((BUNDLES / b / "configs" / "metadata.json").read_text())["version"] for b in ALL_BUNDLES}




def _zip_name(bundle):
    return f"{bundle}_v{VERSION[bundle]}.zip"


def _tiny_network(bundle):
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(BUNDLES / bundle / "configs" / "inference.json"))
    parser["network_def#channels"] = TINY_CHANNELS
    return parser.get_parsed_content("network_def")


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A copy of every bundle with tiny random weights, and some clutter that must not be packed."""
    root = tmp_path_factory.mktemp("source")
    torch.manual_seed(0)
    for bundle in ALL_BUNDLES:
        shutil.copytree(BUNDLES / bundle, root / bundle, ignore=shutil.ignore_patterns("eval", "__pycache__", "*.pt"))
        if bundle in STAGE_BUNDLES:
            names = [f"model_{o}.pt" for o in ORGANS] if bundle == "flare22_small_refiner" else ["model.pt"]
            for name in names:
                torch.save(_tiny_network(bundle).state_dict(), root / bundle / "models" / name)
    clutter = root / "flare22_coarse"
    (clutter / "eval").mkdir()
    (clutter / "eval" / "old_prediction.nii.gz").write_bytes(b"x")
    (clutter / "configs" / "__pycache__").mkdir()
    (clutter / "configs" / "__pycache__" / "x.cpython-311.pyc").write_bytes(b"x")
    (clutter / ".DS_Store").write_bytes(b"x")
    for folder in ("logs", "train_state"):  # what `flare-c2f train` leaves in a bundle
        (clutter / folder).mkdir()
        (clutter / folder / "train_coarse.log").write_text("x")
    return root


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):  # keep the test output clean
        pass


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """A loopback HTTP server (127.0.0.1, a free port, one thread) serving a folder; shut down at teardown."""
    root = tmp_path_factory.mktemp("www")
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_QuietHandler, directory=str(root)))
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()
    thread.join(timeout=10)


@pytest.fixture(scope="module")
def released(source, server):
    """Every bundle packed with weights inside, published at <server>/inside/."""
    www, base = server
    out = www / "inside"
    items = pack(out, ALL_BUNDLES, "inside", bundles_dir=source)
    return {item["name"]: item for item in items}, f"{base}/inside"


# -- packing -----------------------------------------------------------------------------------------------------


def test_packing_twice_gives_identical_bytes(source, tmp_path):
    first = pack(tmp_path / "a", ALL_BUNDLES, bundles_dir=source)
    train = source / "flare22_coarse" / "configs" / "train.json"
    os.utime(train, (1e9, 1e9))  # another time stamp and mode must not change the zip
    os.chmod(train, 0o600)
    try:
        second = pack(tmp_path / "b", ALL_BUNDLES, bundles_dir=source)
    finally:
        os.chmod(train, 0o644)
    for a, b in zip(first, second):
        name = _zip_name(a["name"])
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
        assert a["sha256"] == b["sha256"]
        sidecar = (tmp_path / "a" / (_zip_name(a["name"]) + ".sha256")).read_text()
        assert sidecar == f"{a['sha256']}  {_zip_name(a['name'])}\n"  # sha256sum -c format
    lg1 = pack(tmp_path / "c", ["flare22_small_refiner"], "large_files", "http://h/r", bundles_dir=source)
    lg2 = pack(tmp_path / "d", ["flare22_small_refiner"], "large_files", "http://h/r", bundles_dir=source)
    assert lg1[0]["sha256"] == lg2[0]["sha256"]


def test_zip_layout(released):
    items, _ = released
    for bundle in ALL_BUNDLES:
        with zipfile.ZipFile(items[bundle]["zip"]) as archive:
            infos = archive.infolist()
        names = [i.filename for i in infos]
        assert names == sorted(names)
        assert {n.split("/")[0] for n in names} == {bundle}  # one top-level folder
        assert all(i.date_time == (1980, 1, 1, 0, 0, 0) for i in infos)
        assert all((i.external_attr >> 16) & 0o7777 == 0o644 for i in infos)
        assert f"{bundle}/configs/metadata.json" in names and f"{bundle}/LICENSE" in names
        assert not any(f"/{d}/" in n for d in ("eval", "logs", "train_state", "__pycache__") for n in names), names
        assert not any("/." in n for n in names), names
    refiner = {n for n in zipfile.ZipFile(items["flare22_small_refiner"]["zip"]).namelist() if "/models/" in n}
    assert refiner == {f"flare22_small_refiner/models/model_{o}.pt" for o in ORGANS}


def test_version_needs_a_changelog_entry(source, tmp_path):
    bundle = tmp_path / "flare22_coarse"
    shutil.copytree(source / "flare22_coarse", bundle)
    meta = json.loads((bundle / "configs" / "metadata.json").read_text())
    meta["version"] = "9.9.9"
    (bundle / "configs" / "metadata.json").write_text(json.dumps(meta))
    with pytest.raises(ReleaseError, match="changelog has no entry for version 9.9.9"):
        pack(tmp_path / "out", ["flare22_coarse"], bundles_dir=tmp_path)


def test_pack_command_line(source, tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "flare_c2f_extensions", "pack", "--out", str(tmp_path), "--bundles", "flare22_cascade",
         "--bundles_dir", str(source)],
        capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    digest = hashlib.sha256((tmp_path / _zip_name("flare22_cascade")).read_bytes()).hexdigest()
    assert done.stdout.split()[0] == digest


# -- download ----------------------------------------------------------------------------------------------------


def _download(name, url, bundle_dir):
    from monai.bundle import download

    download(name=name, url=url, bundle_dir=str(bundle_dir), progress=False)


def _infer(bundle_root, cohort, **overrides):
    from monai.bundle import ConfigWorkflow

    configs = bundle_root / "configs"
    workflow = ConfigWorkflow(
        config_file=str(configs / "inference.json"), meta_file=str(configs / "metadata.json"),
        logging_file=str(configs / "logging.conf"), workflow_type="infer", bundle_root=str(bundle_root),
        dataset_dir=str(cohort), **overrides,
    )
    workflow.initialize()
    assert not workflow.check_properties()
    workflow.run()
    workflow.finalize()


@pytest.fixture(scope="module")
def downloaded(released, tmp_path_factory):
    """Every release downloaded with ``monai.bundle download --url`` into one folder (the command line for the
    coarse bundle, the same function in-process for the others)."""
    _, base = released
    target = tmp_path_factory.mktemp("downloaded")
    done = subprocess.run(
        [sys.executable, "-m", "monai.bundle", "download", "--name", "flare22_coarse", "--url",
         f"{base}/{_zip_name('flare22_coarse')}", "--bundle_dir", str(target)],
        capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    for bundle in ALL_BUNDLES[1:]:
        _download(bundle, f"{base}/{_zip_name(bundle)}", target)
    return target


def test_every_bundle_downloads_with_its_files(downloaded, released, source):
    items, _ = released
    for bundle in ALL_BUNDLES:
        root = downloaded / bundle
        files = sorted(
            p.relative_to(downloaded).as_posix() for p in root.rglob("*") if p.is_file() and "eval" not in p.parts
        )
        assert files == sorted(items[bundle]["files"]), bundle
        for name in items[bundle]["files"]:
            assert (downloaded / name).read_bytes() == (source / name).read_bytes(), name


def test_downloaded_bundles_run(downloaded, cohort):
    """Inference of every downloaded bundle, each reading the previous stage's output as a sibling; then the
    cascade bundle from its own folder with the user's command line."""
    cases = sorted(p.name.replace("_0000.nii.gz", ".nii.gz") for p in (cohort / "imagesTs").glob("*.nii.gz"))
    for bundle in STAGE_BUNDLES:
        _infer(downloaded / bundle, cohort, **TINY)
        out = downloaded / bundle / "eval" / ("gallbladder" if bundle == "flare22_small_refiner" else "")
        assert sorted(p.name for p in out.glob("*.nii.gz")) == cases, bundle
    stage_overrides = {s: {"network_def": {"channels": TINY_CHANNELS}, "spatial_size": [32, 32, 32]}
                       for s in ("coarse", "solid", "digestive", "vessels", "locator", "refiner")}
    done = subprocess.run(
        [sys.executable, "-m", "monai.bundle", "run", "--config_file", "configs/inference.json",
         "--logging_file", "configs/logging.conf", "--dataset_dir", str(cohort), "--progress", "False",
         "--stage_overrides", repr(stage_overrides)],
        cwd=downloaded / "flare22_cascade", capture_output=True, text=True, timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    for case in cases:
        written = nib.load(str(downloaded / "flare22_cascade" / "eval" / case))
        source_image = nib.load(str(cohort / "imagesTs" / case.replace(".nii.gz", "_0000.nii.gz")))
        assert written.shape == source_image.shape


def test_monai_load_returns_the_network_with_its_weights(downloaded, source):
    from monai.bundle import load

    for bundle in STAGE_BUNDLES:
        model_file = "models/model_esophagus.pt" if bundle == "flare22_small_refiner" else "models/model.pt"
        network = load(
            name=bundle, bundle_dir=str(downloaded), workflow_type="inference", model_file=model_file,
            net_override={"channels": TINY_CHANNELS}, device="cpu",
        )
        assert isinstance(network, torch.nn.Module), bundle
        saved = torch.load(source / bundle / model_file, weights_only=True)
        state = network.state_dict()
        assert state.keys() == saved.keys()
        assert all(torch.equal(state[k], saved[k]) for k in saved), bundle


def test_github_release_layout(released, server, tmp_path, monkeypatch):
    """``--source github --repo OWNER/REPO/TAG --version V`` fetches <name>_v<V>.zip from that release."""
    import monai.bundle.scripts as scripts

    items, _ = released
    www, base = server
    release = www / "owner" / "flare-c2f" / "releases" / "download" / "v1"
    release.mkdir(parents=True)
    shutil.copy(items["flare22_fine_vessels"]["zip"], release)
    github_url, seen = scripts._get_git_release_url, []

    def loopback(owner, repo, tag_name, filename):  # the same path as on GitHub, served from 127.0.0.1
        seen.append(github_url(owner, repo, tag_name, filename))
        return f"{base}/{owner}/{repo}/releases/download/{tag_name}/{filename}"

    monkeypatch.setattr(scripts, "_get_git_release_url", loopback)
    scripts.download(name="flare22_fine_vessels", version=VERSION["flare22_fine_vessels"], source="github",
                     repo="owner/flare-c2f/v1", bundle_dir=str(tmp_path), progress=False)
    assert seen == [f"https://github.com/owner/flare-c2f/releases/download/v1/{_zip_name('flare22_fine_vessels')}"]
    assert (tmp_path / "flare22_fine_vessels" / "models" / "model.pt").is_file()


# -- weights as large files --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def large_release(source, server):
    www, base = server
    out = www / "large"
    items = pack(out, ["flare22_small_refiner", "flare22_coarse"], "large_files", f"{base}/large", bundles_dir=source)
    return {item["name"]: item for item in items}, f"{base}/large", out


def test_large_files_yml_lists_weights_with_sha256(large_release, source):
    import yaml

    items, base, out = large_release
    with zipfile.ZipFile(items["flare22_small_refiner"]["zip"]) as archive:
        names = archive.namelist()
        listed = yaml.safe_load(archive.read("flare22_small_refiner/large_files.yml"))["large_files"]
    assert not any(n.endswith(".pt") for n in names)
    assert [e["path"] for e in listed] == [f"models/model_{o}.pt" for o in sorted(ORGANS)]
    for entry in listed:
        assert set(entry) == {"path", "url", "hash_val", "hash_type"} and entry["hash_type"] == "sha256"
        asset = out / entry["url"].rsplit("/", 1)[1]
        assert entry["url"] == f"{base}/flare22_small_refiner_v{VERSION['flare22_small_refiner']}_{entry['path'][7:]}"
        assert hashlib.sha256(asset.read_bytes()).hexdigest() == entry["hash_val"]
        assert asset.read_bytes() == (source / "flare22_small_refiner" / entry["path"]).read_bytes()


def test_large_files_download_and_hash_refusal(large_release, tmp_path):
    from monai.apps.utils import HashCheckError
    from monai.bundle import download_large_files

    items, base, out = large_release
    _download("flare22_coarse", f"{base}/{_zip_name('flare22_coarse')}", tmp_path / "good")
    download_large_files(bundle_path=str(tmp_path / "good" / "flare22_coarse"))
    assert (tmp_path / "good" / "flare22_coarse" / "models" / "model.pt").is_file()

    asset = out / f"flare22_coarse_v{VERSION['flare22_coarse']}_model.pt"
    original = asset.read_bytes()
    asset.write_bytes(original[:-8] + b"tampered")  # the server now holds other weights
    try:
        _download("flare22_coarse", f"{base}/{_zip_name('flare22_coarse')}", tmp_path / "bad")
        with pytest.raises(HashCheckError, match="hash check of downloaded file failed"):
            download_large_files(bundle_path=str(tmp_path / "bad" / "flare22_coarse"))
        assert not (tmp_path / "bad" / "flare22_coarse" / "models" / "model.pt").exists()
        with pytest.raises(ReleaseError, match="large_files.yml failed its hash check"):
            download_release(f"{base}/{_zip_name('flare22_coarse')}", tmp_path / "ours")
        assert list((tmp_path / "ours").iterdir()) == []  # nothing left behind
    finally:
        asset.write_bytes(original)
    bundle = download_release(f"{base}/{_zip_name('flare22_coarse')}", tmp_path / "ours")
    assert (bundle / "models" / "model.pt").read_bytes() == original


# -- refusals ----------------------------------------------------------------------------------------------------


def _publish(server, folder, name, data):
    www, base = server
    (www / folder).mkdir(exist_ok=True)
    (www / folder / name).write_bytes(data)
    return f"{base}/{folder}/{name}"


def _flip_inside_member(data: bytes, member: str) -> bytes:
    """Flip one byte in the middle of a member's compressed data (the zip's directory stays valid)."""
    import io

    info = zipfile.ZipFile(io.BytesIO(data)).getinfo(member)
    header = info.header_offset
    name_len = int.from_bytes(data[header + 26 : header + 28], "little")
    extra_len = int.from_bytes(data[header + 28 : header + 30], "little")
    at = header + 30 + name_len + extra_len + info.compress_size // 2
    return data[:at] + bytes([data[at] ^ 0xFF]) + data[at + 1 :]


def test_corrupted_downloads_are_refused(released, server, tmp_path):
    items, _ = released
    good = open(items["flare22_coarse"]["zip"], "rb").read()
    expected = items["flare22_coarse"]["sha256"]
    name = _zip_name("flare22_coarse")
    bad = {
        "truncated": good[: len(good) // 2],
        "flipped": _flip_inside_member(good, "flare22_coarse/configs/train.json"),
    }
    for kind, data in bad.items():
        url = _publish(server, kind, name, data)
        _publish(server, kind, name + ".sha256", f"{expected}  {name}\n".encode())  # the published hash
        # monai.bundle download --url fails too (no hash check: the zip itself is broken) ...
        with pytest.raises((zipfile.BadZipFile, zlib.error)):
            _download("flare22_coarse", url, tmp_path / "monai" / kind)
        # ... ours says why, before extracting anything
        with pytest.raises(ReleaseError, match="sha256 mismatch"):
            verify_release(tmp_path / "monai" / kind / "flare22_coarse.zip", expected)
        with pytest.raises(ReleaseError, match="sha256 mismatch.*corrupted or was tampered with"):
            download_release(url, tmp_path / "ours" / kind)
        assert list((tmp_path / "ours" / kind).iterdir()) == []
    with pytest.raises(ReleaseError, match="cannot download"):
        download_release(f"{server[1]}/nowhere/{name}", tmp_path / "ours" / "missing")
    flipped = tmp_path / "monai" / "flipped" / "flare22_coarse.zip"
    with pytest.raises(ReleaseError, match="corrupted zip"):  # with its own hash: the CRC check still refuses it
        verify_release(flipped, hashlib.sha256(flipped.read_bytes()).hexdigest())


def test_tampered_but_valid_zip_passes_monai_and_fails_verification(released, server, tmp_path):
    """monai.bundle download --url checks no hash: only the published sha256 catches a rebuilt zip."""
    items, _ = released
    name = _zip_name("flare22_coarse")
    tampered = tmp_path / "tampered" / name
    tampered.parent.mkdir()
    with zipfile.ZipFile(items["flare22_coarse"]["zip"]) as src, zipfile.ZipFile(tampered, "w") as dst:
        for info in src.infolist():
            data = src.read(info)
            if info.filename.endswith("inference.json"):
                data = data.replace(b'"$import torch"', b'"$import torch; print(\'evil\')"')
            dst.writestr(info, data)
    url = _publish(server, "tampered", name, tampered.read_bytes())
    _download("flare22_coarse", url, tmp_path / "monai")  # accepted
    assert b"evil" in (tmp_path / "monai" / "flare22_coarse" / "configs" / "inference.json").read_bytes()

    with pytest.raises(ReleaseError, match="cannot fetch the published hash"):
        download_release(url, tmp_path / "ours")  # no <url>.sha256 published: --sha256 is needed
    (tmp_path / "tampered" / (name + ".sha256")).write_text(f"{items['flare22_coarse']['sha256']}  {name}\n")
    done = subprocess.run(
        [sys.executable, "-m", "flare_c2f_extensions", "verify_release", "--zip", str(tampered)],
        capture_output=True, text=True, timeout=120,
    )
    assert done.returncode != 0
    assert "sha256 mismatch" in done.stderr and "Traceback" not in done.stderr
    with pytest.raises(ReleaseError, match="sha256 mismatch"):
        download_release(url, tmp_path / "ours", sha256=items["flare22_coarse"]["sha256"])
    assert list((tmp_path / "ours").iterdir()) == []
    assert verify_release(items["flare22_coarse"]["zip"])["sha256"] == items["flare22_coarse"]["sha256"]  # sidecar


def _evil_zip(path, entries):
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("flare22_coarse/configs/metadata.json", json.dumps({"version": VERSION["flare22_coarse"]}))
        for name in entries:
            archive.writestr(zipfile.ZipInfo(name), b"owned")
    return path


@pytest.mark.parametrize(
    "case, entry, monai_refuses",
    [
        ("parent", "flare22_coarse/../../evil.txt", True),  # escapes the download folder
        ("absolute", "/tmp/flare_c2f_evil_absolute.txt", True),
        ("sibling", "flare22_coarse/../evil.txt", False),  # stays in the download folder, leaves the bundle's
        ("second_top", "other_bundle/evil.txt", False),  # a second top-level folder
    ],
)
def test_escaping_entries_are_refused(case, entry, monai_refuses, server, tmp_path):
    name = _zip_name("flare22_coarse")
    evil = _evil_zip(tmp_path / name, [entry])
    digest = hashlib.sha256(evil.read_bytes()).hexdigest()  # a hash that matches: the paths must be refused
    with pytest.raises(ReleaseError, match="refused: entry"):
        verify_release(evil, digest)
    url = _publish(server, f"evil_{case}", name, evil.read_bytes())
    with pytest.raises(ReleaseError, match="refused: entry"):
        download_release(url, tmp_path / "ours" / "inner", sha256=digest)
    assert list((tmp_path / "ours" / "inner").iterdir()) == []
    assert not (tmp_path / "ours" / "evil.txt").exists()
    if monai_refuses:  # MONAI 1.6.1 refuses these itself (safe_extract_member)
        with pytest.raises(ValueError, match="Unsafe path"):
            _download("flare22_coarse", url, tmp_path / "monai" / "inner")
        assert not (tmp_path / "monai" / "evil.txt").exists()
    assert not os.path.exists("/tmp/flare_c2f_evil_absolute.txt")
