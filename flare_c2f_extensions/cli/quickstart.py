"""The quickstart: from nothing to evaluated cascade segmentations of a generated cohort, on the CPU.

It is ``flare-c2f train`` (every stage through its bundle's own train config, with a small preset by override:
:func:`quick_overrides`) and ``flare-c2f segment`` (the held-out cases, with the trained bundles as they are) on a
generated cohort, then the FLARE22 metrics and a PNG overlay per case. It prints one line per stage; each stage's
own logs (per-iteration losses) go to ``<out>/bundles/<bundle>/logs/``, the rest to ``<out>/logs/``. The trained
bundles in ``<out>/bundles`` are complete and reusable, and the last line is the command that segments a new CT
with them. It is also the smallest end-to-end check of the product.
"""

from __future__ import annotations

import contextlib
import json
import logging
import sys
import time
from pathlib import Path

from flare_c2f_extensions.labels import GROUPS
from flare_c2f_extensions.paths import BUNDLES_DIR, STAGE_BUNDLES

__all__ = [
    "QUICK_STAGES", "QUICK_NETWORK", "QUICK_TRAINING", "LOG_DIR",
    "quick_overrides", "quickstart", "train_stages", "training_runs", "run_bundle", "logs_to_file",
]

# Training overrides of every stage for a quick CPU run (ordinary config overrides). A high learning rate and
# small grids let each stage learn in a minute or two of one core; the stages whose organs learn last train longest
# (the coarse stage and the locator; the solid group, whose left kidney and spleen part only after epoch 40).
# Learning slows to a plateau after about 20 epochs and the organs only come out in the second half of the run:
# shorter runs or earlier learning-rate decay lose far more accuracy than they save time.
QUICK_STAGES = {
    name: (STAGE_BUNDLES[name], settings)
    for name, settings in {
        "coarse": {"spatial_size": [48, 48, 48], "max_epochs": 60},
        "solid": {"spatial_size": [48, 48, 48], "max_epochs": 60},
        "digestive": {"spatial_size": [48, 48, 48], "max_epochs": 40},
        "vessels": {"spatial_size": [48, 48, 48], "max_epochs": 40},
        "locator": {"spatial_size": [48, 48, 48], "max_epochs": 60},
        "refiner": {"spatial_size": [32, 32, 32], "max_epochs": 40},
    }.items()
}
QUICK_NETWORK = {"network_def#channels": [8, 16, 32, 32, 64]}
# Elastic deformation (sigma 3 to 5, magnitude 100 to 200) crushes the small organs of 48^3 grids and halves
# what a minute of training learns, so the quickstart leaves it out. The training metric (an argmax and a one-hot
# per step, a tenth of a step at these sizes) is left out too: the validation at the end reports the stage. The
# network trains channels-last in bf16 where the CPU runs bf16 natively (``train.cpu_training_network``).
QUICK_TRAINING = {
    "device": "cpu",
    "num_workers": 0,
    "batch_size": 2,
    "learning_rate": 0.01,
    "elastic_prob": 0.0,
    "train#trainer#postprocessing": None,
    "train#trainer#key_train_metric": None,
    "network": "$flare_c2f_extensions.training.train.cpu_training_network(@network_def.to(@device))",
}
LOG_DIR = "logs"  # <out>/logs/quickstart.log: cohort, cascade, evaluation (each training logs in its bundle's logs/)


@contextlib.contextmanager
def logs_to_file(path: Path):
    """Send everything printed or logged to the terminal (stdout, stderr, logging's stream handlers, including
    those MONAI creates meanwhile) to ``path`` instead, and give the terminal back afterwards."""
    terminal = (sys.stdout, sys.stderr)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", buffering=1) as log, contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
        swapped = _swap_streams(terminal, log)
        try:
            yield log
        finally:
            _swap_streams((log,), terminal[0])
            for handler, stream in swapped:
                handler.setStream(stream)


def _swap_streams(old_streams, new_stream) -> list:
    """Point every logging stream handler that writes to one of ``old_streams`` at ``new_stream``."""
    loggers = [logging.getLogger()] + [
        item for item in logging.root.manager.loggerDict.values() if isinstance(item, logging.Logger)
    ]
    swapped = []
    for handler in {h for item in loggers for h in item.handlers}:
        if isinstance(handler, logging.StreamHandler) and any(handler.stream is s for s in old_streams):
            swapped.append((handler, handler.setStream(new_stream)))
    return swapped


class Progress:
    """One line per stage on the terminal: ``[ 3/14] train solid ... 41 s``."""

    def __init__(self, total: int, stream=None):
        self.total, self.done, self.stream = total, 0, stream or sys.stdout

    @contextlib.contextmanager
    def stage(self, name: str):
        started, result = time.perf_counter(), {}
        yield result
        self.line(name, result.get("detail"), time.perf_counter() - started)

    def line(self, name: str, detail: str | None, seconds: float):
        self.done += 1
        detail = f" ({detail})" if detail else ""
        print(f"[{self.done:>2}/{self.total}] {name}{detail}: {seconds:.0f} s", file=self.stream, flush=True)


def bundle_workflow(bundle: str, configs, workflow_type, bundle_root, bundles_dir=BUNDLES_DIR, **overrides):
    """A ``ConfigWorkflow`` of ``bundles_dir/<bundle>`` with ``configs`` (one name or a list, later ones overlay)."""
    from monai.bundle import ConfigWorkflow

    config_dir = Path(bundles_dir) / bundle / "configs"
    names = [configs] if isinstance(configs, str) else list(configs)
    return ConfigWorkflow(
        config_file=[str(config_dir / name) for name in names],
        meta_file=str(config_dir / "metadata.json"),
        logging_file=str(config_dir / "logging.conf"),
        workflow_type=workflow_type,
        bundle_root=str(bundle_root),
        **overrides,
    )


def run_bundle(bundle: str, configs, workflow_type, bundle_root, bundles_dir=BUNDLES_DIR, **overrides):
    """Initialise, check, run and finalise a bundle's ``ConfigWorkflow`` (configs overlay left to right)."""
    workflow = bundle_workflow(bundle, configs, workflow_type, bundle_root, bundles_dir, **overrides)
    workflow.initialize()
    missing = workflow.check_properties()
    if missing:
        raise RuntimeError(f"{bundle}: config lacks required properties {missing}")
    workflow.run()
    workflow.finalize()
    return workflow


def quick_overrides(network: dict, stages=QUICK_STAGES, epochs=None) -> dict:
    """``flare-c2f train``'s overrides for the quick preset, by scope: :data:`QUICK_TRAINING` and ``network`` for
    every stage, each stage's grid and epochs (``epochs`` replaces them all), one validation at the end."""
    overrides = {"all": {**QUICK_TRAINING, **network}}
    for name, (_, settings) in stages.items():
        settings = dict(settings, **({"max_epochs": epochs} if epochs else {}))
        overrides[name] = {"val_interval": settings["max_epochs"], **settings}
    return overrides


def train_stages(data: Path, out: Path, network: dict, stages=QUICK_STAGES, epochs=None, progress=None,
                 workers: int | None = None) -> dict:
    """Train ``stages`` briefly with ``flare-c2f train``'s own code (:func:`~.training.train.train_cascade`, the
    quick preset of :func:`quick_overrides`) into ``out``, ``workers`` stages side by side (default one per core);
    ``progress`` (a :class:`Progress`) gets a line per finished stage. Returns the cascade's stage overrides that
    point at the trained bundles (``bundle_root``, grid, network)."""
    from flare_c2f_extensions.runs.ranks import available_cores
    from flare_c2f_extensions.training.train import train_cascade

    n_cases = len(list((data / "imagesTr").glob("*.nii.gz")))
    overrides = quick_overrides(network, stages, epochs)

    def report(record):
        if progress is not None:
            name = record["stage"].replace("_", " ", 1)
            scope = "refiner" if record["stage"].startswith("refiner_") else record["stage"]
            grid = "x".join(str(s) for s in overrides[scope]["spatial_size"])
            detail = f"{record['epochs']} epochs at {grid}, validation mean Dice {record['best_metric']:.3f}"
            progress.line(f"train {name}", detail, record["seconds"])

    train_cascade(data, out, stages=list(stages), overrides=overrides, num_val=max(1, n_cases // 5), evaluate=False,
                  progress=False, workers=workers or available_cores(), on_stage_done=report)
    return {
        name: {"bundle_root": str(out / bundle), "spatial_size": settings["spatial_size"], **network}
        for name, (bundle, settings) in stages.items()
    }


def training_runs(stages=QUICK_STAGES) -> int:
    """How many trainings ``stages`` are: one per stage, four for the refiner (one per small organ)."""
    return sum(len(GROUPS["small"]) if name == "refiner" else 1 for name in stages)


def quickstart(
    out: str = "./quickstart",
    n_train: int = 10,
    n_test: int = 2,
    epochs: int | None = None,
    seed: int = 0,
    shape=(96, 96, 64),
    network: dict | None = None,
    stages: dict | None = None,
    workers: int | None = None,
) -> dict:
    """Generate a cohort, train every stage briefly, segment the held-out cases with the cascade, evaluate them,
    and draw an overlay per case. Prints a line per stage; the bundles' logs go to ``<out>/logs/``.
    ``workers``: training processes side by side (default: one per core).
    Returns the evaluation summary (with the wall time)."""
    from flare_c2f_extensions.evaluation.metrics import format_summary
    from flare_c2f_extensions.synthetic.phantom import write_cohort

    out = Path(out)
    started = time.perf_counter()
    stages = stages or QUICK_STAGES
    progress = Progress(total=training_runs(stages) + 4)
    print(f"quickstart in {out}; logs in {out / LOG_DIR}", flush=True)
    with logs_to_file(out / LOG_DIR / "quickstart.log"):
        data = out / "data"
        with progress.stage("generate cohort") as result:
            if not (data / "imagesTs").is_dir():
                write_cohort(data, n=n_train, n_test=n_test, seed=seed, shape=tuple(shape))
            result["detail"] = f"{n_train} training and {n_test} held-out cases at {'x'.join(map(str, shape))}"
        network = QUICK_NETWORK if network is None else network
        train_stages(data, out / "bundles", network, stages, epochs=epochs, progress=progress, workers=workers)
        summary = _segment_and_evaluate(data, out, progress)
    summary["seconds"] = round(time.perf_counter() - started, 1)
    print(format_summary(summary))
    print(f"quickstart finished in {summary['seconds']} s; predictions, evaluation and overlays in {out}")
    print(f"segment a new CT with these bundles: flare-c2f segment -i CT.nii.gz -o seg.nii.gz --bundles_dir "
          f"{out / 'bundles'}")
    (out / "quickstart.json").write_text(json.dumps(summary, indent=4) + "\n")
    return summary


def _segment_and_evaluate(data: Path, out: Path, progress: Progress) -> dict:
    """The held-out cases through ``flare-c2f segment``'s own code with the trained bundles, their FLARE22 scores
    and an overlay per case."""
    from flare_c2f_extensions.evaluation.metrics import evaluate_folder
    from flare_c2f_extensions.io.overlay import save_overlay
    from flare_c2f_extensions.runs.segment import run_segment

    predictions = out / "predictions"
    with progress.stage("segment held-out cases with the cascade"):
        # torch: converting nine tiny networks for OpenVINO would take longer than segmenting two cases with them
        run_segment(str(data / "imagesTs"), str(predictions), bundles_dir=str(out / "bundles"), engine="torch",
                    device="cpu", overwrite=True, progress=False)
    with progress.stage("evaluate (FLARE22 DSC and NSD)") as result:
        summary = evaluate_folder(str(predictions), str(data / "labelsTs"), str(out / "evaluation"))
        result["detail"] = f"mean DSC {summary['mean_DSC']:.3f}, NSD {summary['mean_NSD']:.3f}"
    with progress.stage("draw overlays") as result:
        for image in sorted((data / "imagesTs").glob("*.nii.gz")):
            case = image.name.replace("_0000.nii.gz", "")
            labels = data / "labelsTs" / f"{case}.nii.gz"
            save_overlay(image, predictions / f"{case}.nii.gz", out / "overlays" / f"{case}.png", labels)
        result["detail"] = str(out / "overlays")
    return summary
