"""Quality signals of a label map made without a reference, and the rule that judges them.

Per organ (:func:`case_signals`): ``voxels`` and ``volume_ml``; ``mean_confidence`` and ``confidence_p5/p10/p25/p50``
of the cascade's fused probability over the organ's voxels; ``dropped_components`` / ``dropped_voxels`` /
``dropped_fraction``, what the largest-component step removed; plus ``missing``, the organs with no voxel. The organ
volumes are checked against a labelled cohort's range (:func:`volume_reference`). :class:`QualityRule` holds every
threshold; :func:`decide` keeps a case only when every check passes and says why not in words. ``flare-c2f
segment`` reports each organ's signals and flags (:func:`organ_quality`); pseudo-labelling gates cases with them
(:mod:`~flare_c2f_extensions.runs.pseudo_label`, whose docstring says why each check is there).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

from flare_c2f_extensions.errors import InputError
from flare_c2f_extensions.labels import ORGANS
from flare_c2f_extensions.transforms.boxes import label_boxes

__all__ = [
    "PERCENTILES", "QualityRule", "case_signals", "decide", "load_volume_reference", "organ_quality",
    "organ_volumes_ml", "volume_reference", "voxel_volume_ml",
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
    voxel_ml = voxel_volume_ml(affine)  # each organ's voxels are counted inside its box: no pass over the volume
    boxes = label_boxes(labels.astype(np.uint8, copy=False), max_label=max(ORGANS))
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
