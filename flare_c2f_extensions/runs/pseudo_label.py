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
from collections.abc import Mapping, Sequence
from pathlib import Path

from flare_c2f_extensions.errors import InputWarnings
from flare_c2f_extensions.evaluation.quality import QualityRule, case_signals, decide, load_volume_reference
from flare_c2f_extensions.io.discovery import case_name, find_images
from flare_c2f_extensions.io.files import content_sha256, prepare_output_dir, write_text_atomic
from flare_c2f_extensions.io.images import CT
from flare_c2f_extensions.io.label_maps import save_label_map
from flare_c2f_extensions.runs.batch import BatchRunner, Case

logger = logging.getLogger(__name__)

__all__ = ["PseudoLabelWork", "pseudo_label", "write_quality_report"]

def pseudo_label(
    cascade,
    images: str | os.PathLike | Sequence,
    output_dir: str | os.PathLike,
    reference: str | os.PathLike | Mapping | None = None,
    rule: QualityRule | Mapping | str | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> dict | None:
    """Pseudo-label every CT in ``images`` (a folder, or a list of paths) with the teacher ``cascade`` (a
    :class:`~flare_c2f_extensions.cascade.pipeline.Cascade`) and gate each case with ``rule``.

    Writes ``output_dir/labels/<case>.nii.gz``, ``output_dir/signals/<case>.json`` and the run's ``quality.json``,
    ``quality.csv`` and ``kept.json`` (see the module docstring); a case whose label map and signals exist for the
    same input is not segmented again unless ``overwrite``, but it is gated again. Claims, failures and ranks: the one
    :class:`~.batch.BatchRunner`. Returns the quality report on rank 0 (``None`` on the other ranks under
    ``torchrun``: rank 0 gates every case and writes the report).
    """
    rule = QualityRule.parse(rule)
    reference = load_volume_reference(reference)
    if isinstance(images, (str, os.PathLike)):
        images = [item["image"] for item in find_images(images, subdir="")]
    out = prepare_output_dir(output_dir).absolute()
    cases = [Case(os.path.abspath(image), name := case_name(image), out / "labels" / f"{name}.nii.gz")
             for image in images]  # absolute: kept.json is read from other folders
    batch = BatchRunner(PseudoLabelWork(cascade, out), cases, cascade.device, overwrite,
                        "bar" if progress else None, desc="pseudo-labels").run()
    if batch is None:
        return None
    if reference is not None:
        write_text_atomic(json.dumps(reference, indent=4) + "\n", out / "volume_reference.json")
    for case in batch["cases"]:
        if "signals" in case:
            case["keep"], case["reasons"] = decide(case["signals"], rule, reference)
    return write_quality_report(batch["cases"], rule, reference, out, batch["ranks"])


class PseudoLabelWork:
    """Each case: its label map and its signals (``signals/<case>.json``, written last: it marks the case done),
    or both read back from an earlier run that labelled the same input (by content)."""

    def __init__(self, cascade, out: Path):
        self.cascade, self.out = cascade, out

    def _signals_path(self, case) -> Path:
        return self.out / "signals" / f"{case.name}.json"

    def finished(self, case):
        if not (case.target.is_file() and self._signals_path(case).is_file()):
            return "", {}
        try:
            stored = json.loads(self._signals_path(case).read_text())
        except (OSError, ValueError) as error:
            return f"its signals cannot be read ({error})", {}
        if not isinstance(stored, dict) or stored.get("input_sha256") != content_sha256(case.image):
            return "its input changed since it was labelled (another sha256)", {}
        return None, {"signals": stored}

    def read_ahead(self, case) -> CT:
        """The case's CT, its voxels decoded (:meth:`CT.decode`)."""
        return CT.open(case.image).decode()

    def process(self, case, ahead: CT | None = None) -> dict:
        with InputWarnings() as warned:  # the input's warnings (NaN voxels, ...) are logged here, not when read ahead
            sha256 = content_sha256(case.image)
            ct = ahead or CT.open(case.image)
            result = self.cascade.segment(ct, keep_confidence=True)
        signals = case_signals(result.labels, result.confidence, result.dropped, ct.affine)
        signals.update(input_sha256=sha256, input_warnings=list(warned.messages))
        save_label_map(result.labels, ct.geometry, case.target.parent)
        write_text_atomic(json.dumps(signals, indent=4) + "\n", self._signals_path(case))
        return {"signals": signals}


def write_quality_report(
    cases: Sequence[dict], rule: QualityRule, reference: Mapping | None, out: Path, ranks: Sequence[dict] = ()
) -> dict:
    """``quality.json`` (everything), ``quality.csv`` (a row per case) and ``kept.json`` (a training datalist)."""
    kept = [{"image": case["input"], "label": case["output"]} for case in cases if case.get("keep")]
    report = {
        "rule": dataclasses.asdict(rule),
        "volume_reference": reference["source"] if reference else None,
        "num_cases": len(cases),
        "num_kept": len(kept),
        "num_failed": sum(case["status"] == "failed" for case in cases),
        "cases": list(cases),
        **({"ranks": list(ranks)} if ranks else {}),
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
