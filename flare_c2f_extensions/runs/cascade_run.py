"""The cascade bundle's run (``configs/inference.json``'s ``evaluator``, one process or under ``torchrun``): a folder
of CTs to label maps and an efficiency report, through the one :class:`~.batch.BatchRunner`."""

from __future__ import annotations

import csv
import io
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

from flare_c2f_extensions.errors import InputError
from flare_c2f_extensions.io.discovery import case_name
from flare_c2f_extensions.io.files import (
    finished,
    output_provenance_of,
    outputs_apart_from_inputs,
    prepare_output_dir,
    refuse_foreign_outputs,
    write_text_atomic,
)
from flare_c2f_extensions.io.images import CT
from flare_c2f_extensions.io.label_maps import save_label_map
from flare_c2f_extensions.options import as_bool
from flare_c2f_extensions.runs.batch import BatchRunner, Case, end_on_failures, summarise

__all__ = ["CascadeRunner", "LabelMapWork", "write_efficiency_report"]


class LabelMapWork:
    """Each case: its label map, with the record of where it came from (:func:`files.output_provenance_of`)."""

    def __init__(self, cascade):
        self.cascade = cascade
        self.labels_options = cascade.labels_options()
        self.provenance: dict[str, dict | None] = {}

    def finished(self, case: Case):
        try:
            provenance = output_provenance_of(case.image, self.labels_options)
        except (OSError, InputError):  # an unreadable input fails when it is segmented, with its own message
            self.provenance[case.image] = None
            return "", {}
        self.provenance[case.image] = provenance
        return finished(case.target, provenance), {}

    def process(self, case: Case) -> dict:
        if case.image not in self.provenance:
            self.finished(case)
        ct = CT.open(case.image)
        result = self.cascade.segment(ct)
        save_label_map(result.labels, ct.geometry, case.target.parent, name=case.name,
                       provenance=self.provenance.pop(case.image))
        return {"stage_seconds": {k: round(v, 3) for k, v in result.seconds.items()}, "skipped_stages": result.skipped}


class CascadeRunner:
    """Segment a batch of CTs with one :class:`~flare_c2f_extensions.cascade.pipeline.Cascade`.

    ``dataset``: ``[{"image": path}, ...]`` (``find_images``; an item's ``"case"`` names its output where given) or
    paths. Writes ``output_dir/<case>.nii.gz`` and ``output_dir/<report_name>.json`` / ``.csv`` (per case: status,
    seconds by stage, peak RSS, GPU peak and memory-time area, CPU-time area; in the JSON also its warnings and the
    entries of the input folder that were ignored, with why). ``run()`` returns the report (``None`` on a rank other
    than 0 under ``torchrun``: rank 0 writes the one report).

    Before any case, one :class:`~flare_c2f_extensions.errors.InputError` refuses an output folder that cannot be
    created and written, whose outputs would overwrite an input or be taken for inputs on the next run, or that holds
    a label map this tool did not write (another CT, an edited map) unless ``overwrite``. Claims, finished cases,
    failures and ranks: :class:`~.batch.BatchRunner`. ``exit_on_failure``: end the process with exit status 3 when a
    case failed, after writing the report (the bundle sets it).
    """

    def __init__(
        self,
        cascade,
        dataset: Sequence,
        output_dir: str | os.PathLike,
        overwrite: bool = False,
        progress: bool = True,
        report_name: str = "efficiency",
        exit_on_failure: bool = False,
    ):
        self.cascade = cascade
        items = [item if isinstance(item, Mapping) else {"image": item} for item in dataset]
        self.output_dir = Path(output_dir)
        self.cases = [Case(str(item["image"]), name := item.get("case") or case_name(item["image"]),
                           self.output_dir / f"{name}.nii.gz") for item in items]
        self.ignored = list(getattr(dataset, "ignored", []))
        self.overwrite = as_bool(overwrite, "overwrite")  # a config override may give "false", a truthy string
        self.progress = as_bool(progress, "progress")
        self.report_name = report_name
        self.exit_on_failure = as_bool(exit_on_failure, "exit_on_failure")

    def run(self) -> dict | None:
        outputs_apart_from_inputs([(case.image, case.name) for case in self.cases], self.output_dir)
        refuse_foreign_outputs([(case.image, case.target) for case in self.cases], self.overwrite)
        prepare_output_dir(self.output_dir)
        runner = BatchRunner(LabelMapWork(self.cascade), self.cases, self.cascade.device, self.overwrite,
                             "bar" if self.progress else None, desc="cascade")
        batch = runner.run()
        if batch is None:
            return None
        report = {**summarise(batch["cases"], self.cascade.device, self.ignored),
                  **({"world_size": len(batch["ranks"]), "ranks": batch["ranks"]} if batch["ranks"] else {})}
        write_efficiency_report(report, self.output_dir, self.report_name)
        if self.exit_on_failure:
            end_on_failures(report["cases"], self.output_dir / f"{self.report_name}.json")
        return report


def write_efficiency_report(report: dict, output_dir: Path, name: str) -> None:
    """``<name>.json`` (everything) and ``<name>.csv`` (a row per case, a column per stage's seconds)."""
    stages = sorted({stage for case in report["cases"] for stage in case.get("stage_seconds", {})})
    columns = ["case", "status", "seconds", "peak_rss_mb", "peak_gpu_mb", "gpu_mb_seconds", "cpu_percent_seconds"]
    table = io.StringIO()
    writer = csv.writer(table, lineterminator="\n")
    writer.writerow(columns + [f"{stage}_seconds" for stage in stages] + ["error"])
    for case in report["cases"]:
        times = case.get("stage_seconds", {})
        row = [case.get(c, "") for c in columns] + [times.get(s, "") for s in stages] + [case.get("error", "")]
        writer.writerow(row)
    try:
        write_text_atomic(table.getvalue(), output_dir / f"{name}.csv")
        write_text_atomic(json.dumps(report, indent=4) + "\n", output_dir / f"{name}.json")
    except OSError as error:
        where = output_dir / f"{name}.json"
        raise InputError(f"{where}: the report cannot be written ({error.strerror or error})") from None
