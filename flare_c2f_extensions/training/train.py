"""Train the whole cascade in one command: every stage through its own bundle's ``configs/train.json``.

``train_cascade(dataset_dir, out)`` (``flare-c2f train --dataset_dir D --out DIR``):

1. decodes every labelled case once into ``DIR/cache/data`` (FLARE layout, reoriented to RAS, HU clipped to the
   stages' [-100, 300] window, uncompressed NIfTI: int16 for integer HU, which loses nothing, uint8 labels checked
   to be FLARE ids); every stage then reads those files instead of re-inflating the gzipped originals. A cached
   case is keyed by its sources' sha256 (``DIR/cache/data/sources/<case>.json``), never by file times;
2. copies each stage bundle's configs, docs and LICENSE to ``DIR/<bundle>/`` and trains the stage there
   (``bundle_root=DIR/<bundle>``) with the bundle's defaults (the paper's recipe) plus the overrides given;
   ``models/`` receives the weights, ``logs/train_<stage>.log`` the detailed log;
3. resumes: a finished stage has ``logs/train_<stage>.done.json`` (written atomically) and is skipped; an
   unfinished one continues from its last training state (``resume=True``, see ``checkpoints.TrainState``);
4. ends by running the whole cascade (``Cascade.from_bundles(DIR)``) on the held-out validation cases and scoring
   it with the FLARE22 metrics (``DIR/evaluation/metrics.csv``, ``summary.json``).

Under ``torchrun`` every stage runs with its ``multi_gpu_train.json`` overlay; one process group serves all stages.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

from flare_c2f_extensions.errors import InputError, input_error_in
from flare_c2f_extensions.io.discovery import case_name, labelled_cases, split_cases
from flare_c2f_extensions.io.files import atomic_path, remembered_sha256, write_nifti_atomic, write_text_atomic
from flare_c2f_extensions.io.images import HU_RANGE, read_ct
from flare_c2f_extensions.labels import GROUPS, ORGANS
from flare_c2f_extensions.options import parse_overrides
from flare_c2f_extensions.paths import BUNDLES_DIR, STAGE_BUNDLES
from flare_c2f_extensions.training.progress import _EpochProgress, _FileLog

__all__ = [
    "STAGES", "train_cascade", "parse_overrides", "select_stages", "prepare_cache", "flare_labels", "StagePlan",
]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class StagePlan:
    """One training: ``name`` (``coarse`` ... ``refiner_gallbladder``), its bundle and, for a refiner, the organ."""

    name: str
    bundle: str
    organ: str | None = None

    @property
    def state_dir(self) -> str:
        return "train_state" + (f"/{self.organ}" if self.organ else "")


STAGES = tuple(
    [StagePlan(name, STAGE_BUNDLES[name]) for name in ("coarse", "solid", "digestive", "vessels", "locator")]
    + [StagePlan(f"refiner_{ORGANS[o]}", STAGE_BUNDLES["refiner"], ORGANS[o]) for o in GROUPS["small"]]
)
# stage-name prefixes an override may carry: a stage, "refiner" (the four refiners) or "all"
# training-side keys that never go into the trained bundle's inference.json
NOT_PERSISTED = {"device", "dataset_dir", "num_workers", "bundle_root", "organ", "amp", "network"}
DEFAULT_NUM_VAL = 10


def select_stages(stages: str | Sequence[str] | None) -> list[StagePlan]:
    """``None``/``"all"``: every stage; else names (comma-separated or a list); ``refiner`` means all four."""
    if stages is None or stages == "all":
        return list(STAGES)
    names = [s.strip() for s in (stages.split(",") if isinstance(stages, str) else stages) if str(s).strip()]
    chosen = set()
    for name in names:
        matched = {s.name for s in STAGES if s.name == name or (name == "refiner" and s.organ)}
        if not matched:
            known = ", ".join(["refiner"] + [s.name for s in STAGES])
            raise InputError(f"--stages: unknown stage {name!r} (known: {known})")
        chosen |= matched
    return [s for s in STAGES if s.name in chosen]


def stage_overrides(stage: StagePlan, overrides: Mapping[str, Mapping]) -> dict:
    """The user's overrides that apply to ``stage``: ``all``, then ``refiner`` (refiners), then its own."""
    scopes = ["all"] + (["refiner"] if stage.organ else []) + [stage.name]
    merged: dict = {}
    for scope in scopes:
        merged.update(overrides.get(scope, {}))
    return merged


# -- the decoded-once cache ------------------------------------------------------------------------------------


# the cache's layout and decoding: a record of another format is not trusted, its case is decoded again
CACHE_FORMAT = 2
HIGHEST_ID = max(ORGANS)  # FLARE ids are 0 (background) .. 13, without gaps
WHOLE_NUMBER_TOLERANCE = 1e-3  # a float label this close to a whole number is that number (rounded, not truncated)


def _cached_pair(cache: Path, case: str) -> tuple[Path, Path]:
    return cache / "imagesTr" / f"{case}_0000.nii", cache / "labelsTr" / f"{case}.nii"


def _record_path(cache: Path, case: str) -> Path:
    """The sources' sha256 the cached pair was decoded from (the pair counts only while they are the same)."""
    return cache / "sources" / f"{case}.json"


def _read_record(path: Path) -> dict:
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}


def _sources_record(image: Path, label: Path, recorded: dict) -> dict:
    return {
        "format": CACHE_FORMAT,
        "image": remembered_sha256(image, recorded.get("image")),
        "label": remembered_sha256(label, recorded.get("label")),
    }


def _same_sources(current: dict, recorded: dict) -> bool:
    return recorded.get("format") == current["format"] and all(
        isinstance(recorded.get(key), dict) and recorded[key].get("sha256") == current[key]["sha256"]
        for key in ("image", "label")
    )


def flare_labels(voxels: np.ndarray, path: str | os.PathLike) -> np.ndarray:
    """``voxels`` as uint8 FLARE ids: whole numbers in 0..13 (floats within ``WHOLE_NUMBER_TOLERANCE`` of one are
    rounded); anything else is an :class:`InputError` naming ``path`` and the problem."""
    if voxels.dtype.kind == "f":
        if not np.isfinite(voxels).all():
            raise InputError(f"{path}: holds NaN or infinite values, not FLARE ids 0-{HIGHEST_ID}")
        whole = np.rint(voxels)
        off = np.abs(voxels - whole) >= WHOLE_NUMBER_TOLERANCE
        if off.any():
            raise InputError(
                f"{path}: holds values that are not whole numbers (e.g. {voxels[off][0]:g}), not FLARE ids "
                f"0-{HIGHEST_ID}"
            )
        voxels = whole
    low, high = voxels.min(), voxels.max()
    if low < 0 or high > HIGHEST_ID:
        ct = low <= -100 or high > 255  # beyond any label map's values: HU
        raise InputError(
            f"{path}: holds values outside the FLARE ids 0-{HIGHEST_ID} ({low:g} .. {high:g})"
            + (": is it a CT?" if ct else "")
        )
    return voxels.astype(np.uint8)


def _decoded_ct(image: Path) -> tuple[np.ndarray, np.ndarray]:
    """The CT in RAS, HU clipped to the window, as int16 when its HU are integers (every scanner's); its affine."""
    scaled, _ = read_ct(image)  # RAS, clipped to the window, scaled to [0, 1]
    low, high = HU_RANGE
    hu = scaled[0].numpy() * (high - low) + low
    rounded = np.round(hu)
    voxels = rounded.astype(np.int16) if np.abs(hu - rounded).max() < 1e-2 else hu.astype(np.float32)
    return voxels, scaled.affine.numpy()


def _ras_labels(label: Path) -> tuple[np.ndarray, np.ndarray]:
    """The label map in RAS as checked FLARE ids, and its affine."""
    labels = nib.load(str(label))
    ornt = nib.orientations.io_orientation(labels.affine)
    ras = nib.orientations.apply_orientation(flare_labels(np.asarray(labels.dataobj), label), ornt)
    return ras, labels.affine @ nib.orientations.inv_ornt_aff(ornt, labels.shape)


def cache_case(image: str | os.PathLike, label: str | os.PathLike, cache: Path) -> bool:
    """Decode one labelled case into ``cache`` (RAS, HU clipped to the window, uncompressed, labels checked as FLARE
    ids); ``False`` if the cached pair is already there, decoded from sources of the same content (sha256)."""
    image, label = Path(image), Path(label)
    case = case_name(image)
    image_out, label_out = _cached_pair(cache, case)
    record_path = _record_path(cache, case)
    recorded = _read_record(record_path)
    sources = _sources_record(image, label, recorded)
    if image_out.is_file() and label_out.is_file() and _same_sources(sources, recorded):
        if sources != recorded:  # the same content with new stamps: remembered, so that it is not read again
            write_text_atomic(json.dumps(sources), record_path)
        return False
    labels, label_affine = _ras_labels(label)  # checked before anything is written
    voxels, affine = _decoded_ct(image)
    if labels.shape != voxels.shape or not np.allclose(label_affine, affine, atol=1e-3):
        raise InputError(f"{label}: label map geometry (shape, affine) differs from its image {image}")
    record_path.unlink(missing_ok=True)  # while the pair is replaced, no record vouches for it
    write_nifti_atomic(nib.Nifti1Image(voxels, affine), image_out)
    write_nifti_atomic(nib.Nifti1Image(labels, affine), label_out)
    write_text_atomic(json.dumps(sources), record_path)
    return True


def _forget_other_cases(cache: Path, cases: Sequence[str]) -> int:
    """Remove the cached files of cases no longer in the dataset (every stage would still train on them); hidden
    files are other processes' writes in progress and stay. Returns how many files went."""
    keep = {path for case in cases for path in (*_cached_pair(cache, case), _record_path(cache, case))}
    removed = 0
    for folder in ("imagesTr", "labelsTr", "sources"):
        for path in (cache / folder).glob("[!.]*"):
            if path.is_file() and path not in keep:
                path.unlink(missing_ok=True)
                removed += 1
    return removed


def prepare_cache(dataset_dir: str | os.PathLike, cache: str | os.PathLike, progress: bool = True) -> Path:
    """Decode every labelled case of ``dataset_dir`` once into ``cache`` (``imagesTr``/``labelsTr``, FLARE names,
    ``.nii``); cases cached from sources of the same content are skipped, cases gone from ``dataset_dir`` removed.
    Returns ``cache``, a dataset folder every stage can train from."""
    from tqdm.auto import tqdm

    cache = Path(cache)
    cases = labelled_cases(dataset_dir)
    removed = _forget_other_cases(cache, [case_name(case["image"]) for case in cases])
    decoded = 0
    for case in tqdm(cases, desc="cache", unit="case", disable=not progress):
        decoded += cache_case(case["image"], case["label"], cache)
    logger.info("cache %s: %d case(s) decoded, %d already there, %d file(s) of other cases removed", cache, decoded,
                len(cases) - decoded, removed)
    return cache


# -- bundles in the output folder ------------------------------------------------------------------------------


def copy_bundle(bundle: str, out: Path, source_dir: Path = BUNDLES_DIR) -> Path:
    """``out/<bundle>/`` with the bundle's configs, docs and LICENSE (existing files are kept: a rerun continues
    with the configs it started with)."""
    source, target = Path(source_dir) / bundle, Path(out) / bundle
    for item in ("configs", "docs", "LICENSE"):
        if (source / item).is_dir() and not (target / item).exists():
            shutil.copytree(source / item, target / item)
        elif (source / item).is_file() and not (target / item).exists():
            target.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source / item, target / item)
    (target / "models").mkdir(parents=True, exist_ok=True)
    return target


def _set_id(config: dict, config_id: str, value) -> bool:
    """``config["a"]["b"] = value`` for ``"a#b"`` if ``"a"`` exists in ``config``; ``False`` if it does not."""
    *parents, last = config_id.split("#")
    node = config
    for key in parents:
        if not isinstance(node, dict) or key not in node:
            return False
        node = node[key]
    if not isinstance(node, dict) or (not parents and last not in node):
        return False
    node[last] = value
    return True


def persist_inference_overrides(bundle_root: Path, overrides: Mapping) -> dict:
    """Write the overrides that concern inference (grid, network, margins...) into ``configs/inference.json`` of the
    trained bundle, so that it loads its weights as trained, and the same keys into ``configs/train.json``, so that
    training it again (``monai.bundle run``, MONAI Label starting from ``models/model.pt``) builds that network.
    Returns what was written into ``inference.json``."""
    path = bundle_root / "configs" / "inference.json"
    config = json.loads(path.read_text())
    written = {k: v for k, v in overrides.items() if k.split("#")[0] not in NOT_PERSISTED and _set_id(config, k, v)}
    if written:
        write_text_atomic(json.dumps(config, indent=4) + "\n", path)
        train_path = bundle_root / "configs" / "train.json"
        if train_path.is_file():
            train_config = json.loads(train_path.read_text())
            if [_set_id(train_config, k, v) for k, v in written.items()].count(True):
                write_text_atomic(json.dumps(train_config, indent=4) + "\n", train_path)
    return written


# -- one stage -------------------------------------------------------------------------------------------------


def _rank() -> int:
    return int(os.environ.get("RANK", "0"))


def _distributed() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def _barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _init_process_group() -> None:
    """One process group for all stages (the overlays' ``initialize`` finds it; their ``finalize`` is skipped)."""
    import torch
    import torch.distributed as dist

    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")


def _stage_workflow(stage: StagePlan, root: Path, settings: Mapping, distributed: bool):
    from monai.bundle import ConfigWorkflow

    configs = ["train.json"] + (["multi_gpu_train.json"] if distributed else [])
    config_dir = root / "configs"
    workflow = ConfigWorkflow(
        config_file=[str(config_dir / name) for name in configs],
        meta_file=str(config_dir / "metadata.json"),
        logging_file=False,
        workflow_type="train",
        bundle_root=str(root),
        **settings,
    )
    parser = workflow.parser
    max_epochs, val_interval = (int(parser.get_parsed_content(k)) for k in ("max_epochs", "val_interval"))
    if val_interval > max_epochs:  # at least one validation, so that models/ gets the best model
        parser["val_interval"] = max_epochs
    if distributed:
        parser["finalize"] = []  # the process group lives on for the next stage
    return workflow


def train_stage(stage: StagePlan, root: Path, settings: Mapping, distributed: bool = False) -> dict:
    """Train one stage in ``root`` (its copied bundle); returns its done record (also written, atomically, to
    ``root/logs/train_<stage>.done.json`` by rank 0)."""
    echo = _rank() == 0
    started = time.perf_counter()
    with _FileLog(root / "logs" / f"train_{stage.name}.log", enabled=echo) as log:
        workflow = _stage_workflow(stage, root, settings, distributed)
        workflow.initialize()
        missing = workflow.check_properties()
        if missing:
            raise RuntimeError(f"{stage.bundle}: config lacks required properties {missing}")
        parser = workflow.parser
        trainer = parser.get_parsed_content("train#trainer")
        progress = _EpochProgress(stage.name, parser.get_parsed_content("validate#evaluator"), echo)
        progress.attach(trainer)
        log.capture()
        try:
            workflow.run()
        except Exception as error:  # MONAI wraps an input error (e.g. a training state that does not fit)
            cause = input_error_in(error)
            if cause is None:
                raise
            raise cause from None
        workflow.finalize()
        checkpoint = Path(parser.get_parsed_content("ckpt_path"))
        state_dir = Path(parser.get_parsed_content("state_dir"))
    if trainer.state.epoch != trainer.state.max_epochs:
        state = trainer.state
        raise RuntimeError(f"{stage.name}: training stopped at epoch {state.epoch} of {state.max_epochs}")
    record = {
        "stage": stage.name,
        "bundle": stage.bundle,
        "checkpoint": str(checkpoint),
        "epochs": trainer.state.max_epochs,
        "resumed_after_epoch": progress.resumed_from,
        "best_metric": getattr(progress.evaluator.state, "best_metric", None),
        "seconds": round(time.perf_counter() - started, 1),
        "history": progress.history,
    }
    if echo:
        if not checkpoint.is_file():
            raise RuntimeError(f"{stage.name}: training ended without a model at {checkpoint} (no validation ran?)")
        write_text_atomic(json.dumps(record, indent=4) + "\n", done_marker(root, stage))
        shutil.rmtree(state_dir, ignore_errors=True)  # the stage is done: its resumable state is no longer needed
    return record


def train_side_by_side(jobs, workers: int):
    """Train ``jobs`` (``(stage, bundle root, settings)``) in ``workers`` processes, the costliest first (epochs x
    grid voxels), each with its share of the cores; yields each done record as its stage finishes."""
    import concurrent.futures
    import multiprocessing

    def cost(job) -> float:
        settings = job[2]
        return float(settings.get("max_epochs", 1)) * float(np.prod(settings.get("spatial_size", [1])))

    from flare_c2f_extensions.runs.ranks import available_cores

    workers = max(1, min(workers, len(jobs)))
    threads = max(1, available_cores() // workers)
    context = multiprocessing.get_context("spawn")  # a clean torch per worker, whatever the parent holds
    with concurrent.futures.ProcessPoolExecutor(workers, mp_context=context) as pool:
        futures = [pool.submit(_train_in_worker, stage, root, settings, threads)
                   for stage, root, settings in sorted(jobs, key=cost, reverse=True)]
        for future in concurrent.futures.as_completed(futures):
            yield future.result()


def _train_in_worker(stage: StagePlan, root: Path, settings: Mapping, threads: int) -> dict:
    """One stage in a worker process: its epoch lines and whatever it prints go to its log folder, not the terminal."""
    import contextlib

    import torch

    torch.set_num_threads(threads)
    log = Path(root) / "logs" / f"train_{stage.name}.out"
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "a", buffering=1) as stream, contextlib.redirect_stdout(stream), contextlib.redirect_stderr(stream):
        return train_stage(stage, root, settings)


def done_marker(root: Path, stage: StagePlan) -> Path:
    return Path(root) / "logs" / f"train_{stage.name}.done.json"


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


# -- the whole cascade -----------------------------------------------------------------------------------------


def evaluate_cascade(dataset_dir, out: Path, num_val: int, device=None, progress: bool = True) -> dict:
    """The cascade of the bundles in ``out`` on the held-out validation cases (the last ``num_val`` labelled ones,
    the split every stage validated on), scored with the FLARE22 metrics in ``out/evaluation``."""
    from flare_c2f_extensions.cascade.pipeline import Cascade
    from flare_c2f_extensions.evaluation.metrics import evaluate_folder, format_summary
    from flare_c2f_extensions.runs.cascade_run import CascadeRunner

    _, val = split_cases(labelled_cases(dataset_dir), num_val)
    evaluation = Path(out) / "evaluation"
    cascade = Cascade.from_bundles(out, device=device)
    images = [c["image"] for c in val]
    CascadeRunner(cascade, images, evaluation / "predictions", overwrite=True, progress=progress).run()
    summary = evaluate_folder(str(evaluation / "predictions"), [c["label"] for c in val], str(evaluation))
    print(format_summary(summary), flush=True)
    return summary


def _common_settings(cache_data: Path, num_val: int, epochs, device, distributed: bool) -> dict:
    common = {
        "dataset_dir": str(cache_data),
        "num_val": num_val,
        "resume": True,
        "train#dataset#progress": False,
        "validate#dataset#progress": False,
    }
    if epochs:
        common["max_epochs"] = int(epochs)
    if device and not distributed:  # under torchrun each process takes the GPU of its LOCAL_RANK
        common["device"] = f"$torch.device({str(device)!r})"
    return common


def check_counts(dataset_dir, epochs, num_val) -> tuple[int | None, int]:
    """``--epochs`` (a positive whole number, or ``None``: the configs') and ``--num_val`` (at least one case to
    validate and one to train among the labelled cases), checked before the cache or any stage is touched."""
    def whole(value, name: str) -> int:
        if isinstance(value, bool) or not str(value).strip().isdigit() or int(value) < 1:
            raise InputError(f"--{name}: expected a positive whole number, got {value!r}")
        return int(value)

    epochs = None if epochs is None else whole(epochs, "epochs")
    num_val = whole(num_val, "num_val")
    split_cases(labelled_cases(dataset_dir), num_val)  # the labelled cases and the split, refused now if unusable
    return epochs, num_val


def default_refiner_checkpoint(refiner: Path) -> Path | None:
    """``models/model.pt`` of the refiner bundle: its default organ's checkpoint (the config's ``organ``), the file
    MONAI Label and ``monai.bundle`` look for; ``None`` until that organ is trained."""
    config = refiner / "configs" / "inference.json"
    if not config.is_file():
        return None
    organ = json.loads(config.read_text())["organ"]
    trained = refiner / "models" / f"model_{organ}.pt"
    if not trained.is_file():
        return None
    with atomic_path(refiner / "models" / "model.pt") as tmp:
        shutil.copyfile(trained, tmp)
    return refiner / "models" / "model.pt"


def train_cascade(
    dataset_dir: str | os.PathLike,
    out: str | os.PathLike,
    stages: str | Sequence[str] | None = None,
    epochs: int | None = None,
    device: str | None = None,
    overrides=None,
    num_val: int = DEFAULT_NUM_VAL,
    evaluate: bool = True,
    progress: bool = True,
    bundles_dir: str | os.PathLike = BUNDLES_DIR,
    workers: int = 1,
    on_stage_done=None,
) -> dict:
    """Train the cascade's stages from the FLARE-layout ``dataset_dir`` into ``out/<bundle>/`` and evaluate it.

    ``stages``: ``None`` (all), or names such as ``"coarse,solid"`` (``refiner`` = all four refiners);
    ``epochs``: every stage's ``max_epochs``; ``device``: e.g. ``"cuda:1"`` or ``"cpu"`` (default: the configs');
    ``overrides``: see :func:`parse_overrides`; ``num_val``: the last ``num_val`` labelled cases validate every stage
    and the final cascade evaluation. Finished stages are skipped, an interrupted one resumes. ``workers`` (one
    process, not under ``torchrun``): stages trained side by side in that many processes, each with its share of the
    cores and its epoch lines in its log only (the stages learn independently, and at small sizes one process keeps
    a core busier than two threads do); ``on_stage_done``: called with each stage's done record as it finishes.
    Returns ``{"stages": {name: done record}, "evaluation": FLARE22 summary or None}``.
    """
    out = Path(out)
    plans = select_stages(stages)
    user = parse_overrides(overrides)
    epochs, num_val = check_counts(dataset_dir, epochs, num_val)
    distributed = _distributed()
    if distributed:
        _init_process_group()
    if int(os.environ.get("LOCAL_RANK", "0")) == 0:  # each machine's first process (atomic writes: shareable)
        prepare_cache(dataset_dir, out / "cache" / "data", progress=progress and _rank() == 0)
        copy_bundle("flare22_cascade", out, Path(bundles_dir))  # the whole pipeline, reading its sibling stages
    _barrier()
    common = _common_settings(out / "cache" / "data", num_val, epochs, device, distributed)
    records, jobs = {}, []
    for stage in plans:
        root = out / stage.bundle
        if done_marker(root, stage).is_file():
            records[stage.name] = json.loads(done_marker(root, stage).read_text())
            if _rank() == 0:
                print(f"{stage.name:<28} done before, skipped ({done_marker(root, stage)})", flush=True)
            continue
        if _rank() == 0:
            copy_bundle(stage.bundle, out, Path(bundles_dir))
            persist_inference_overrides(root, stage_overrides(stage, user))
        _barrier()
        settings = {**common, **({"organ": stage.organ} if stage.organ else {}), **stage_overrides(stage, user)}
        jobs.append((stage, root, settings))
    if int(workers) > 1 and not distributed:
        finished = train_side_by_side(jobs, int(workers))
    else:
        finished = (train_stage(stage, root, settings, distributed) for stage, root, settings in jobs)
    for record in finished:
        records[record["stage"]] = record
        _barrier()
        if on_stage_done is not None and _rank() == 0:
            on_stage_done(record)
    summary = None
    pending = [s.name for s in STAGES if not done_marker(out / s.bundle, s).is_file()]
    if _rank() == 0:
        default_refiner_checkpoint(out / STAGE_BUNDLES["refiner"])
    if _rank() == 0 and not pending:  # the cascade bundle's one network and checkpoint, for MONAI's clients
        from flare_c2f_extensions.cascade.assemble import assemble_cascade

        print(f"cascade bundle assembled: {assemble_cascade(out)}", flush=True)
    if _rank() == 0:
        if not evaluate:
            pass
        elif pending:
            print(f"cascade evaluation skipped: stage(s) {', '.join(pending)} not trained yet", flush=True)
        else:
            summary = evaluate_cascade(dataset_dir, out, num_val, device, progress)
    if distributed:
        import torch.distributed as dist

        dist.destroy_process_group()
    return {"stages": records, "evaluation": summary}
