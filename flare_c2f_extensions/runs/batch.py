"""The one batch runner: many CTs through one cascade, for ``flare-c2f segment``, the cascade bundle's run
(``configs/inference.json``, also under ``torchrun``) and pseudo-labelling.

:class:`BatchRunner` owns what every batch needs: each case's share of the ranks under ``torchrun``
(:class:`~.ranks.Ranks`), the claim of each output (two inputs that would write one file: the later fails), the
finished-output check (a case done before with the same input and options is skipped, one that changed is redone,
and the report says why), failure isolation (one bad case is reported, the others go on), the warnings each case
logged, its seconds and memory (:class:`~.resources.ResourceMonitor`), progress, every rank's cases handed to
rank 0, and reading ahead: while a case runs, the next one's input is decoded on a background thread (where the work
can, :meth:`CaseWork.read_ahead`), so that on a GPU, which waits for the CPU's reading otherwise, the reading of one
case overlaps the networks of the one before. What a case writes is the caller's :class:`CaseWork`.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from flare_c2f_extensions.errors import FAILED_CASES_EXIT_STATUS, input_error_in
from flare_c2f_extensions.runs.ranks import Ranks
from flare_c2f_extensions.runs.resources import ResourceMonitor

__all__ = ["BatchRunner", "Case", "CaseWork", "CollectWarnings", "end_on_failures", "summarise"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Case:
    """One input of a batch: the image (NIfTI file or DICOM series folder), its case name and its label map."""

    image: str
    name: str
    target: Path


class CaseWork(Protocol):
    """What a batch does with each case."""

    def finished(self, case: Case) -> tuple[str | None, dict]:
        """``(None, fields)`` when the case's outputs are there from an earlier run of the same input and options
        (``fields`` go into its report entry); ``("", {})`` when there are none; ``(why, {})`` when they must be
        made again."""

    def process(self, case: Case, ahead=None) -> dict:
        """Segment the case and write its outputs; the fields of its report entry. ``ahead``: what
        :meth:`read_ahead` gave for this case, if the work has one (else ``None``)."""

    # optional: def read_ahead(self, case: Case) -> object | None
    #     Decode the case's input, on a background thread while the case before it runs; what it returns reaches
    #     process(case, ahead). It must log nothing (its warnings would land in the other case's entry); whatever it
    #     raises is the case's failure, at its turn. Not called for a case that is finished (and not overwritten).


class CollectWarnings(logging.Handler):
    """The package's warnings while it is attached (a case, or loading the cascade), for a report; printed as
    ``warning: ...`` with ``echo``."""

    def __init__(self, echo: bool):
        super().__init__(logging.WARNING)
        self.echo = echo
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        self.messages.append(message)
        if self.echo:
            print(f"warning: {message}", file=sys.stderr)


class BatchRunner:
    """Run ``work`` over ``cases`` on ``device``. ``progress``: ``"bar"`` (a tqdm bar), ``"lines"`` (a line per case
    on stderr, with the case's warnings) or ``None``; only rank 0 shows it. ``overwrite``: make every case again.

    :meth:`run` returns, on rank 0, ``{"cases": [...], "ranks": [...]}`` with every rank's cases sorted by case name
    (``ranks``: per rank its device, threads and cases, under ``torchrun`` only), and ``None`` on the other ranks.
    Each case entry: ``case``, ``input``, ``output``, ``status`` (``done``, ``exists`` or ``failed``), ``redone`` (why
    it was made again), ``error``, ``warnings``, seconds and memory of a done case, and what ``work`` adds.
    """

    def __init__(self, work: CaseWork, cases: Sequence[Case], device="cpu", overwrite: bool = False,
                 progress: str | None = "bar", desc: str = "cases"):
        self.work, self.cases, self.device = work, list(cases), device
        self.overwrite, self.progress, self.desc = overwrite, progress, desc

    def run(self) -> dict | None:
        import torch

        ranks = Ranks.from_env()
        threads = ranks.threads(device=str(self.device) if self.device is not None else None)
        if ranks.distributed and threads:
            torch.set_num_threads(threads)
        ranks.start()
        mine = ranks.shard(self.cases, key=lambda case: str(case.target))  # one output's claimants stay together
        shown = self.progress if ranks.rank == 0 else None
        claimed: dict[str, str] = {}
        done = []
        with ReadAhead(self._read_ahead if hasattr(self.work, "read_ahead") else None, mine) as reader:
            for number, case in enumerate(self._bar(mine, shown), start=1):
                entry = self._one(case, claimed, echo=shown == "lines", ahead=reader.take(number - 1))
                done.append(entry)
                if shown == "lines":
                    print(case_line(entry, number, len(mine)), file=sys.stderr)
        part = {"cases": done, "device": str(self.device), "threads": torch.get_num_threads()}
        parts = ranks.gather(part)
        if parts is None:
            return None
        cases = sorted((case for part in parts for case in part["cases"]), key=lambda c: (c["case"], c["output"]))
        if not ranks.distributed:
            return {"cases": cases, "ranks": []}
        by_rank = [{"rank": rank, "device": part["device"], "threads": part["threads"],
                    "cases": [case["case"] for case in part["cases"]]} for rank, part in enumerate(parts)]
        return {"cases": cases, "ranks": by_rank}

    def _bar(self, cases, shown):
        if shown != "bar":
            return cases
        from tqdm.auto import tqdm

        def named(bar):
            for case in bar:
                bar.set_postfix_str(case.name)
                yield case

        return named(tqdm(cases, desc=self.desc, unit="case"))

    def _read_ahead(self, case: Case):
        if not self.overwrite and self.work.finished(case)[0] is None:
            return None  # skipped at its turn: nothing to read
        return self.work.read_ahead(case)

    def _one(self, case: Case, claimed: dict, echo: bool, ahead: Future | None = None) -> dict:
        entry = {"case": case.name, "input": str(case.image), "output": str(case.target)}
        owner = claimed.setdefault(str(case.target), str(case.image))
        if owner != str(case.image):
            message = f"{case.image}: its output {case.target} is already that of {owner} in this batch"
            logger.error("failed: %s", message)
            return {**entry, "status": "failed", "error": message}
        warned = CollectWarnings(echo)
        package = logging.getLogger("flare_c2f_extensions")
        package.addHandler(warned)
        try:
            redone, fields = ("", {}) if self.overwrite else self.work.finished(case)
            if redone is None:
                entry.update(status="exists", **fields)
            else:
                if redone:
                    entry["redone"] = redone
                    logger.warning("%s: exists but %s: segmenting the case again", case.target, redone)
                with ResourceMonitor(self.device) as monitor:
                    fields = self.work.process(case, ahead.result()) if ahead else self.work.process(case)
                entry.update(status="done", **monitor.usage.as_dict(), **fields)
        except (KeyboardInterrupt, SystemExit):
            raise
        except Exception as error:  # one bad case must not stop the others
            cause = input_error_in(error)
            message = str(cause) if cause else f"{case.image}: {type(error).__name__}: {error}"
            if not echo:
                logger.error("failed: %s", message)
            entry.update(status="failed", error=message)
        finally:
            package.removeHandler(warned)
        if warned.messages:
            entry["warnings"] = warned.messages
        return entry


class ReadAhead:
    """``read(case)`` of the case after the one taken, on one background thread: ``take(i)`` gives case ``i``'s
    future (``None`` for the first case, which is read in its turn) and starts reading case ``i + 1``. With no
    ``read`` or a single case nothing runs in the background."""

    def __init__(self, read: Callable[[Case], object] | None, cases: Sequence[Case]):
        self.read, self.cases = (read if len(cases) > 1 else None), list(cases)
        self.futures: dict[int, Future] = {}
        self.pool: ThreadPoolExecutor | None = None

    def __enter__(self) -> ReadAhead:
        if self.read is not None:
            self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="read-ahead")
        return self

    def __exit__(self, *exc) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)

    def take(self, index: int) -> Future | None:
        if self.pool is None:
            return None
        following = index + 1
        if following < len(self.cases):
            self.futures[following] = self.pool.submit(self.read, self.cases[following])
        return self.futures.pop(index, None)


def case_line(case: dict, number: int, total: int) -> str:
    status = case["status"]
    if status == "done":
        return f"[{number}/{total}] {case['case']}: {case['seconds']:.1f} s -> {case['output']}"
    if status == "exists":
        return f"[{number}/{total}] {case['case']}: {case['output']} exists, skipped (--overwrite to redo it)"
    return f"[{number}/{total}] {case['case']}: failed: {case['error']}"


def summarise(cases: list[dict], device, ignored: Sequence[dict] = ()) -> dict:
    """A batch report's summary: counts by status, means of the done cases' seconds and memory, ignored inputs."""
    done = [case for case in cases if case["status"] == "done"]
    summary = {"device": str(device), "cases": cases, "num_done": len(done)}
    summary["num_failed"] = sum(case["status"] == "failed" for case in cases)
    summary["num_existing"] = sum(case["status"] == "exists" for case in cases)
    summary["num_redone"] = sum("redone" in case for case in cases)
    summary["ignored_inputs"] = list(ignored)
    if done:
        for key in ("seconds", "peak_rss_mb", "peak_gpu_mb", "gpu_mb_seconds", "cpu_percent_seconds"):
            summary[f"mean_{key}"] = round(float(np.mean([case[key] for case in done])), 2)
        summary["max_peak_rss_mb"] = max(case["peak_rss_mb"] for case in done)
    return summary


def end_on_failures(cases: Sequence[dict], report_path: Path) -> None:
    """List the failed cases on stderr and end the process with :data:`FAILED_CASES_EXIT_STATUS` (the bundle's run
    and the commands: 0 only when every case is done or was already finished)."""
    failed = [case for case in cases if case["status"] == "failed"]
    if not failed:
        return
    for case in failed:
        print(f"failed: {case['case']}: {case['error']}", file=sys.stderr)
    print(f"error: {len(failed)} of {len(cases)} case(s) failed (listed above and in {report_path}); exit status "
          f"{FAILED_CASES_EXIT_STATUS}", file=sys.stderr)
    raise SystemExit(FAILED_CASES_EXIT_STATUS)
