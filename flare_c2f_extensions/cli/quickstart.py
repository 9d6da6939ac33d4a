"""The quickstart: from nothing to evaluated cascade segmentations of a generated cohort, on the CPU.

It drives every bundle as a user would (their own train configs, small networks and grids by override),
then runs the cascade bundle's machinery on held-out cases, scores them with the FLARE22 metrics and writes a
PNG overlay per case. It prints one line per stage; the bundles' own logs (per-iteration losses) go to
``<out>/logs/``. It is also the smallest end-to-end check of the product.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import logging
import multiprocessing
import os
import sys
import time
from pathlib import Path

import numpy as np

from flare_c2f_extensions.labels import GROUPS, ORGANS
from flare_c2f_extensions.paths import BUNDLES_DIR, STAGE_BUNDLES

__all__ = [
    "QUICK_STAGES", "QUICK_NETWORK", "QUICK_TRAINING", "LOG_DIR",
    "quickstart", "train_stages", "run_bundle", "logs_to_file",
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
# network trains channels-last in bf16 where the CPU runs bf16 natively (``cpu_training_network``).
QUICK_TRAINING = {
    "device": "cpu",
    "num_workers": 0,
    "batch_size": 2,
    "learning_rate": 0.01,
    "elastic_prob": 0.0,
    "train#trainer#postprocessing": None,
    "train#trainer#key_train_metric": None,
    "network": "$flare_c2f_extensions.cli.quickstart.cpu_training_network(@network_def.to(@device))",
}
LOG_DIR = "logs"  # <out>/logs: quickstart.log (cohort, cascade, evaluation) and one <run>.log per training run


def cpu_training_network(network, device=None):
    """``network`` set up to train fast on a CPU: weights and inputs channels-last (a third less time in the
    backward pass of 3D convolutions on one core), and its forward under bf16 autocast (fp32 output) where
    :func:`default_amp` says the CPU runs bf16 natively. Unchanged on other devices. The state dict keeps its
    names and values (only the memory layout and ``forward`` change)."""
    import torch

    from flare_c2f_extensions.cascade.stages import default_amp

    device = device or next(network.parameters()).device
    if device.type != "cpu":
        return network
    network = network.to(memory_format=torch.channels_last_3d)
    forward, bf16 = network.forward, default_amp(device)

    def forward_channels_last(x, *args, **kwargs):
        x = x.contiguous(memory_format=torch.channels_last_3d)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            return forward(x, *args, **kwargs).float()

    network.forward = forward_channels_last
    return network


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


def stage_runs(stages=QUICK_STAGES) -> list:
    """(stage name, bundle, settings, refiner organ or None) for every training run, in cascade order."""
    runs = []
    for name, (bundle, settings) in stages.items():
        organs = [ORGANS[o] for o in GROUPS["small"]] if name == "refiner" else [None]
        runs.extend((name, bundle, settings, organ) for organ in organs)
    return runs


def train_settings(settings: dict, epochs=None) -> dict:
    """A stage's overrides with ``epochs`` (if given) as ``max_epochs`` and one validation (which saves the
    checkpoint) at the end."""
    settings = dict(settings, **({"max_epochs": epochs} if epochs else {}))
    return {"val_interval": settings["max_epochs"], **settings}


def _cost(run) -> float:
    """Relative cost of a training run (epochs x grid voxels), to start the longest ones first."""
    settings = run[2]
    return settings["max_epochs"] * float(np.prod(settings["spatial_size"]))


def _cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def train_stages(
    data: Path, out: Path, network: dict, stages=QUICK_STAGES, bundles_dir=BUNDLES_DIR, epochs=None, progress=None,
    workers: int | None = None,
    log_dir: Path | None = None,
) -> dict:
    """Train every stage briefly through its bundle's train.json; returns the cascade's stage overrides.

    The stages learn independently (each from the ground truth), so ``workers`` processes (default: one per core)
    train them side by side, longest first, each with its share of the cores: at these small sizes one process
    keeps a core far busier than two threads do. Each run logs to ``<log_dir>/<run>.log`` (default ``out/logs``).
    ``epochs`` (if given) replaces every stage's ``max_epochs``; ``progress`` (a :class:`Progress`) gets a line per
    finished run.
    """
    n_cases = len(list((data / "imagesTr").glob("*.nii.gz")))
    common = {"dataset_dir": str(data), "num_val": max(1, n_cases // 5), **QUICK_TRAINING, **network}
    runs = sorted(stage_runs(stages), key=_cost, reverse=True)
    workers = max(1, min(workers or _cores(), len(runs)))
    threads = max(1, _cores() // workers)
    log_dir = Path(log_dir or out / "logs")
    jobs = []
    for name, bundle, settings, organ in runs:
        settings = train_settings(settings, epochs)
        overrides = {**common, **settings, **({"organ": organ} if organ else {})}
        label = f"{name}_{organ}" if organ else name
        jobs.append((label, bundle, str(out / bundle), str(bundles_dir), overrides, threads, str(log_dir)))
    context = multiprocessing.get_context("spawn")  # a clean torch per worker, whatever the parent holds
    with concurrent.futures.ProcessPoolExecutor(workers, mp_context=context) as pool:
        with _children_write_to(log_dir / "workers.log"):
            futures = {pool.submit(_train_run, *job): job[0] for job in jobs}
        for future in concurrent.futures.as_completed(futures):
            detail, seconds = future.result()
            if progress:
                progress.line(f"train {futures[future].replace('_', ' ', 1)}", detail, seconds)
    return {
        name: {"bundle_root": str(out / bundle), "spatial_size": settings["spatial_size"], **network}
        for name, (bundle, settings) in stages.items()
    }


@contextlib.contextmanager
def _children_write_to(path: Path):
    """Processes started meanwhile get ``path`` as their stdout and stderr (what they print while importing, before
    they redirect their own output); this process's own are given back afterwards."""
    path.parent.mkdir(parents=True, exist_ok=True)
    saved = [os.dup(1), os.dup(2)]
    try:
        with open(path, "ab") as log:
            os.dup2(log.fileno(), 1)
            os.dup2(log.fileno(), 2)
        yield
    finally:
        for fd, copy in enumerate(saved, start=1):
            os.dup2(copy, fd)
            os.close(copy)


def _train_run(label, bundle, root, bundles_dir, overrides, threads, log_dir) -> tuple[str, float]:
    """One training run in a worker process, its logs in ``<log_dir>/<label>.log``; (detail line, seconds)."""
    import torch

    torch.set_num_threads(threads)
    started = time.perf_counter()
    with logs_to_file(Path(log_dir) / f"{label}.log"):
        workflow = run_bundle(bundle, "train.json", "train", Path(root), Path(bundles_dir), **overrides)
        return _training_detail(workflow, overrides), time.perf_counter() - started


def _training_detail(workflow, settings) -> str:
    grid = "x".join(str(s) for s in settings["spatial_size"])
    dice = workflow.parser.get_parsed_content("validate#evaluator").state.best_metric
    return f"{settings['max_epochs']} epochs at {grid}, validation mean Dice {dice:.3f}"


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
    progress = Progress(total=len(stage_runs(stages)) + 4)
    print(f"quickstart in {out}; logs in {out / LOG_DIR}", flush=True)
    with logs_to_file(out / LOG_DIR / "quickstart.log"):
        data = out / "data"
        with progress.stage("generate cohort") as result:
            if not (data / "imagesTs").is_dir():
                write_cohort(data, n=n_train, n_test=n_test, seed=seed, shape=tuple(shape))
            result["detail"] = f"{n_train} training and {n_test} held-out cases at {'x'.join(map(str, shape))}"
        network = QUICK_NETWORK if network is None else network
        stage_overrides = train_stages(
            data, out / "bundles", network, stages, epochs=epochs, progress=progress, workers=workers,
            log_dir=out / LOG_DIR,
        )
        complete_bundles(out / "bundles", stage_overrides)
        summary = _segment_and_evaluate(data, out, progress)
    summary["seconds"] = round(time.perf_counter() - started, 1)
    print(format_summary(summary))
    print(f"quickstart finished in {summary['seconds']} s; predictions, evaluation and overlays in {out}")
    print(f"segment a new CT with these bundles: flare-c2f segment -i CT.nii.gz -o seg.nii.gz --bundles_dir "
          f"{out / 'bundles'}")
    (out / "quickstart.json").write_text(json.dumps(summary, indent=4) + "\n")
    return summary


def complete_bundles(bundles: Path, stage_overrides: dict, source_dir: Path = BUNDLES_DIR) -> None:
    """Make the trained folder what ``flare-c2f train`` leaves: every stage a whole bundle whose
    ``configs/inference.json`` holds the grid and network it was trained with, the refiner's default
    ``models/model.pt``, and the cascade bundle assembled from them (``flare-c2f segment --bundles_dir``, MONAI Label
    and MONAI Deploy then take the folder as it is)."""
    from flare_c2f_extensions.cascade.assemble import assemble_cascade
    from flare_c2f_extensions.paths import CASCADE_BUNDLE
    from flare_c2f_extensions.training.train import copy_bundle, default_refiner_checkpoint, persist_inference_overrides

    for name, bundle in STAGE_BUNDLES.items():
        root = copy_bundle(bundle, bundles, source_dir)
        inference = {k: v for k, v in stage_overrides[name].items() if k != "bundle_root"}
        persist_inference_overrides(root, inference)
    default_refiner_checkpoint(bundles / STAGE_BUNDLES["refiner"])
    copy_bundle(CASCADE_BUNDLE, bundles, source_dir)
    assemble_cascade(bundles)


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
