"""Self-training on unlabelled CTs: teacher, filtered pseudo-labels, student; round after round.

``self_train(dataset_dir, unlabelled, out, rounds)`` (``flare-c2f self_train``):

- round 0: the teacher, trained on the labelled cases with :func:`~.train.train_cascade` into
  ``out/round_0/bundles`` (or given bundles, ``teacher=DIR``);
- round k = 1..K: the best cascade so far pseudo-labels the unlabelled CTs (``out/round_k/pseudo``, gated by
  :mod:`.pseudo_label`'s rule, the organ volume range taken from the labelled training cases); a student cascade is
  trained from scratch into ``out/round_k/bundles`` on the labelled training cases (repeated ``labelled_repeat``
  times, so that they keep their weight against many pseudo-labelled ones) plus the kept pseudo-labelled cases,
  through every stage's ``extra_datalist`` / ``labelled_repeat`` config keys;
- after every round the round's cascade is scored on the labelled validation cases (the last ``num_val``, never
  trained on, never pseudo-labelled) with the FLARE22 metrics (``out/round_k/evaluation``).

``out/self_train.json`` records each round (mean DSC and NSD, per organ, pseudo-labels kept) and ``best``: the round
with the highest validation mean DSC, whose ``bundles`` folder is the result (``flare-c2f segment --bundles_dir``).
Everything resumes: a scored round is not redone, an unfinished training resumes its stage, pseudo-labelling skips
finished cases.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path

from flare_c2f_extensions.errors import InputError
from flare_c2f_extensions.io.discovery import find_images, labelled_cases, split_cases
from flare_c2f_extensions.io.files import write_text_atomic

__all__ = ["self_train", "evaluate_bundles"]

logger = logging.getLogger(__name__)


def evaluate_bundles(bundles_dir, dataset_dir, num_val: int, out: Path, device=None, progress: bool = True) -> dict:
    """FLARE22 DSC and NSD of the cascade in ``bundles_dir`` on the labelled validation cases; written to ``out``."""
    from flare_c2f_extensions.cascade.pipeline import Cascade
    from flare_c2f_extensions.evaluation.metrics import evaluate_folder
    from flare_c2f_extensions.runs.cascade_run import CascadeRunner

    _, val = split_cases(labelled_cases(dataset_dir), num_val)
    cascade = Cascade.from_bundles(bundles_dir, device=device)
    CascadeRunner(cascade, [c["image"] for c in val], out / "predictions", overwrite=True, progress=progress).run()
    return evaluate_folder(str(out / "predictions"), [c["label"] for c in val], str(out))


def _round_record(name: str, bundles: Path, summary: Mapping, pseudo: Mapping | None = None) -> dict:
    record = {
        "round": name,
        "bundles": str(bundles),
        "mean_DSC": round(summary["mean_DSC"], 4),
        "mean_NSD": round(summary["mean_NSD"], 4),
        "organs": summary["organs"],
    }
    if pseudo is not None:
        record.update(pseudo_labelled=pseudo["num_cases"], pseudo_kept=pseudo["num_kept"])
    return record


def _write_state(out: Path, rounds: list[dict]) -> dict:
    best = max(rounds, key=lambda r: r["mean_DSC"]) if rounds else None
    state = {"rounds": rounds, "best": best and {k: best[k] for k in ("round", "bundles", "mean_DSC", "mean_NSD")}}
    write_text_atomic(json.dumps(state, indent=4) + "\n", out / "self_train.json")
    return state


def _train(dataset_dir, bundles: Path, epochs, device, overrides, num_val, extra: Mapping | None = None) -> None:
    from flare_c2f_extensions.options import parse_overrides
    from flare_c2f_extensions.training.train import train_cascade

    merged = parse_overrides(overrides)
    if extra:
        merged.setdefault("all", {}).update(extra)
    train_cascade(dataset_dir, bundles, epochs=epochs, device=device, overrides=merged, num_val=num_val, evaluate=False)


def _teacher_round(dataset_dir, out: Path, teacher, epochs, device, overrides, num_val, progress) -> dict:
    """Round 0: the given teacher's bundles, or a teacher trained on the labelled cases, scored on validation."""
    bundles = Path(teacher) if teacher is not None else out / "round_0" / "bundles"
    if teacher is None:
        _train(dataset_dir, bundles, epochs, device, overrides, num_val)
    summary = evaluate_bundles(bundles, dataset_dir, num_val, out / "round_0" / "evaluation", device, progress)
    return _round_record("round_0", bundles, summary)


def _student_round(k: int, teacher: Path, dataset_dir, unlabelled, out: Path, options: Mapping) -> dict:
    """Round k: pseudo-label with ``teacher``, train a student on labelled + kept cases, score it."""
    from flare_c2f_extensions.cascade.pipeline import Cascade
    from flare_c2f_extensions.runs.pseudo_label import pseudo_label

    folder = out / f"round_{k}"
    train, _ = split_cases(labelled_cases(dataset_dir), options["num_val"])
    cascade = Cascade.from_bundles(teacher, device=options["device"])
    quality = pseudo_label(cascade, unlabelled, folder / "pseudo", reference=[c["label"] for c in train],
                           rule=options["rule"], progress=options["progress"])
    del cascade
    kept = folder / "pseudo" / "kept.json"
    if not quality["num_kept"]:
        logger.warning("round %d: no pseudo-label passed the quality gate; the student trains on labelled cases", k)
    extra = {"extra_datalist": str(kept), "labelled_repeat": int(options["labelled_repeat"])}
    bundles = folder / "bundles"
    _train(dataset_dir, bundles, options["epochs"], options["device"], options["overrides"], options["num_val"], extra)
    summary = evaluate_bundles(bundles, dataset_dir, options["num_val"], folder / "evaluation", options["device"],
                               options["progress"])
    return _round_record(f"round_{k}", bundles, summary, quality)


def self_train(
    dataset_dir: str | os.PathLike,
    unlabelled: str | os.PathLike,
    out: str | os.PathLike,
    rounds: int = 1,
    teacher: str | os.PathLike | None = None,
    epochs: int | None = None,
    device: str | None = None,
    overrides=None,
    num_val: int = 10,
    labelled_repeat: int = 1,
    rule=None,
    progress: bool = True,
) -> dict:
    """Self-train the cascade for ``rounds`` rounds (see the module docstring); returns ``self_train.json``'s content.

    ``overrides``, ``epochs``, ``device`` and ``num_val`` go to every training (as ``flare-c2f train``'s);
    ``rule``: the pseudo-label quality rule's overrides (:class:`~.pseudo_label.QualityRule`)."""
    out = Path(out)
    if int(rounds) < 1:
        raise InputError(f"rounds must be at least 1, got {rounds}")
    find_images(unlabelled, subdir="")  # fail now, not after training the teacher, if there is nothing to label
    split_cases(labelled_cases(dataset_dir), num_val)
    state_file = out / "self_train.json"
    done = {r["round"]: r for r in json.loads(state_file.read_text())["rounds"]} if state_file.is_file() else {}
    out.mkdir(parents=True, exist_ok=True)
    records = []
    options = dict(epochs=epochs, device=device, overrides=overrides, num_val=num_val, labelled_repeat=labelled_repeat,
                   rule=rule, progress=progress)
    for k in range(int(rounds) + 1):
        name = f"round_{k}"
        if name in done:
            print(f"{name}: scored before (mean DSC {done[name]['mean_DSC']}), skipped", flush=True)
            records.append(done[name])
            continue
        if k == 0:
            record = _teacher_round(dataset_dir, out, teacher, epochs, device, overrides, num_val, progress)
        else:
            best = Path(max(records, key=lambda r: r["mean_DSC"])["bundles"])
            record = _student_round(k, best, dataset_dir, unlabelled, out, options)
        records.append(record)
        state = _write_state(out, records)
        kept = f", {record['pseudo_kept']} of {record['pseudo_labelled']} pseudo-labels kept" if k else ""
        print(f"{name}: validation mean DSC {record['mean_DSC']:.4f}, NSD {record['mean_NSD']:.4f}{kept}", flush=True)
    state = _write_state(out, records)
    print(f"best: {state['best']['round']} (mean DSC {state['best']['mean_DSC']:.4f}) -> {state['best']['bundles']}",
          flush=True)
    return state
