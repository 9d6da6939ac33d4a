"""Release zips of the bundles, and the checks that make a downloaded zip safe to extract.

A release of bundle ``<name>`` (the folder name under ``bundles/``) at ``version`` (its ``configs/metadata.json``)
is ``<name>_v<version>.zip`` holding one top-level folder ``<name>/``: the layout ``python -m monai.bundle download``
expects, from ``--url`` or from a GitHub release (``--source github``). Zips are reproducible: entries sorted,
timestamps fixed at 1980-01-01, permissions fixed (0644), no extra fields, so packing the same files twice gives the
same bytes (with the same zlib). Beside each zip, ``pack`` writes ``<zip>.sha256`` (``sha256sum`` format).

Weights (everything in ``models/``) go either inside the zip (``weights="inside"``) or beside it as release assets
``<name>_v<version>_<file>``, listed in the bundle's ``large_files.yml`` (MONAI's format: ``path``, ``url``,
``hash_val``, ``hash_type: sha256``) for ``python -m monai.bundle download_large_files``, which checks each hash.

``verify_release`` checks a zip before anything is extracted: its sha256 (given, or from the sidecar), that it is a
readable zip whose every entry passes its CRC, that every entry lies inside ``<name>/`` (no absolute paths, no
``..``, every name in normal form, no symbolic links, no duplicates, no two names that differ only in case, which
collide on case-insensitive file systems), that it inflates to at most :data:`MAX_INFLATE_RATIO` times its size and
at most :data:`MAX_INFLATED_BYTES` (checked from the entries' declared sizes, which extraction cannot exceed, before
anything is inflated), and that the metadata's version is the one in the file name.
``download_release`` downloads (at most :data:`MAX_DOWNLOAD_BYTES`), verifies, fetches the large files (hash-checked)
and only then moves the bundle into place, so a failed, tampered, interrupted or terminated (SIGTERM) download leaves
nothing behind.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import posixpath
import re
import shutil
import signal
import stat
import tempfile
import threading
import unicodedata
import urllib.request
import zipfile
import zlib
from collections.abc import Iterable, Sequence
from pathlib import Path, PurePosixPath

from flare_c2f_extensions.paths import BUNDLES_DIR

__all__ = [
    "ReleaseError", "download_release", "pack", "pack_bundle", "read_version", "sha256_of", "verify_release",
    "write_sidecar",
]

logger = logging.getLogger(__name__)

ZIP_EPOCH = (1980, 1, 1, 0, 0, 0)  # the earliest time a zip can hold
FILE_MODE = 0o644
# outputs written inside a bundle by its configs and by `train`
EXCLUDED_TOP_DIRS = {"eval", "runs", "mlruns", "logs", "train_state"}
EXCLUDED_DIRS = {"__pycache__"}
EXCLUDED_SUFFIXES = {".pyc", ".pyo", ".zip", ".sha256", ".tmp", ".swp"}
WEIGHTS_DIR = "models"
LARGE_FILES = "large_files.yml"
_VERSION = re.compile(r"^\d+\.\d+\.\d+([.+-][0-9A-Za-z.+-]+)?$")
_RELEASE_NAME = re.compile(r"^(?P<name>.+)_v(?P<version>\d+\.\d+\.\d+([.+-][0-9A-Za-z.+-]+)?)\.zip$")
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
# A release inflates to at most MAX_INFLATE_RATIO times its zip's size and never beyond MAX_INFLATED_BYTES: weights
# hardly compress (about 1.1:1) and configs about 5:1, while a zip bomb claims hundreds or thousands to one.
MAX_INFLATE_RATIO = 50
MAX_INFLATED_BYTES = 8 << 30
# A download stops at this many bytes (a server that never stops sending would fill the disk); a release zip of the
# paper-size networks is far smaller. download_release(max_bytes=...) / --max_bytes raise it.
MAX_DOWNLOAD_BYTES = 4 << 30
MAX_SIDECAR_BYTES = 64 << 10  # a .sha256 sidecar is one line


class ReleaseError(ValueError):
    """A release that must not be used (or cannot be made); the message says which file and why."""


# -- hashing -----------------------------------------------------------------------------------------------------


def sha256_of(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def write_sidecar(path: str | os.PathLike) -> Path:
    """Write ``<path>.sha256`` in ``sha256sum`` format (``sha256sum -c`` reads it); returns the sidecar's path."""
    path = Path(path)
    sidecar = path.with_name(path.name + ".sha256")
    sidecar.write_text(f"{sha256_of(path)}  {path.name}\n")
    return sidecar


def read_sidecar(path: str | os.PathLike) -> str:
    """The hash in a ``.sha256`` sidecar (first field of its first line)."""
    text = Path(path).read_text().strip()
    value = text.split()[0].lower() if text else ""
    if not _HEX64.match(value):
        raise ReleaseError(f"{path}: not a sha256 sidecar (expected '<64 hex digits>  <file name>')")
    return value


# -- packing -----------------------------------------------------------------------------------------------------


def read_version(bundle_dir: str | os.PathLike) -> str:
    """The bundle's ``version``, checked: semantic-version shaped and described in ``changelog``."""
    meta_file = Path(bundle_dir) / "configs" / "metadata.json"
    if not meta_file.is_file():
        raise ReleaseError(f"{meta_file}: missing; every bundle needs configs/metadata.json")
    meta = json.loads(meta_file.read_text())
    version = str(meta.get("version", ""))
    if not _VERSION.match(version):
        raise ReleaseError(f"{meta_file}: version {version!r} is not of the form MAJOR.MINOR.PATCH")
    if version not in meta.get("changelog", {}):
        raise ReleaseError(f"{meta_file}: changelog has no entry for version {version}; describe the release first")
    return version


def _bundle_files(bundle_dir: Path) -> list[tuple[str, Path]]:
    """(posix path inside the bundle, file) for every file that belongs in a release, sorted."""
    files = []
    for root, dirs, names in os.walk(bundle_dir):
        rel_root = Path(root).relative_to(bundle_dir)
        keep = []
        for d in dirs:
            if d.startswith(".") or d in EXCLUDED_DIRS or (rel_root == Path(".") and d in EXCLUDED_TOP_DIRS):
                continue
            if (Path(root) / d).is_symlink():
                raise ReleaseError(f"{Path(root) / d}: symbolic links are not packed; copy the files instead")
            keep.append(d)
        dirs[:] = sorted(keep)
        for n in names:
            path = Path(root) / n
            if n.startswith(".") or path.suffix in EXCLUDED_SUFFIXES or n.endswith("~"):
                continue
            if path.is_symlink():
                raise ReleaseError(f"{path}: symbolic links are not packed; copy the file instead")
            files.append(((rel_root / n).as_posix(), path))
    return sorted(files)


def _zip_info(arcname: str, size: int) -> zipfile.ZipInfo:
    info = zipfile.ZipInfo(arcname, date_time=ZIP_EPOCH)
    info.compress_type = zipfile.ZIP_DEFLATED
    info.create_system = 3  # unix, so that external_attr holds the mode
    info.external_attr = (stat.S_IFREG | FILE_MODE) << 16
    info.file_size = size
    return info


def _write_zip(zip_path: Path, entries: Sequence[tuple[str, Path | bytes]]) -> None:
    """Write entries (archive name, file or bytes) in the given order, reproducibly, atomically."""
    tmp = zip_path.with_name(f".{zip_path.name}.partial")
    with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=6) as zf:
        for arcname, source in entries:
            if isinstance(source, bytes):
                info = _zip_info(arcname, len(source))
                zf.writestr(info, source, compress_type=zipfile.ZIP_DEFLATED, compresslevel=6)
                continue
            size = source.stat().st_size
            info = _zip_info(arcname, size)
            with open(source, "rb") as src, zf.open(info, "w", force_zip64=size >= 1 << 31) as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
    os.replace(tmp, zip_path)


def _large_files_yaml(entries: Iterable[dict]) -> str:
    """MONAI's large_files.yml; every value is written as a JSON string, which is valid YAML."""
    lines = ["large_files:"]
    for entry in entries:
        lines.append(f"  - path: {json.dumps(entry['path'])}")
        for key in ("url", "hash_val", "hash_type"):
            lines.append(f"    {key}: {json.dumps(entry[key])}")
    return "\n".join(lines) + "\n"


def pack_bundle(
    bundle_dir: str | os.PathLike,
    out: str | os.PathLike,
    weights: str = "inside",
    weights_url: str | None = None,
) -> dict:
    """Pack one bundle folder into ``out/<name>_v<version>.zip`` (+ ``.sha256``); returns what was written.

    ``weights="large_files"``: each file of ``models/`` is copied to ``out/<name>_v<version>_<file>`` and listed in
    the zip's ``large_files.yml`` with ``url = weights_url/<that name>`` and its sha256 (for a GitHub release,
    ``weights_url`` is ``https://github.com/<owner>/<repo>/releases/download/<tag>``).
    """
    if weights not in ("inside", "large_files"):
        raise ReleaseError(f"weights must be 'inside' or 'large_files', got {weights!r}")
    bundle_dir = Path(bundle_dir).resolve()
    if not bundle_dir.is_dir():
        raise ReleaseError(f"{bundle_dir}: bundle folder does not exist")
    name, version = bundle_dir.name, read_version(bundle_dir)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    files = _bundle_files(bundle_dir)
    model_files = [(rel, path) for rel, path in files if PurePosixPath(rel).parts[0] == WEIGHTS_DIR]
    entries: list[tuple[str, Path | bytes]] = []
    assets = []
    if weights == "inside":
        entries = [(f"{name}/{rel}", path) for rel, path in files]
    else:
        if not weights_url:
            raise ReleaseError("weights='large_files' needs weights_url, the folder the weight files are published in")
        listed = []
        for rel, path in model_files:
            asset = out / f"{name}_v{version}_{rel[len(WEIGHTS_DIR) + 1:].replace('/', '_')}"
            shutil.copyfile(path, asset)
            assets.append(asset)
            listed.append(
                {
                    "path": rel,
                    "url": f"{weights_url.rstrip('/')}/{asset.name}",
                    "hash_val": sha256_of(asset),
                    "hash_type": "sha256",
                }
            )
        # a large_files.yml of the source is replaced by the one written here (kept if models/ is empty)
        replaced = {rel for rel, _ in model_files} | ({LARGE_FILES} if listed else set())
        kept = [(rel, path) for rel, path in files if rel not in replaced]
        entries = [(f"{name}/{rel}", path) for rel, path in kept]
        if listed:
            entries.append((f"{name}/{LARGE_FILES}", _large_files_yaml(listed).encode()))
        entries.sort(key=lambda e: e[0])
    if not model_files:
        logger.warning("%s: no weights in %s/ (the release holds configs only)", name, WEIGHTS_DIR)
    zip_path = out / f"{name}_v{version}.zip"
    _write_zip(zip_path, entries)
    sidecar = write_sidecar(zip_path)
    digest = read_sidecar(sidecar)
    logger.info("packed %s (%d files, sha256 %s)", zip_path, len(entries), digest)
    return {
        "name": name,
        "version": version,
        "zip": str(zip_path),
        "sha256": digest,
        "files": [arc for arc, _ in entries],
        "weights": [str(a) for a in assets] if weights == "large_files" else [rel for rel, _ in model_files],
    }


def pack(
    out: str | os.PathLike,
    bundles: Sequence[str] | str | None = None,
    weights: str = "inside",
    weights_url: str | None = None,
    bundles_dir: str | os.PathLike | None = None,
) -> list[dict]:
    """Pack ``bundles`` (folder names; default every bundle with a metadata.json) of ``bundles_dir``."""
    root = Path(bundles_dir) if bundles_dir is not None else BUNDLES_DIR
    if isinstance(bundles, str):
        bundles = [b for b in re.split(r"[,\s]+", bundles) if b]
    if not bundles:
        bundles = sorted(p.parent.parent.name for p in root.glob("*/configs/metadata.json"))
    if not bundles:
        raise ReleaseError(f"{root}: no bundles (folders with configs/metadata.json)")
    missing = [b for b in bundles if not (root / b).is_dir()]
    if missing:
        raise ReleaseError(f"{root}: no bundle folder {', '.join(missing)}")
    return [pack_bundle(root / b, out, weights, weights_url) for b in bundles]


# -- verification ------------------------------------------------------------------------------------------------


def _check_entry(arcname: str, info: zipfile.ZipInfo, name: str, zip_path: Path) -> None:
    """Refuse an entry that is not a plain file or folder inside ``<name>/`` written in normal form: every name an
    extractor could write elsewhere, or that could land on the same file as another entry (``a/./b`` is ``a/b``)."""
    def refuse(why: str):
        raise ReleaseError(f"{zip_path}: refused: entry {arcname!r} {why}; do not extract this file")

    if "\\" in arcname or "\x00" in arcname:
        refuse("has a backslash or NUL in its path")
    path = PurePosixPath(arcname)
    if path.is_absolute() or re.match(r"^[A-Za-z]:", arcname):
        refuse("is an absolute path (it would be written outside the bundle folder)")
    segments = arcname[:-1].split("/") if arcname.endswith("/") else arcname.split("/")  # a folder ends in one '/'
    if ".." in segments:
        refuse("contains '..' (it would be written outside the bundle folder)")
    if "." in segments or "" in segments or posixpath.normpath(arcname) != arcname.rstrip("/"):
        refuse("is not in normal form ('.' or empty segments: it could name the same file as another entry)")
    if not path.parts or path.parts[0] != name:
        refuse(f"is outside the bundle's single top-level folder {name + '/'!r}")
    if stat.S_ISLNK(info.external_attr >> 16):
        refuse("is a symbolic link")


def _check_large_files(text: str, zip_path: Path, name: str) -> list[dict]:
    """Entries of a packed large_files.yml: relative paths inside the bundle, sha256 hashes, urls."""
    import yaml  # a dependency (monai.bundle download_large_files reads this file with it too)

    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise ReleaseError(f"{zip_path}: refused: {name}/{LARGE_FILES} is not valid YAML ({error})") from error
    entries = (data or {}).get("large_files") or []
    for entry in entries:
        path = str(entry.get("path", ""))
        pure = PurePosixPath(path)
        if not path or pure.is_absolute() or ".." in pure.parts or "\\" in path:
            raise ReleaseError(f"{zip_path}: refused: {name}/{LARGE_FILES} lists {path!r}, outside the bundle folder")
        if str(entry.get("hash_type", "")).lower() != "sha256" or not _HEX64.match(str(entry.get("hash_val", ""))):
            raise ReleaseError(f"{zip_path}: refused: {name}/{LARGE_FILES} entry {path!r} has no sha256 hash_val")
        if not str(entry.get("url", "")):
            raise ReleaseError(f"{zip_path}: refused: {name}/{LARGE_FILES} entry {path!r} has no url")
    return entries


def _check_inflated_size(infos: Sequence[zipfile.ZipInfo], zip_path: Path) -> None:
    inflated = sum(info.file_size for info in infos)
    limit = min(MAX_INFLATE_RATIO * zip_path.stat().st_size, MAX_INFLATED_BYTES)
    if inflated > limit:
        raise ReleaseError(
            f"{zip_path}: refused: it would inflate to {inflated} bytes, over its limit of {limit} "
            f"({MAX_INFLATE_RATIO} times the zip's size, at most {MAX_INFLATED_BYTES} bytes): a zip bomb?"
        )


def verify_release(
    zip: str | os.PathLike,
    sha256: str | None = None,
    name: str | None = None,
) -> dict:
    """Check a release zip before extracting it; raises :class:`ReleaseError` saying what is wrong.

    ``sha256``: the published hash; if omitted, ``<zip>.sha256`` beside the zip is read (an error if neither).
    ``name``: the bundle (top-level folder); by default from the file name ``<name>_v<version>.zip`` (or
    ``<name>.zip``, as ``monai.bundle download`` stores it).
    """
    zip_path = Path(zip)
    actual = _check_hash(zip_path, sha256)
    match = _RELEASE_NAME.match(zip_path.name)
    version = match.group("version") if match else None
    if name is None:
        name = match.group("name") if match else zip_path.name[: -len(".zip")] if zip_path.suffix == ".zip" else None
    if not name:
        raise ReleaseError(f"{zip_path}: cannot tell the bundle name from the file name; pass --name")
    try:
        archive = zipfile.ZipFile(zip_path)
    except (zipfile.BadZipFile, OSError) as error:
        raise ReleaseError(f"{zip_path}: refused: not a readable zip file ({error})") from error
    with archive:
        infos = archive.infolist()
        if not infos:
            raise ReleaseError(f"{zip_path}: refused: the zip is empty")
        seen = _check_entries(infos, name, zip_path)
        _check_inflated_size(infos, zip_path)
        try:
            bad = archive.testzip()
        except (zipfile.BadZipFile, zlib.error, OSError, EOFError, RuntimeError) as error:  # zlib: broken deflate
            raise ReleaseError(f"{zip_path}: refused: corrupted zip ({error})") from error
        if bad is not None:
            raise ReleaseError(f"{zip_path}: refused: corrupted zip (bad CRC-32 for {bad!r})")
        meta_name = f"{name}/configs/metadata.json"
        if meta_name not in seen:
            raise ReleaseError(f"{zip_path}: refused: no {meta_name} (not a bundle release)")
        try:
            meta = json.loads(archive.read(meta_name))
        except ValueError as error:
            raise ReleaseError(f"{zip_path}: refused: {meta_name} is not valid JSON ({error})") from error
        if version is not None and str(meta.get("version")) != version:
            raise ReleaseError(
                f"{zip_path}: refused: the file name says version {version} but {meta_name} says {meta.get('version')}"
            )
        large = []
        if f"{name}/{LARGE_FILES}" in seen:
            large = _check_large_files(archive.read(f"{name}/{LARGE_FILES}").decode(), zip_path, name)
    return {"zip": str(zip_path), "name": name, "version": meta.get("version"), "sha256": actual,
            "entries": len(infos), "large_files": [e["path"] for e in large]}


def _check_hash(zip_path: Path, sha256: str | None) -> str:
    """The zip's sha256, if it equals ``sha256`` (or the ``.sha256`` sidecar's); else :class:`ReleaseError`."""
    if not zip_path.is_file():
        raise ReleaseError(f"{zip_path}: file does not exist")
    if sha256 is None:
        sidecar = zip_path.with_name(zip_path.name + ".sha256")
        if not sidecar.is_file():
            raise ReleaseError(
                f"{zip_path}: no expected sha256: pass --sha256 (the published hash) or put {sidecar.name} beside it"
            )
        sha256 = read_sidecar(sidecar)
    sha256 = str(sha256).strip().lower()
    if not _HEX64.match(sha256):
        raise ReleaseError(f"expected sha256 {sha256!r} is not 64 hexadecimal digits")
    actual = sha256_of(zip_path)
    if actual != sha256:
        raise ReleaseError(
            f"{zip_path}: refused: sha256 mismatch (expected {sha256}, got {actual}); the download is corrupted or "
            "was tampered with: delete it and download again from the release"
        )
    return actual


def _check_entries(infos, name: str, zip_path: Path) -> set[str]:
    """Every entry inside ``<name>/``, none twice, no two that differ only in case; returns the entry names."""
    seen: set[str] = set()
    folded: dict[str, str] = {}
    for info in infos:
        _check_entry(info.filename, info, name, zip_path)
        key = posixpath.normpath(info.filename)
        if key in seen:
            raise ReleaseError(f"{zip_path}: refused: entry {info.filename!r} appears twice")
        seen.add(key)
        other = folded.setdefault(unicodedata.normalize("NFC", key).casefold(), key)
        if other != key:
            raise ReleaseError(
                f"{zip_path}: refused: entries {other!r} and {key!r} differ only in case (they would overwrite "
                "each other on a case-insensitive file system)"
            )
    return seen


# -- download ----------------------------------------------------------------------------------------------------


def _fetch(url: str, dest: Path, timeout: float = 60.0, max_bytes: int = MAX_DOWNLOAD_BYTES) -> None:
    """Download ``url`` into ``dest``, refusing more than ``max_bytes`` (announced or received); ``dest`` is removed
    on any failure."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response, open(dest, "wb") as f:  # noqa: S310
            announced = str(response.headers.get("Content-Length", "")).strip()
            if announced.isdigit() and int(announced) > max_bytes:
                raise ReleaseError(f"{url}: refused: its Content-Length of {announced} bytes is more than {max_bytes} "
                                   "bytes, the download limit (max_bytes)")
            received = 0
            while chunk := response.read(1 << 20):
                received += len(chunk)
                if received > max_bytes:
                    raise ReleaseError(f"{url}: refused: more than {max_bytes} bytes, the download limit (max_bytes)")
                f.write(chunk)
    except BaseException:
        dest.unlink(missing_ok=True)
        raise


def _raise_terminated(signum, frame):
    raise KeyboardInterrupt("terminated")


@contextlib.contextmanager
def _terminate_as_interrupt():
    """While downloading, SIGTERM raises ``KeyboardInterrupt("terminated")`` as Ctrl-C would, so that the temporary
    folder is removed on the way out (SIGTERM's default ends the process on the spot and leaves the partial zip).
    The previous handler comes back afterwards. Signal handlers belong to the main thread: elsewhere nothing changes."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)


def _check_max_bytes(max_bytes) -> int:
    if max_bytes is None:
        return MAX_DOWNLOAD_BYTES
    if isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes < 1:
        raise ReleaseError(f"max_bytes: expected a positive whole number of bytes, got {max_bytes!r}")
    return max_bytes


def download_release(
    url: str,
    bundle_dir: str | os.PathLike = ".",
    sha256: str | None = None,
    name: str | None = None,
    large_files: bool = True,
    timeout: float = 60.0,
    max_bytes: int | None = None,
) -> Path:
    """Download a release zip, verify it (``sha256``, or ``<url>.sha256`` published beside it), fetch and
    hash-check its large files, then move ``<name>/`` into ``bundle_dir``. Nothing is left behind on failure, on
    Ctrl-C or on SIGTERM; an existing ``bundle_dir/<name>`` is never overwritten. Returns the bundle's path.
    ``max_bytes``: the most the zip may have (default :data:`MAX_DOWNLOAD_BYTES`); a larger one is refused."""
    max_bytes = _check_max_bytes(max_bytes)
    if sha256 is not None and not _HEX64.match(str(sha256).strip().lower()):
        raise ReleaseError(f"expected sha256 {sha256!r} is not 64 hexadecimal digits")
    file_name = url.rstrip("/").rsplit("/", 1)[-1].split("?")[0]
    if not file_name.endswith(".zip"):
        raise ReleaseError(f"{url}: expected a URL ending in <name>_v<version>.zip")
    with _terminate_as_interrupt():
        return _download_release(url, Path(bundle_dir), file_name, sha256, name, large_files, timeout, max_bytes)


def _download_release(url, bundle_dir: Path, file_name, sha256, name, large_files, timeout, max_bytes) -> Path:
    try:
        bundle_dir.mkdir(parents=True, exist_ok=True)
    except OSError as error:  # a regular file in its place or above it, no permission, ...
        raise ReleaseError(f"{bundle_dir}: bundle folder cannot be created ({error.strerror or error})") from None
    with tempfile.TemporaryDirectory(dir=bundle_dir, prefix=".download-") as tmp:
        zip_path = Path(tmp) / file_name
        try:
            _fetch(url, zip_path, timeout, max_bytes)
        except OSError as error:  # HTTP errors, refused connections, time-outs
            raise ReleaseError(f"{url}: cannot download ({error})") from error
        if sha256 is None:
            try:
                _fetch(url + ".sha256", zip_path.with_name(file_name + ".sha256"), timeout, MAX_SIDECAR_BYTES)
            except OSError as error:
                raise ReleaseError(f"{url}.sha256: cannot fetch the published hash ({error}); pass --sha256") from error
        try:
            report = verify_release(zip_path, sha256, name)
        except ReleaseError as error:  # name the URL, not the temporary file (already gone)
            message = str(error).replace(str(zip_path), url).replace(": delete it and download", ": download it")
            raise ReleaseError(message) from None
        name = report["name"]
        target = bundle_dir / name
        if target.exists():
            raise ReleaseError(f"{target}: already exists; remove it (or choose another --bundle_dir) first")
        staging = Path(tmp) / "extract"
        from monai.apps.utils import extractall  # refuses unsafe entries too (defence in depth)

        extractall(zip_path, staging, has_base=False)
        if large_files and report["large_files"]:
            from monai.apps.utils import HashCheckError
            from monai.bundle import download_large_files

            try:
                download_large_files(bundle_path=str(staging / name))
            except HashCheckError as error:
                why = f"a file of {LARGE_FILES} failed its hash check"
                raise ReleaseError(f"{url}: refused: {why} ({error})") from error
            except OSError as error:
                raise ReleaseError(f"{url}: cannot download a file of {LARGE_FILES} ({error})") from error
        os.replace(staging / name, target)
    return target
