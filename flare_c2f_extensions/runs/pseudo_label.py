"""Pseudo-labels for unlabelled CTs, with a quality gate.

A teacher cascade segments each unlabelled CT; besides the label map, every case gets the signals a filter needs
and a ``keep`` decision (FLARE22's winner trained on filtered pseudo-labels; an unfiltered bad label map teaches
the student the teacher's worst mistakes).

Signals, per case (``OUT/signals/<case>.json``), per organ:

- ``voxels`` and ``volume_ml`` (voxel count x voxel volume from the image's affine) of the final label map;
- ``mean_confidence`` and ``confidence_p5/p10/p25/p50``: statistics of the fused probability of the organ over its
  voxels (the cascade's full-resolution confidence map: where stages overlap, the higher probability);
- ``dropped_components`` / ``dropped_voxels``: what the largest-component step removed, and ``dropped_fraction``,
  the removed share of all voxels the cascade gave the organ;

plus ``missing``, the organs with no voxel at all, ``input_sha256``, the content hash of the CT the label map was
made from (a finished case counts as finished only for that content: a CT replaced by another of the same name is
labelled again), and ``input_warnings``, what reading the CT warned about. The organ volumes are checked against the
labelled cohort's range, taken from a labels folder or from the summary (``volume_reference.json``) a run writes.

The rule (:class:`QualityRule`, every threshold in one place, each overridable) keeps a case only if every check
passes; ``reasons`` lists each failed check in words. Why these checks:

- a missing organ: every FLARE22 abdomen CT holds all 13 organs, so a missing one is a teacher failure (or an
  unusual scan that the student should not learn from either);
- low confidence: the fused probability is the teacher's own doubt; a low mean means the organ as a whole is
  uncertain, a low percentile means a sizeable part of it is (typically a wrong boundary or a merged neighbour);
- a volume far outside the labelled cohort's range: a leak into a neighbour, or most of the organ lost;
- fragmentation: a teacher that had to drop a large share of an organ's voxels as stray components was confused
  (a noise-like image, or an organ split in two);
- an input that is not a CT (reading it warned so: no air, a DICOM modality other than CT): whatever the teacher
  made of it, a student must not learn it as a CT's organs.

The decisions are recomputed from the stored signals on every run, so a changed rule re-gates a finished run
without running the teacher again. ``OUT/quality.json`` holds the rule, every case's signals, ``keep`` and
``reasons``; ``OUT/quality.csv`` one row per case; ``OUT/kept.json`` the kept cases as a datalist
(``[{"image": ..., "label": ...}]``) for training.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import logging
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from tqdm.auto import tqdm

from flare_c2f_extensions.errors import InputError, InputWarnings
from flare_c2f_extensions.io.discovery import case_name, find_images
from flare_c2f_extensions.io.files import content_sha256, prepare_output_dir, write_text_atomic
from flare_c2f_extensions.io.images import image_geometry
from flare_c2f_extensions.io.label_maps import save_label_map
from flare_c2f_extensions.labels import ORGANS
from flare_c2f_extensions.runs.ranks import Ranks

logger = logging.getLogger(__name__)

__all__ = [
    "PERCENTILES",
    "QualityRule",
    "case_signals",
    "decide",
    "pseudo_label",
    "volume_reference",
    "load_volume_reference",
    "organ_quality",
]

PERCENTILES = (5, 10, 25, 50)  # confidence percentiles stored per organ; the rule picks its low one among these
# the input warnings that say an image is not a CT (images.py: no air; dicom.py: another modality)
NOT_A_CT = re.compile(r"\bnot (a )?CT\b")


@dataclass(frozen=True)
class QualityRule:
    """The ``keep`` rule's thresholds. Override any with a dict, a JSON string or a JSON file (:meth:`parse`).

    Defaults, for a trained teacher (confidences are softmax probabilities fused by maximum, so a confident interior
    is near 1 and a boundary voxel, shared by two classes and smoothed by the resizing, near 0.5):
    ``min_mean_confidence`` 0.75 (an organ made mostly of boundary-like doubt), and ``min_low_confidence`` 0.40 at
    ``low_percentile`` 10 (a tenth of the organ where the winner is below even a two-way tie: three or more classes
    compete there, or the teacher barely claimed it); ``max_missing`` 0; organ volumes within the labelled range
    widened by ``volume_factor`` 1.5 either way (``min / 1.5`` to ``max * 1.5``: a small labelled cohort does not
    show the whole population's spread); ``max_dropped_fraction`` 0.20 of an organ's voxels removed as stray components.
    """

    min_mean_confidence: float = 0.75
    min_low_confidence: float = 0.40
    low_percentile: int = 10
    max_missing: int = 0
    volume_factor: float = 1.5
    max_dropped_fraction: float = 0.20

    @classmethod
    def parse(cls, overrides: Mapping | str | os.PathLike | None = None) -> QualityRule:
        """The default rule with ``overrides`` applied: a mapping, a JSON object string or a JSON file's path."""
        if overrides is None or isinstance(overrides, QualityRule):
            return overrides or cls()
        if not isinstance(overrides, Mapping):
            text = str(overrides)
            path = Path(text)
            try:
                overrides = json.loads(path.read_text() if path.is_file() else text)
            except (OSError, json.JSONDecodeError) as error:
                raise InputError(f"{text}: the quality rule must be a JSON object or a JSON file ({error})") from None
            if not isinstance(overrides, Mapping):
                raise InputError(f"{text}: the quality rule must be a JSON object")
        known = {f.name: f.type for f in dataclasses.fields(cls)}
        unknown = sorted(set(overrides) - set(known))
        if unknown:
            raise InputError(f"quality rule: unknown key(s) {', '.join(unknown)}; known: {', '.join(known)}")
        rule = cls(**{key: (int if known[key] == "int" else float)(value) for key, value in overrides.items()})
        if rule.low_percentile not in PERCENTILES:
            raise InputError(f"quality rule: low_percentile must be one of {PERCENTILES}, got {rule.low_percentile}")
        return rule


# ---------------------------------------------------------------------------------------------------------------
# the labelled cohort's organ volumes


def voxel_volume_ml(affine: np.ndarray) -> float:
    return abs(float(np.linalg.det(np.asarray(affine, dtype=np.float64)[:3, :3]))) / 1000.0


def organ_volumes_ml(label_map: np.ndarray, affine: np.ndarray) -> dict[str, float]:
    """Volume in ml of every organ in ``label_map`` (voxel count x voxel volume), by organ name; 0 if absent."""
    voxel_ml = voxel_volume_ml(affine)
    counts = np.bincount(np.asarray(label_map, dtype=np.uint8).ravel(), minlength=len(ORGANS) + 1)
    return {name: float(counts[label]) * voxel_ml for label, name in ORGANS.items()}


def volume_reference(labels: str | os.PathLike | Sequence[str | os.PathLike]) -> dict:
    """Per organ, the range of volumes (ml) in a folder (or a list) of labelled maps: ``{"organs": {name: {"min_ml",
    "max_ml", "median_ml"}}, "cases": n, "source": folder}``. Organs absent from a map do not count for it."""
    if isinstance(labels, (str, os.PathLike)):
        folder = Path(labels)
        found = folder.glob("*.nii*") if folder.is_dir() else []
        files = sorted(p for p in found if p.name.endswith((".nii", ".nii.gz")))
    else:
        files = [Path(p) for p in labels]
        folder = Path(os.path.commonpath([str(p.parent) for p in files])) if files else Path("(no label maps)")
    if not files:
        raise InputError(f"{folder}: no label maps (*.nii.gz) to take the organ volume range from")
    volumes: dict[str, list[float]] = {name: [] for name in ORGANS.values()}
    for path in files:
        image = nib.load(str(path))
        for name, ml in organ_volumes_ml(np.asarray(image.dataobj), image.affine).items():
            if ml > 0:
                volumes[name].append(ml)
    organs = {
        name: {"min_ml": min(v), "max_ml": max(v), "median_ml": float(np.median(v))} for name, v in volumes.items() if v
    }
    return {"organs": organs, "cases": len(files), "source": str(folder)}


def load_volume_reference(reference: str | os.PathLike | Mapping | None) -> dict | None:
    """A volume reference from a labels folder or list (:func:`volume_reference`), a JSON file it wrote, or as is."""
    if reference is None or isinstance(reference, Mapping):
        return reference
    if isinstance(reference, (list, tuple)):
        return volume_reference(reference)
    path = Path(reference)
    if path.is_dir():
        return volume_reference(path)
    try:
        loaded = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise InputError(f"{path}: not a labels folder or a volume reference JSON ({error})") from None
    if not isinstance(loaded, Mapping) or not isinstance(loaded.get("organs"), Mapping):
        raise InputError(f"{path}: a volume reference JSON needs an 'organs' object (see volume_reference.json)")
    return loaded


# ---------------------------------------------------------------------------------------------------------------
# signals and the decision


def case_signals(
    labels: np.ndarray,
    confidence: np.ndarray,
    dropped: Mapping[int, Mapping[str, int]],
    affine: np.ndarray,
) -> dict:
    """The quality signals of one case from the cascade's label map, confidence map (same layout), what the
    largest-component step dropped (``CaseResult.dropped``) and the image's affine; see the module docstring."""
    labels = np.asarray(labels)
    confidence = np.asarray(confidence)
    if labels.shape != confidence.shape:
        raise ValueError(f"label map {labels.shape} and confidence map {confidence.shape} differ in shape")
    from scipy import ndimage

    voxel_ml = voxel_volume_ml(affine)  # each organ's voxels are counted inside its box: no pass over the volume
    boxes = ndimage.find_objects(labels.astype(np.uint8, copy=False), max_label=max(ORGANS))
    organs, missing = {}, []
    for label, name in ORGANS.items():
        box = boxes[label - 1]  # each organ's voxels looked up inside its own box, not the whole volume
        values = confidence[box][labels[box] == label].astype(np.float64) if box is not None else np.empty(0)
        lost = dropped.get(label, {})
        lost_voxels = int(lost.get("voxels", 0))
        signal = {
            "voxels": int(values.size),
            "volume_ml": float(values.size) * voxel_ml,
            "dropped_components": int(lost.get("components", 0)),
            "dropped_voxels": lost_voxels,
            "dropped_fraction": lost_voxels / (values.size + lost_voxels) if values.size + lost_voxels else 0.0,
        }
        if values.size:
            signal["mean_confidence"] = float(values.mean())
            for q, v in zip(PERCENTILES, np.percentile(values, PERCENTILES)):
                signal[f"confidence_p{q}"] = float(v)
        else:
            missing.append(name)
        organs[name] = signal
    return {"organs": organs, "missing": missing}


def decide(
    signals: Mapping, rule: QualityRule | None = None, reference: Mapping | None = None
) -> tuple[bool, list[str]]:
    """``(keep, reasons)``: keep when no check of ``rule`` fails; each failed check is one reason in words.
    ``reference``: the labelled cohort's organ volumes (:func:`volume_reference`); without it volumes are not
    checked."""
    rule = rule or QualityRule()
    ranges = (reference or {}).get("organs", {})
    reasons = []
    missing = list(signals["missing"])
    if len(missing) > rule.max_missing:
        reasons.append(f"missing: {', '.join(missing)}")
    reasons += [f"not a CT: {warning}" for warning in signals.get("input_warnings", []) if NOT_A_CT.search(warning)]
    low_key = f"confidence_p{rule.low_percentile}"
    for name, organ in signals["organs"].items():
        if not organ["voxels"]:
            continue
        if organ["mean_confidence"] < rule.min_mean_confidence:
            reasons.append(f"low confidence: {name} mean {organ['mean_confidence']:.3f} < {rule.min_mean_confidence}")
        if organ[low_key] < rule.min_low_confidence:
            reasons.append(
                f"low confidence: {name} p{rule.low_percentile} {organ[low_key]:.3f} < {rule.min_low_confidence}"
            )
        if name in ranges:
            low, high = ranges[name]["min_ml"] / rule.volume_factor, ranges[name]["max_ml"] * rule.volume_factor
            if not low <= organ["volume_ml"] <= high:
                reasons.append(f"volume: {name} {organ['volume_ml']:.3g} ml outside [{low:.3g}, {high:.3g}] ml")
        if organ["dropped_fraction"] > rule.max_dropped_fraction:
            reasons.append(
                f"fragmented: {name} {organ['dropped_fraction']:.0%} of its voxels in {organ['dropped_components']} "
                f"stray component(s) > {rule.max_dropped_fraction:.0%}"
            )
    return not reasons, reasons


def organ_quality(
    labels: np.ndarray, result, affine: np.ndarray, organs: Sequence[int], rule: QualityRule | None = None,
    reference: Mapping | None = None,
) -> dict:
    """The quality signals of the chosen ``organs`` of one segmented case (``result``: the cascade's
    :class:`CaseResult` with its confidence map) and each organ's flags, the reasons :func:`decide` gives for it alone
    (volume only with a ``reference``): ``{name: {..signals.., "flags": [...]}}``."""
    signals = case_signals(labels, result.confidence, result.dropped, affine)
    quality = {}
    for organ in organs:
        name = ORGANS[organ]
        alone = {"organs": {name: signals["organs"][name]}, "missing": [name] * (name in signals["missing"])}
        quality[name] = {**signals["organs"][name], "flags": decide(alone, rule, reference)[1]}
    return quality


# ---------------------------------------------------------------------------------------------------------------
# the run over a folder


def pseudo_label(
    cascade,
    images: str | os.PathLike | Sequence,
    output_dir: str | os.PathLike,
    reference: str | os.PathLike | Mapping | None = None,
    rule: QualityRule | Mapping | str | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> dict:
    """Pseudo-label every CT in ``images`` (a folder, or a list of paths) with the teacher ``cascade`` (a
    :class:`~flare_c2f_extensions.cascade.pipeline.Cascade`) and gate each case with ``rule``.

    Writes ``output_dir/labels/<case>.nii.gz``, ``output_dir/signals/<case>.json`` and the run's ``quality.json``,
    ``quality.csv`` and ``kept.json`` (see the module docstring); a case whose label map and signals exist is not
    segmented again unless ``overwrite``, but it is gated again. One bad case is reported and the others go on.
    Returns the quality report. Under ``torchrun`` each rank labels its share of the cases and rank 0 gates them
    all and writes the report (the other ranks return ``{"rank": r, "cases": [their cases]}``).
    """
    rule = QualityRule.parse(rule)
    reference = load_volume_reference(reference)
    if isinstance(images, (str, os.PathLike)):
        images = [item["image"] for item in find_images(images, subdir="")]
    images = [os.path.abspath(image) for image in images]  # kept.json is read from other folders
    out = prepare_output_dir(output_dir).absolute()
    ranks = Ranks.from_env()  # under torchrun: this rank's share of the cases, then rank 0 gates them all
    ranks.start()
    mine = ranks.shard([str(image) for image in images], key=case_name)
    cases = []
    bar = tqdm(mine, desc="pseudo-labels", unit="case", disable=not progress or ranks.rank > 0)
    for image in bar:
        bar.set_postfix_str(case_name(image))
        case = _label_case(cascade, image, out, overwrite)
        cases.append({**case, "rank": ranks.rank} if ranks.distributed else case)
    parts = ranks.gather(cases)
    if parts is None:
        return {"rank": ranks.rank, "cases": cases}
    cases = sorted((case for part in parts for case in part), key=lambda case: case["case"])
    if reference is not None:
        write_text_atomic(json.dumps(reference, indent=4) + "\n", out / "volume_reference.json")
    for case in cases:
        if "signals" in case:
            case["keep"], case["reasons"] = decide(case["signals"], rule, reference)
    return write_quality_report(cases, rule, reference, out)


def _finished_signals(signals_path: Path, label_path: Path, sha256: str) -> tuple[dict | None, str | None]:
    """``(signals, None)`` when an earlier run labelled this very input, else ``(None, why it must be redone)``."""
    if not (label_path.is_file() and signals_path.is_file()):
        return None, None
    try:
        stored = json.loads(signals_path.read_text())
    except (OSError, ValueError) as error:
        return None, f"its signals cannot be read ({error})"
    if not isinstance(stored, dict) or stored.get("input_sha256") != sha256:
        return None, "its input changed since it was labelled (another sha256)"
    return stored, None


def _label_case(cascade, image: str, out: Path, overwrite: bool) -> dict:
    """Segment one case and store its label map and signals, or read them back from an earlier run that labelled
    the same input (by content)."""
    name = case_name(image)
    label_path, signals_path = out / "labels" / f"{name}.nii.gz", out / "signals" / f"{name}.json"
    redone = None
    try:
        with InputWarnings() as warned:
            sha256 = content_sha256(image)
            if not overwrite:
                stored, redone = _finished_signals(signals_path, label_path, sha256)
                if stored is not None:
                    return {"case": name, "image": image, "label": str(label_path), "status": "exists",
                            "signals": stored}
                if redone:
                    logger.warning("%s: %s: labelling it again", label_path, redone)
            result = cascade.segment(image, keep_confidence=True)
            geometry = image_geometry(image)
            signals = case_signals(result.labels, result.confidence, result.dropped, geometry.affine)
            signals.update(input_sha256=sha256, input_warnings=list(warned.messages))
            save_label_map(result.labels, geometry, out / "labels")
            write_text_atomic(json.dumps(signals, indent=4) + "\n", signals_path)  # last: marks the case done
    except (KeyboardInterrupt, SystemExit):
        raise
    except Exception as error:  # one bad case must not stop the run
        message = str(error) if isinstance(error, InputError) else f"{image}: {type(error).__name__}: {error}"
        logger.error("failed: %s", message)
        return {"case": name, "image": image, "status": "failed", "error": message, **warned.as_dict()}
    return {"case": name, "image": image, "label": str(label_path), "status": "done", "signals": signals,
            **({"redone": redone} if redone else {}), **warned.as_dict()}


def write_quality_report(cases: Sequence[dict], rule: QualityRule, reference: Mapping | None, out: Path) -> dict:
    """``quality.json`` (everything), ``quality.csv`` (a row per case) and ``kept.json`` (a training datalist)."""
    kept = [{"image": case["image"], "label": case["label"]} for case in cases if case.get("keep")]
    report = {
        "rule": dataclasses.asdict(rule),
        "volume_reference": reference["source"] if reference else None,
        "num_cases": len(cases),
        "num_kept": len(kept),
        "num_failed": sum(case["status"] == "failed" for case in cases),
        "cases": list(cases),
    }
    table = io.StringIO()
    writer = csv.writer(table, lineterminator="\n")
    writer.writerow(["case", "status", "keep", "missing", "min_mean_confidence", "max_dropped_fraction", "reasons"])
    for case in cases:
        signals = case.get("signals", {"organs": {}, "missing": []})
        present = [organ for organ in signals["organs"].values() if organ["voxels"]]
        writer.writerow([
            case["case"], case["status"], case.get("keep", ""), len(signals["missing"]) if "signals" in case else "",
            round(min((o["mean_confidence"] for o in present), default=0.0), 4) if present else "",
            round(max((o["dropped_fraction"] for o in present), default=0.0), 4) if present else "",
            "; ".join(case.get("reasons", [])) or case.get("error", ""),
        ])
    write_text_atomic(json.dumps(kept, indent=4) + "\n", out / "kept.json")
    write_text_atomic(table.getvalue(), out / "quality.csv")
    write_text_atomic(json.dumps(report, indent=4) + "\n", out / "quality.json")
    logger.info("pseudo-labels: %d of %d case(s) kept", len(kept), len(cases))
    return report
