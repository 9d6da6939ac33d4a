"""Finding cases on disk: FLARE-layout names, the images in a folder (NIfTI files, DICOM series folders, nested
series), labelled training pairs, masks beside them, and the train/validation split."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path

from flare_c2f_extensions.errors import INPUT_LOGGER, InputError
from flare_c2f_extensions.io.dicom import is_dicom_file, is_dicom_series
from flare_c2f_extensions.io.images import check_volume

__all__ = [
    "IMAGE_SUFFIX",
    "NIFTI_SUFFIXES",
    "FoundImages",
    "attach_masks",
    "case_name",
    "find_images",
    "is_nifti",
    "labelled_cases",
    "split_cases",
    "training_cases",
]

logger = logging.getLogger(INPUT_LOGGER)

NIFTI_SUFFIXES = (".nii.gz", ".nii")
IMAGE_SUFFIX = "_0000"  # FLARE: <case>_0000.nii.gz is the image, <case>.nii.gz the label map


def case_name(path: str | os.PathLike) -> str:
    """FLARE case id of an image or label file: ``FLARE22_Tr_0001`` for ``.../FLARE22_Tr_0001_0000.nii.gz``.

    A DICOM series folder's case id is the folder's name as it is (``.../patient7`` -> ``patient7``).
    """
    if Path(path).is_dir():
        return Path(path).name
    name = Path(path).name
    for suffix in NIFTI_SUFFIXES:
        if name.lower().endswith(suffix):  # .NII.GZ too
            name = name[: -len(suffix)]
            break
    return name[: -len(IMAGE_SUFFIX)] if name.endswith(IMAGE_SUFFIX) else name


def is_nifti(path: str | os.PathLike) -> bool:
    return str(path).lower().endswith(NIFTI_SUFFIXES)



def _nifti_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and is_nifti(p))


def _existing_dir(folder: str | os.PathLike, what: str) -> Path:
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"{folder}: {what} folder does not exist")
    return folder


MAX_SERIES_DEPTH = 6  # how deep below an input folder DICOM series are looked for (patient/study/series/...)


class FoundImages(list):
    """What :func:`find_images` found: a list of ``{"image": path}`` (with ``"case"`` where the case name is not
    :func:`case_name` of the path: nested DICOM series) and ``ignored``, every other entry of the folder as
    ``{"path": ..., "reason": ...}`` (a batch runner puts them in its report)."""

    def __init__(self, items=(), ignored=()):
        super().__init__(items)
        self.ignored = list(ignored)


def _ignore(ignored: list, path: Path, reason: str, quiet: bool = False) -> None:
    ignored.append({"path": str(path), "reason": reason})
    logger.log(logging.DEBUG if quiet else logging.WARNING, "%s: ignored: %s", path, reason)


def _nested_series(folder: Path, root: Path, depth: int = 1) -> list[tuple[Path, str]]:
    """DICOM series folders below ``folder`` (not following links, not into hidden folders), each with a case
    name made of its path below ``root`` (``patient1/CT/2`` -> ``patient1_CT_2``)."""
    found = []
    try:
        children = sorted(
            p for p in folder.iterdir() if p.is_dir() and not p.is_symlink() and not p.name.startswith(".")
        )
    except OSError:
        return found
    for child in children:
        if is_dicom_series(child):
            found.append((child, "_".join(child.relative_to(root).parts)))
        elif depth < MAX_SERIES_DEPTH:
            found.extend(_nested_series(child, root, depth + 1))
    return found


def _scan(folder: Path, exclude: Sequence[str | os.PathLike] = ()) -> tuple[list[tuple[Path, str | None]], list]:
    """Every entry of ``folder``: an image (path, case name or ``None`` for the usual one) or ignored with why."""
    excluded = {os.path.realpath(p) for p in exclude}
    images: list[tuple[Path, str | None]] = []
    ignored: list[dict] = []
    loose_dicom: list[Path] = []
    for entry in sorted(folder.iterdir(), key=lambda p: p.name):
        name = entry.name
        if os.path.realpath(entry) in excluded:
            _ignore(ignored, entry, "the output folder", quiet=True)
        elif name.startswith("._"):
            _ignore(ignored, entry, "macOS AppleDouble metadata file", quiet=True)
        elif name.startswith("."):
            _ignore(ignored, entry, "hidden", quiet=True)
        elif entry.is_symlink() and not entry.exists():
            _ignore(ignored, entry, f"a symbolic link whose target does not exist ({os.readlink(entry)})")
        elif entry.is_dir():
            series = is_dicom_series(entry)
            nested = [] if series else _nested_series(entry, folder)
            if series:
                images.append((entry, None))
            elif nested:
                images.extend(nested)
            else:
                _ignore(ignored, entry, f"a folder with no DICOM series in it (nor {MAX_SERIES_DEPTH} levels below)")
        elif not entry.is_file():
            _ignore(ignored, entry, "not a regular file (a pipe, socket or device)")
        elif is_nifti(entry):
            images.append((entry, None))
        elif is_dicom_file(entry):
            loose_dicom.append(entry)
        else:
            _ignore(ignored, entry, "not a NIfTI file (.nii, .nii.gz; any case) nor a DICOM file")
    if loose_dicom and not images:  # the folder is itself one series
        return [(folder, None)], ignored
    images = _distinct(images, folder, ignored)
    for path in loose_dicom:
        _ignore(ignored, path, "a DICOM file beside other images: put each series in a folder of its own")
    return images, ignored


def _distinct(images: list[tuple[Path, str | None]], folder: Path, ignored: list) -> list[tuple[Path, str | None]]:
    """Each image once, by where its links lead (a link to a series, or a link loop back up the tree, would
    segment the same series again under another name); the first by name is kept, the others ignored with why."""
    seen: dict[str, Path] = {}
    distinct = []
    for path, name in images:
        real = os.path.realpath(path)
        if real in seen:
            _ignore(ignored, path, f"the same image as {seen[real]} (reached through a symbolic link)")
        else:
            seen[real] = path
            distinct.append((path, name))
    return distinct


def find_images(
    dataset_dir: str | os.PathLike,
    subdir: str = "imagesTs",
    strict: bool | None = None,
    exclude: str | os.PathLike | Sequence[str | os.PathLike] | None = None,
) -> FoundImages:
    """Images to segment in ``dataset_dir/subdir`` if that folder exists, else in ``dataset_dir``.

    An image is a NIfTI file (``*.nii.gz``, ``*.nii``, suffixes in any case) or a DICOM series folder (a
    subfolder holding DICOM files, recognised by content; its case name is the folder's name); series further
    down (``patient/study/series``) are found too, each named by its path (``patient_study_series``); a folder
    that is itself a DICOM series is one image. Every other entry is reported as ignored with its reason (a
    warning; hidden and macOS ``._*`` files quietly) and listed in the result's ``ignored``; ``exclude`` (the
    output folder) is never looked into. A folder with no image is an error. Returns ``[{"image": path}, ...]``
    sorted by name (:class:`FoundImages`).

    Each image's header is checked. ``strict=True``: any bad image is an error. ``strict=False``: bad images are
    listed anyway, with a warning, so that a batch runner reports each as failed while the others run.
    ``None`` (default): an error only when every image is bad (nothing could be done), else as ``False``.
    """
    root = _existing_dir(dataset_dir, "dataset_dir")
    folder = root / subdir if subdir and (root / subdir).is_dir() else root
    if exclude is None:
        exclude = []
    elif isinstance(exclude, (str, os.PathLike)):
        exclude = [exclude]
    found, ignored = _scan(folder, exclude)
    if not found:
        raise InputError(f"{folder}: no NIfTI images (*.nii.gz, *.nii) or DICOM series folders found")
    images = [image for image, _ in found]
    problems = []
    for image in images:
        try:
            check_volume(image)
        except InputError as error:
            problems.append(error)
    if problems and (strict or (strict is None and len(problems) == len(images))):
        more = f" (and {len(problems) - 1} more bad image(s))" if len(problems) > 1 else ""
        raise InputError(f"{problems[0]}{more}")
    for problem in problems:
        logger.warning("%s (listed anyway: it will fail on its own, the other images are not affected)", problem)
    items = [{"image": str(image), **({"case": case} if case else {})} for image, case in found]
    return FoundImages(items, ignored)


def labelled_cases(
    dataset_dir: str | os.PathLike, images: str = "imagesTr", labels: str = "labelsTr"
) -> list[dict[str, str]]:
    """Training pairs ``[{"image": ..., "label": ...}, ...]`` from the FLARE layout, sorted by case.

    Each image ``<case>_0000.nii.gz`` needs a label ``<case>.nii.gz`` of the same shape.
    """
    root = _existing_dir(dataset_dir, "dataset_dir")
    image_dir = _existing_dir(root / images, "image")
    label_dir = _existing_dir(root / labels, "label")
    image_files = _nifti_files(image_dir)
    if not image_files:
        raise InputError(f"{image_dir}: no NIfTI images (*.nii.gz, *.nii) found")
    label_files = {case_name(p): p for p in _nifti_files(label_dir)}
    cases = []
    for image in image_files:
        label = label_files.get(case_name(image))
        if label is None:
            raise InputError(f"{image}: no label map {case_name(image)}.nii.gz in {label_dir}")
        image_shape, label_shape = check_volume(image), check_volume(label, "label map")
        if image_shape != label_shape:
            raise InputError(f"{label}: label map shape {label_shape} differs from its image's {image_shape} ({image})")
        cases.append({"image": str(image), "label": str(label)})
    return cases


def attach_masks(cases: Sequence[dict], mask_dir: str | os.PathLike, key: str = "coarse") -> list[dict]:
    """Add ``case[key] = mask_dir/<case>.nii.gz`` (e.g. the coarse stage's label maps) to each case.

    Each mask must exist and have its image's shape.
    """
    mask_dir = _existing_dir(mask_dir, f"{key} mask")
    paired = []
    for case in cases:
        mask = mask_dir / f"{case_name(case['image'])}.nii.gz"
        if not mask.is_file():
            raise InputError(f"{mask}: {key} mask for {case['image']} does not exist")
        image_shape, mask_shape = check_volume(case["image"]), check_volume(mask, f"{key} mask")
        if image_shape != mask_shape:
            raise InputError(f"{mask}: {key} mask shape {mask_shape} differs from its image's {image_shape}")
        paired.append({**case, key: str(mask)})
    return paired


def split_cases(cases: Sequence[dict], num_val: int) -> tuple[list[dict], list[dict]]:
    """Deterministic split: the last ``num_val`` cases validate, the rest train."""
    num_val = int(num_val)
    if not 0 < num_val < len(cases):
        raise InputError(f"num_val={num_val} leaves no case to train or to validate among {len(cases)} cases")
    return list(cases[:-num_val]), list(cases[-num_val:])


def training_cases(
    labelled: Sequence[dict], extra: str | os.PathLike | Sequence[dict] | None = None, labelled_repeat: int = 1
) -> list[dict]:
    """A stage's training list: the labelled training cases ``labelled_repeat`` times (over-sampling them against
    pseudo-labelled ones), then the cases of ``extra``: a datalist (``[{"image": ..., "label": ...}]``, e.g. the
    ``kept.json`` of ``flare-c2f pseudo_label``) or a JSON file holding one. Validation stays labelled-only.

    Each extra case's image and label must exist with one shape. A repeated case is cached once per repeat by a
    ``CacheDataset`` (memory grows with ``labelled_repeat``)."""
    repeat = int(labelled_repeat)
    if repeat < 1:
        raise InputError(f"labelled_repeat must be at least 1, got {labelled_repeat}")
    if extra is None or (isinstance(extra, str) and not extra):
        return list(labelled) * repeat
    if isinstance(extra, (str, os.PathLike)):
        try:
            extra = json.loads(Path(extra).read_text())
        except (OSError, ValueError) as error:
            raise InputError(f"{extra}: extra_datalist is not a readable JSON datalist ({error})") from None
    cases = []
    for case in extra:
        if not isinstance(case, dict) or "image" not in case or "label" not in case:
            raise InputError(f"extra_datalist: each case needs an image and a label, got {case!r}")
        image_shape, label_shape = check_volume(case["image"]), check_volume(case["label"], "label map")
        if image_shape != label_shape:
            raise InputError(f"{case['label']}: label map shape {label_shape} differs from its image's {image_shape}")
        cases.append({"image": str(case["image"]), "label": str(case["label"])})
    return list(labelled) * repeat + cases
