"""Issue 20 ("nothing lost, nothing silent"), items 7, 8, 12, 13 and 14: pseudo-labels, evaluation and release
downloads. A finished pseudo-label belongs to the input it was made from, a failed case shows in the exit status,
evaluation refuses what cannot be scored before reading voxels, and a download is bounded and leaves nothing behind.

The pseudo-label tests use a stand-in teacher (:class:`SlabTeacher`): it reads each CT the way the cascade does, so
the input warnings are the real ones, and answers with every organ at full confidence, so the quality gate keeps a
case unless something else is wrong with it.
"""

from __future__ import annotations

import gzip
import hashlib
import http.server
import json
import os
import signal
import subprocess
import sys
import threading
import time
import zipfile

import nibabel as nib
import numpy as np
import pytest

from flare_c2f_extensions.cascade.pipeline import CaseResult
from flare_c2f_extensions.errors import InputError
from flare_c2f_extensions.evaluation.metrics import evaluate_case, evaluate_folder
from flare_c2f_extensions.io.discovery import case_name
from flare_c2f_extensions.io.images import image_geometry, read_ct
from flare_c2f_extensions.labels import ORGANS
from flare_c2f_extensions.releases.bundles import ReleaseError, download_release, verify_release
from flare_c2f_extensions.runs.pseudo_label import pseudo_label

from helpers import BUNDLES, REPO, TINY_STAGES, save

CLI_ENV = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
AFFINE = np.diag([1.5, 1.5, 2.5, 1.0])
COARSE_VERSION = json.loads((BUNDLES / "flare22_coarse" / "configs" / "metadata.json").read_text())["version"]


def _cli(*args, timeout=300) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "flare_c2f_extensions", *map(str, args)]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=CLI_ENV)


def _ct(path, shape=(24, 20, 16), seed=0, lowest_hu=-1000):
    """A CT-like int16 image: uniform HU from ``lowest_hu`` to 400 (above -500 it has no air: not a CT)."""
    hu = np.random.default_rng(seed).uniform(lowest_hu, 400, shape)
    return save(np.rint(hu), AFFINE, path, np.int16)


class SlabTeacher:
    """A stand-in teacher: reads the CT as the cascade does (its input warnings are logged), then gives every organ
    a slab along the first array axis at full confidence, nothing dropped. Records the cases it segmented."""

    device = "cpu"

    def __init__(self):
        self.segmented = []

    def segment(self, image, keep_confidence=False):
        read_ct(image)
        shape = image_geometry(image).shape
        slabs = (np.arange(shape[0]) * (len(ORGANS) + 1) // shape[0]).astype(np.uint8)
        labels = np.ascontiguousarray(np.broadcast_to(slabs[:, None, None], shape))
        self.segmented.append(case_name(image))
        return CaseResult(labels, confidence=np.ones(shape, np.float32), dropped={})


# -- item 7: pseudo_label --------------------------------------------------------------------------------------------


def test_pseudo_label_exits_3_when_a_case_fails(tmp_path):
    """Every case failing used to end with exit status 0; now 3 (as segment and evaluate), the report first."""
    images = tmp_path / "images"
    save(np.full((24, 20, 16), np.nan, np.float32), AFFINE, images / "all_nan_0000.nii.gz", np.float32)
    done = _cli("pseudo_label", "--bundles_dir", BUNDLES, "-i", images, "-o", tmp_path / "out", "--device", "cpu",
                "--require_weights", "false", "--stage_overrides", json.dumps(TINY_STAGES))
    assert done.returncode == 3, done.stderr[-3000:]
    report = json.loads((tmp_path / "out" / "quality.json").read_text())
    assert report["num_failed"] == 1 and report["cases"][0]["status"] == "failed"
    assert "Traceback" not in done.stderr
    assert "all_nan_0000.nii.gz" in done.stderr and "no finite voxel" in done.stderr


def test_pseudo_label_redoes_a_case_whose_input_changed(tmp_path):
    """A CT replaced by another of the same name used to keep its old pseudo-label (kept.json then paired a
    96x96x64 image with a 48x48x32 label): a finished case is recognised by its input's sha256."""
    images, out, teacher = tmp_path / "images", tmp_path / "pseudo", SlabTeacher()
    image = _ct(images / "case_0000.nii.gz", shape=(24, 20, 16), seed=1)
    pseudo_label(teacher, images, out, progress=False)
    _ct(image, shape=(32, 28, 20), seed=2)
    report = pseudo_label(teacher, images, out, progress=False)
    assert teacher.segmented == ["case", "case"]
    assert report["cases"][0]["status"] == "done"
    signals = json.loads((out / "signals" / "case.json").read_text())
    assert signals["input_sha256"] == hashlib.sha256(image.read_bytes()).hexdigest()
    kept = json.loads((out / "kept.json").read_text())
    assert len(kept) == 1 and nib.load(kept[0]["label"]).shape == nib.load(kept[0]["image"]).shape == (32, 28, 20)
    again = pseudo_label(teacher, images, out, progress=False)  # unchanged now: reused
    assert again["cases"][0]["status"] == "exists" and teacher.segmented == ["case", "case"]


def test_kept_json_holds_absolute_paths(tmp_path, monkeypatch):
    """kept.json is read by trainings that run in other folders: its paths must not depend on this one."""
    _ct(tmp_path / "images" / "case_0000.nii.gz")
    monkeypatch.chdir(tmp_path)
    pseudo_label(SlabTeacher(), "images", "pseudo", progress=False)
    kept = json.loads((tmp_path / "pseudo" / "kept.json").read_text())
    assert len(kept) == 1
    expected = {"image": tmp_path / "images" / "case_0000.nii.gz",
                "label": tmp_path / "pseudo" / "labels" / "case.nii.gz"}
    for key, path in expected.items():
        assert os.path.isabs(kept[0][key]), kept
        assert os.path.samefile(kept[0][key], path)


def test_a_case_that_is_not_a_ct_is_not_kept(tmp_path):
    """The gate used to ignore the input warnings: an image with no air (not a CT in HU) was kept."""
    images, out, teacher = tmp_path / "images", tmp_path / "pseudo", SlabTeacher()
    _ct(images / "ct_0000.nii.gz", seed=3)
    _ct(images / "no_air_0000.nii.gz", seed=4, lowest_hu=-200)
    for run in ("first", "rerun"):  # the rerun gates again from the stored signals
        pseudo_label(teacher, images, out, progress=False)
        cases = {case["case"]: case for case in json.loads((out / "quality.json").read_text())["cases"]}
        assert cases["ct"]["keep"] is True, (run, cases["ct"]["reasons"])
        assert cases["no_air"]["keep"] is False, run
        assert any(reason.startswith("not a CT:") and "no voxel below" in reason
                   for reason in cases["no_air"]["reasons"]), (run, cases["no_air"]["reasons"])
    assert teacher.segmented == ["ct", "no_air"]
    assert [case_name(item["image"]) for item in json.loads((out / "kept.json").read_text())] == ["ct"]


# -- item 8: evaluate with no prediction matching a case -------------------------------------------------------------


def _label_map(path, shape=(16, 16, 8), affine=None):
    labels = np.zeros(shape, np.uint8)
    labels[4:10, 4:10, 2:6] = 1
    return save(labels, np.eye(4) if affine is None else affine, path, np.uint8)


def test_evaluate_refuses_predictions_that_match_no_case(tmp_path):
    """No prediction named like a ground-truth case used to score every case as empty (mean DSC 0, exit 0)."""
    gt, pred, out = tmp_path / "gt", tmp_path / "pred", tmp_path / "out"
    for case in ("FLARE22_Tr_0001", "FLARE22_Tr_0002"):
        _label_map(gt / f"{case}.nii.gz")
        _label_map(pred / f"{case}_seg.nii.gz")
    with pytest.raises(InputError) as info:
        evaluate_folder(str(pred), str(gt), str(out))
    for text in (str(pred), str(gt), "FLARE22_Tr_0001_seg", "FLARE22_Tr_0001"):
        assert text in str(info.value)
    assert not out.exists(), "refused before anything was written"
    done = _cli("evaluate", "--pred", pred, "--gt", gt, "--out", out)
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1 and done.stderr.startswith("error: "), done.stderr
    # some predictions missing, others matching: scored, the missing ones listed by name
    (pred / "FLARE22_Tr_0001_seg.nii.gz").rename(pred / "FLARE22_Tr_0001.nii.gz")
    done = _cli("evaluate", "--pred", pred, "--gt", gt, "--out", out)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "FLARE22_Tr_0002" in done.stdout
    assert json.loads((out / "summary.json").read_text())["missing_predictions"] == ["FLARE22_Tr_0002"]


# -- item 12: headers compared before voxels are read ----------------------------------------------------------------


def _header_only(path, shape, dtype):
    """A gzipped NIfTI whose header claims ``shape`` of ``dtype`` but which holds almost no voxels."""
    header = nib.Nifti1Header()
    header.set_data_shape(shape)
    header.set_data_dtype(dtype)
    header.set_qform(np.eye(4), 1)
    header.set_sform(np.eye(4), 1)
    header["vox_offset"] = 352
    path.write_bytes(gzip.compress(header.binaryblock + b"\0" * 4 + b"\0" * 4096))
    return path


def test_evaluate_compares_headers_before_reading_voxels(tmp_path, monkeypatch):
    """A 2 MB prediction claiming 1024x1024x512 float32 used to be inflated (4.6 GB) before the shapes were
    compared; now the headers decide, and the voxels a header may claim are bounded."""
    from nibabel.arrayproxy import ArrayProxy

    gt = _label_map(tmp_path / "case.nii.gz")
    claims_big = _header_only(tmp_path / "claims_big.nii.gz", (1024, 1024, 512), np.float32)
    too_many = _header_only(tmp_path / "too_many.nii.gz", (2048, 1024, 512), np.uint8)
    forbidden, read = {str(claims_big), str(too_many)}, ArrayProxy._get_scaled

    def guarded(self, *args, **kwargs):
        if str(self.file_like) in forbidden:
            raise AssertionError(f"the voxels of {self.file_like} were read")
        return read(self, *args, **kwargs)

    monkeypatch.setattr(ArrayProxy, "_get_scaled", guarded)
    with pytest.raises(InputError, match=r"claims_big.*\(1024, 1024, 512\).*\(16, 16, 8\)"):
        evaluate_case(claims_big, gt)
    with pytest.raises(InputError, match=r"too_many.*1073741824 voxels, more than"):
        evaluate_case(gt, too_many)
    assert evaluate_case(gt, gt)[1] == (1.0, 1.0)  # voxels of matching headers are read as before
    # in a folder run it is one failed case, with its reason
    for folder, source in (("pred", claims_big), ("gt", gt)):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "case.nii.gz").write_bytes(source.read_bytes())
    forbidden.add(str(tmp_path / "pred" / "case.nii.gz"))
    summary = evaluate_folder(str(tmp_path / "pred"), str(tmp_path / "gt"), str(tmp_path / "out"))
    assert "(1024, 1024, 512)" in summary["failed_cases"]["case"]


# -- item 13: bounded downloads that leave nothing behind ------------------------------------------------------------


class _EndlessHandler(http.server.BaseHTTPRequestHandler):
    """Sends zeros until the client goes away (paths under /claims/ announce a 10 GiB Content-Length first)."""

    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Type", "application/zip")
        if self.path.startswith("/claims/"):
            self.send_header("Content-Length", str(10 << 30))
        self.end_headers()
        try:
            while not self.server.stopping.is_set():
                self.wfile.write(b"\0" * (64 << 10))
                time.sleep(0.005)  # about 13 MB/s: the SIGTERM below arrives long before a disk fills
        except OSError:  # the client hung up
            pass

    def log_message(self, *args):
        pass


@pytest.fixture
def endless_server():
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _EndlessHandler)
    httpd.stopping = threading.Event()
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.stopping.set()
    httpd.shutdown()
    httpd.server_close()
    thread.join(timeout=10)


def _terminate_mid_download(command, target) -> tuple[int, str]:
    """Start ``command``, send it SIGTERM once its partial download has bytes; (exit status, stderr)."""
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=CLI_ENV)
    try:
        deadline = time.monotonic() + 60
        while not any(p.is_file() and p.stat().st_size > 0 for p in target.rglob("*")):
            assert process.poll() is None and time.monotonic() < deadline, f"no partial download in {target}"
            time.sleep(0.05)
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    return process.returncode, stderr


# download_release called as a library: a KeyboardInterrupt("terminated") must reach the caller
LIBRARY_CALL = """import sys
from flare_c2f_extensions.releases.bundles import download_release
try:
    download_release(sys.argv[1], sys.argv[2], sha256=sys.argv[3])
except KeyboardInterrupt as stop:
    sys.exit(f"interrupted: {stop}")
"""


def test_downloads_are_bounded_and_sigterm_leaves_nothing_behind(endless_server, tmp_path):
    """A server that never stops sending used to fill the disk, and SIGTERM left the partial zip behind."""
    digest, name = "ab" * 32, f"flare22_coarse_v{COARSE_VERSION}.zip"
    url, handler = f"{endless_server}/endless/{name}", signal.getsignal(signal.SIGTERM)
    with pytest.raises(ReleaseError, match=r"endless/.*refused: more than 1048576 bytes"):
        download_release(url, tmp_path / "capped", sha256=digest, max_bytes=1 << 20)
    assert list((tmp_path / "capped").iterdir()) == []
    with pytest.raises(ReleaseError, match=r"claims/.*Content-Length of 10737418240 bytes.*more than 1048576"):
        download_release(f"{endless_server}/claims/{name}", tmp_path / "claims", sha256=digest, max_bytes=1 << 20)
    assert list((tmp_path / "claims").iterdir()) == []
    with pytest.raises(ReleaseError, match="not 64 hexadecimal digits"):  # checked before downloading
        download_release(url, tmp_path / "bad_hash", sha256="abc")
    assert not (tmp_path / "bad_hash").exists()
    assert signal.getsignal(signal.SIGTERM) == handler  # put back after each download

    library = tmp_path / "library"
    status, stderr = _terminate_mid_download([sys.executable, "-c", LIBRARY_CALL, url, str(library), digest], library)
    assert status == 1 and "interrupted: terminated" in stderr, (status, stderr)
    assert list(library.iterdir()) == [], "the partial download was left behind"
    cli = tmp_path / "cli"
    command = [sys.executable, "-m", "flare_c2f_extensions", "download_release", "--url", url, "--bundle_dir", str(cli),
               "--sha256", digest]
    status, stderr = _terminate_mid_download(command, cli)
    assert status == 128 + signal.SIGTERM and "Traceback" not in stderr and stderr.startswith("error: "), stderr
    assert list(cli.iterdir()) == [], "the partial download was left behind"


# -- item 14: entry names in normal form only ------------------------------------------------------------------------


def _release_zip(path, entries):
    with zipfile.ZipFile(path, "w") as archive:
        for entry, data in entries:
            archive.writestr(zipfile.ZipInfo(entry), data)
    return path, hashlib.sha256(path.read_bytes()).hexdigest()


def test_verify_release_refuses_entry_names_not_in_normal_form(tmp_path):
    """``flare22_coarse/./configs/metadata.json`` (version 6.6.6) beside the real one used to pass verification."""
    meta = "flare22_coarse/configs/metadata.json"
    genuine = (meta, json.dumps({"version": COARSE_VERSION}))
    zip_name = f"flare22_coarse_v{COARSE_VERSION}.zip"
    (tmp_path / "good").mkdir()
    good, digest = _release_zip(tmp_path / "good" / zip_name, [genuine, ("flare22_coarse/configs/", b"")])
    assert verify_release(good, digest)["version"] == COARSE_VERSION
    forged_entries = [
        "flare22_coarse/./configs/metadata.json",
        "./flare22_coarse/configs/inference.json",
        "flare22_coarse//configs/inference.json",
        "flare22_coarse/configs/.",
        "flare22_coarse/configs/x/../inference.json",
        "flare22_coarse/configs\\inference.json",
        "/flare22_coarse/configs/inference.json",
        "C:flare22_coarse/configs/inference.json",
    ]
    forged_meta = json.dumps({"version": "6.6.6"})
    for i, entry in enumerate(forged_entries):
        (tmp_path / str(i)).mkdir()
        forged, digest = _release_zip(tmp_path / str(i) / zip_name, [genuine, (entry, forged_meta)])
        with pytest.raises(ReleaseError) as info:
            verify_release(forged, digest)
        assert str(forged) in str(info.value) and repr(entry) in str(info.value), (entry, str(info.value))
