"""Files written safely: atomic writes (old file, no file or the whole new file, never a partial one), output
folders checked before any work, and finished outputs recognised on a rerun."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
from collections.abc import Sequence
from contextlib import contextmanager
from pathlib import Path

import nibabel as nib
import numpy as np

from flare_c2f_extensions.errors import InputError

__all__ = [
    "PROVENANCE_KEY",
    "add_provenance",
    "atomic_path",
    "HASH_MEMO_MARGIN_S",
    "content_sha256",
    "file_sha256",
    "finished",
    "labels_sha256",
    "output_provenance",
    "output_provenance_of",
    "refuse_foreign_outputs",
    "remembered_sha256",
    "usual_mode",
    "outputs_apart_from_inputs",
    "prepare_output_dir",
    "write_nifti_atomic",
    "write_text_atomic",
]


def usual_mode(path: str | os.PathLike, folder: bool = False) -> None:
    """Give ``path`` the permissions a new file or folder gets under the umask (``mkstemp`` and ``mkdtemp`` make
    them private: a shared output or cache would be unreadable to the other users)."""
    mask = os.umask(0o022)
    os.umask(mask)
    os.chmod(path, (0o777 if folder else 0o666) & ~mask)


def prepare_output_dir(path: str | os.PathLike, what: str = "output") -> Path:
    """Create ``path`` if needed and check that files can be written in it; :class:`InputError` if not.

    Meant to run before any work, so that an unusable output folder fails fast with one clear message.
    """
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise InputError(f"{path}: {what} folder cannot be created: a file is in its place") from None
    except OSError as error:
        raise InputError(f"{path}: {what} folder cannot be created ({error.strerror or error})") from None
    try:
        fd, probe = tempfile.mkstemp(prefix=".write-test-", dir=path)
        os.close(fd)
        os.unlink(probe)
    except OSError as error:
        raise InputError(f"{path}: {what} folder is not writable ({error.strerror or error})") from None
    return path


@contextmanager
def atomic_path(path: str | os.PathLike):
    """Yield a temporary path beside ``path``; on success it replaces ``path``, on any error it is removed.

    So ``path`` is either the old file, no file, or the whole new file: never a partial one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = "".join(path.suffixes[-2:]) or ".tmp"  # keep .nii.gz so writers pick the format
    # a temporary name must fit the file system's 255-byte limit too, however long the final name is
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name[:160]}.", suffix=suffix, dir=path.parent)
    os.close(fd)
    usual_mode(tmp)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


def write_nifti_atomic(image: nib.Nifti1Image, path: str | os.PathLike) -> Path:
    with atomic_path(path) as tmp:
        nib.save(image, tmp)
    return Path(path)


def write_text_atomic(text: str, path: str | os.PathLike) -> Path:
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as handle:
        handle.write(text)
    return Path(path)


def outputs_apart_from_inputs(images: Sequence[tuple[str | os.PathLike, str]], output_dir: str | os.PathLike) -> None:
    """Refuse, before any case runs, an output folder whose outputs would overwrite an input or be listed as
    inputs on the next run: the folder of an input image (or inside a DICOM series folder), or an output path
    (``output_dir/<case>.nii.gz``, links followed) that is an input. ``images``: (image path, case name) pairs."""
    out = os.path.realpath(output_dir)
    inputs = {os.path.realpath(image): image for image, _ in images}
    for image, case in images:
        output = Path(output_dir) / f"{case}.nii.gz"
        if os.path.realpath(output) in inputs:
            raise InputError(
                f"{output}: this output would overwrite the input {inputs[os.path.realpath(output)]}; "
                "choose an output folder apart from the inputs"
            )
        real = os.path.realpath(image)
        parent = os.path.dirname(real)
        inside_series = os.path.isdir(real) and (out == real or out.startswith(real + os.sep))
        if out == parent or inside_series:
            raise InputError(
                f"{output_dir}: the output folder holds the input {image}: its label maps would be taken for images "
                "on the next run (or overwrite them); choose an output folder apart from the inputs"
            )


# -- whose output is this ------------------------------------------------------------------------------------------

# The label maps that ``flare-c2f segment`` writes carry a NIfTI comment extension with this key: the input's content
# hash, the hash of the labels as written and the options that decided them. A rerun trusts an existing output only
# through it, so a file that the run did not write (another CT, a hand-corrected map) is never taken for finished,
# nor replaced without --overwrite.
PROVENANCE_KEY = "flare_c2f_provenance"


# -- content hashes ------------------------------------------------------------------------------------------------

_CHUNK = 1 << 20
# A remembered hash is trusted only for a file last changed this long before it was hashed ("racy git"): the kernel
# stamps changes with a coarse clock, so a file rewritten within one tick of being hashed could keep its stamps; a
# change made after the hash always gets a later ctime.
HASH_MEMO_MARGIN_S = 2.0


def _feed(digest, path: Path) -> None:
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(_CHUNK), b""):
            digest.update(block)


def file_sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    _feed(digest, Path(path))
    return digest.hexdigest()


def content_sha256(path: str | os.PathLike) -> str:
    """:func:`file_sha256` of a file; of a folder (a DICOM series): of its files' names and bytes, in name order."""
    path = Path(path)
    if path.is_file():
        return file_sha256(path)
    digest = hashlib.sha256()
    for file in sorted(p for p in path.iterdir() if p.is_file()):
        digest.update(file.name.encode() + b"\0")
        _feed(digest, file)
    return digest.hexdigest()


def remembered_sha256(path: str | os.PathLike, remembered: dict | None = None) -> dict:
    """``{"sha256", "identity"}`` of a file. ``remembered`` (an earlier result) is reused while the file's identity
    (device, inode, size, mtime and ctime in ns) is the one it was hashed with: any rewrite, even one that restores
    an older mtime (``cp -p``, ``rsync -a``), changes the ctime, and the file is read again. ``identity`` is ``None``
    when the file changed too recently for its hash to be remembered (:data:`HASH_MEMO_MARGIN_S`)."""
    stat = Path(path).stat()
    identity = [stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns]
    if isinstance(remembered, dict) and remembered.get("identity") == identity and remembered.get("sha256"):
        return {"sha256": remembered["sha256"], "identity": identity}
    started_ns = time.time_ns()
    digest = file_sha256(path)
    settled = started_ns - max(stat.st_mtime_ns, stat.st_ctime_ns) >= HASH_MEMO_MARGIN_S * 1e9
    return {"sha256": digest, "identity": identity if settled else None}


def labels_sha256(labels: np.ndarray) -> str:
    """sha256 of a uint8 label map's voxels in C order (so a map edited after it was written is recognised)."""
    return hashlib.sha256(np.ascontiguousarray(labels, dtype=np.uint8).tobytes()).hexdigest()


def add_provenance(image: nib.Nifti1Image, provenance: dict) -> nib.Nifti1Image:
    """``image`` (a label map about to be written) with ``provenance`` and the hash of its labels in its header."""
    record = {**provenance, "labels_sha256": labels_sha256(np.asanyarray(image.dataobj))}
    image.header.extensions.append(nib.nifti1.Nifti1Extension("comment", json.dumps({PROVENANCE_KEY: record}).encode()))
    return image


def output_provenance(output: str | os.PathLike) -> tuple[dict | None, str | None]:
    """What an existing label map says of itself, as ``(record, problem)``:

    - ``(record, None)``: a whole, unedited label map that ``flare-c2f segment`` wrote (the record as written);
    - ``(record, why)``: one it wrote that no longer reads back whole (damaged: safe to write again);
    - ``(None, why)``: a file it did not write, or one whose labels were changed since (never replaced silently).
    """
    output = Path(output)
    if output.is_dir():
        return None, "it is a folder"
    if output.is_file() and output.stat().st_size == 0:
        return {}, "it is empty"  # holds nothing to lose: written again
    try:
        written = nib.load(str(output))
        dtype, shape = written.get_data_dtype(), written.shape
        record = _provenance_record(written)
    except Exception as error:  # nibabel raises several types for broken files
        return None, f"it is not a readable NIfTI file ({type(error).__name__}: {error})"
    if record is None:
        return None, "it was not written by flare-c2f segment"
    if dtype != np.uint8 or len(shape) != 3:
        return None, f"it is no longer a flare-c2f label map ({dtype}, shape {shape})"
    try:
        data = np.asarray(written.dataobj)  # reads every byte: a truncated file fails here
    except Exception as error:
        return record, f"it cannot be read whole ({type(error).__name__}: {error})"
    if record.get("labels_sha256") != labels_sha256(data):
        return None, "its labels were changed after flare-c2f wrote it"
    return record, None


def _provenance_record(image) -> dict | None:
    for extension in getattr(image.header, "extensions", []):
        try:
            content = json.loads(extension.get_content())
        except (ValueError, TypeError, UnicodeDecodeError):
            continue
        if isinstance(content, dict) and isinstance(content.get(PROVENANCE_KEY), dict):
            return content[PROVENANCE_KEY]
    return None


def output_provenance_of(image: str | os.PathLike, labels_options: dict, outputs: Sequence[str] = ()) -> dict:
    """What a label map records of itself (besides its own labels' hash): the input (real path and content hash),
    the options that decided its labels and the names of the other outputs written beside it."""
    return {
        "input": os.path.realpath(image), "input_sha256": content_sha256(image), "labels_options": labels_options,
        "outputs": sorted(outputs),
    }


def finished(target: Path, provenance: dict, expected: Sequence[Path] = ()) -> str | None:
    """``None`` if ``target`` is this tool's label map of the same input content with the same label options and
    the outputs asked for now (``provenance``, :func:`output_provenance_of`), each of the ``expected`` paths there;
    ``""`` if there is no file; else why it must be made again. A file this tool did not write (or one edited
    since) is an :class:`InputError`: only ``--overwrite`` replaces it (:func:`refuse_foreign_outputs`)."""
    if not (target.exists() or target.is_symlink()):
        return ""
    record, why = output_provenance(target)
    if record is None:  # appeared since refuse_foreign_outputs looked
        raise InputError(f"{target}: exists and {why}: --overwrite replaces it")
    if why is not None:
        return why
    before, now = record.get("labels_options"), provenance["labels_options"]
    if record.get("input_sha256") != provenance["input_sha256"]:
        return "its input has changed since"
    if before != now:
        changed = [key for key in now if not isinstance(before, dict) or before.get(key) != now[key]]
        return f"it was made with other options ({', '.join(changed)})"
    missing = [p.name for p in expected if not p.exists()]
    missing += sorted(set(provenance["outputs"]) - set(record.get("outputs", [])))
    if missing:
        return f"outputs asked for now are missing ({', '.join(dict.fromkeys(missing))})"
    return None


def refuse_foreign_outputs(targets, overwrite: bool = False) -> None:
    """Stop before any work if a label map to be written is a folder, or exists and this tool did not write it for
    this input (another CT, a hand-corrected map): only ``overwrite`` replaces such a file. Where two inputs share
    an output name, the first one owns it (the others fail as cases)."""
    owners = {}
    for image, target in targets:
        owners.setdefault(str(target), (image, target))
    problems = []
    for image, target in owners.values():
        if target.is_dir():
            problems.append(f"{target}: is a folder, not a label map file; choose another output")
            continue
        if overwrite or not target.exists():
            continue
        record, why = output_provenance(target)
        if record is None:  # a damaged file of this tool's (record and why) is written again
            problems.append(f"{target}: exists and {why}")
        elif why is None and record.get("input") != os.path.realpath(image) and (
            record.get("input_sha256") != content_sha256(image)
        ):
            problems.append(f"{target}: exists and holds the segmentation of another input, {record.get('input')}")
    if problems:
        more = f" (and {len(problems) - 1} more output(s))" if len(problems) > 1 else ""
        raise InputError(f"{problems[0]}{more}: nothing was written; --overwrite replaces it, or choose another output")


