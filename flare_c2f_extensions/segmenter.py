"""From a CT to organs in one call: the cascade (:class:`~flare_c2f_extensions.cascade.Cascade`) behind the
``flare-c2f segment`` command and the Python API :func:`segment`.

Where the stages come from: the bundles folder (:mod:`flare_c2f_extensions.paths`), or ``bundles_dir`` (a folder of
trained stage bundles), or ``stage_dirs`` (one folder per stage). Such a folder is either a whole bundle
(``configs/`` and ``models/``) or just its weights (``models/``), the configs then coming from the shipped bundle.
Missing weights end with one line that says what to do, before anything is loaded.

:func:`segment` takes a path or a ``nibabel`` image and returns a ``nibabel.Nifti1Image`` with the input's geometry
(and per-organ statistics when asked), without writing anything the caller has to manage. The command
(:func:`run_segment`) adds the files: see :mod:`flare_c2f_extensions.outputs`.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

import nibabel as nib
import numpy as np

from .arguments import (
    as_bool,
    as_mapping,
    cascade_overrides,
    parse_device,
    parse_max_voxels,
    parse_organs,
    parse_seed,
    parse_threads,
)
from .errors import InputError
from .label_maps import label_map_image
from .labels import ORGANS
from .paths import STAGE_BUNDLES
from .paths import bundles_dir as default_bundles_dir

__all__ = [
    "Segmenter", "load_cascade", "plan_targets", "resolve_inputs", "run_segment", "segment", "stage_parsers",
    "stage_sources",
]

logger = logging.getLogger(__name__)

RANDOM_WEIGHTS_HINT = "--require_weights false"


# -- options ------------------------------------------------------------------------------------------------------


# -- stages -------------------------------------------------------------------------------------------------------


def stage_sources(
    bundles_dir=None, stage_dirs: Mapping | None = None, stage_overrides: Mapping | None = None
) -> tuple[dict[str, Path], dict[str, dict]]:
    """Config folder and overrides of every stage.

    A stage folder with ``configs/inference.json`` is a whole bundle; one without is a weights folder: the configs
    come from the default bundles folder and ``ckpt_dir`` points at its ``models/``.
    """
    defaults = default_bundles_dir()
    root = Path(bundles_dir) if bundles_dir is not None else defaults
    if bundles_dir is not None and not root.is_dir():
        raise InputError(f"{root}: --bundles_dir folder does not exist")
    folders = {name: root / bundle for name, bundle in STAGE_BUNDLES.items()}
    unknown = sorted(set(stage_dirs or {}) - set(STAGE_BUNDLES))
    if unknown:
        raise InputError(f"--stage_dirs: unknown stage(s) {', '.join(unknown)}; stages: {', '.join(STAGE_BUNDLES)}")
    folders.update({name: Path(path) for name, path in (stage_dirs or {}).items()})
    dirs, overrides = {}, {name: dict(value) for name, value in (stage_overrides or {}).items()}
    for name, folder in folders.items():
        if (folder / "configs" / "inference.json").is_file():
            dirs[name] = folder
        else:
            dirs[name] = defaults / STAGE_BUNDLES[name]
            overrides.setdefault(name, {})["ckpt_dir"] = str(folder / "models")
    return dirs, overrides


def stage_parsers(dirs: Mapping[str, Path], overrides: Mapping[str, dict], organs: Sequence[int]) -> dict:
    """Each stage ``organs`` need, its ``configs/inference.json`` parsed once: ``{(stage, refiner organ or None):
    parser}``, for the weights check and then the loading (:meth:`Cascade.from_bundles`' ``parsers``)."""
    from .configs import read_stage_config
    from .stages import needed_stages

    return {
        (name, extra.get("organ")): read_stage_config(dirs[name], {**overrides.get(name, {}), **extra}, name)
        for name, extra in needed_stages(organs)
    }


def missing_weights(parsers: Mapping) -> list[str]:
    """``"<stage>: <checkpoint path>"`` for every stage of :func:`stage_parsers` whose checkpoint does not exist."""
    missing = []
    for (name, organ), parser in parsers.items():
        checkpoint = Path(parser.get_parsed_content("ckpt_path"))
        if not checkpoint.is_file():
            missing.append(f"{name} ({organ}): {checkpoint}" if organ else f"{name}: {checkpoint}")
    return missing


def weights_error(missing: Sequence[str]) -> InputError:
    more = f" (and {len(missing) - 1} more stage(s))" if len(missing) > 1 else ""
    return InputError(
        f"no trained weights for stage {missing[0]}{more}: train the stages (`flare-c2f train`, or each bundle's "
        f"configs/train.json), download a release (`flare-c2f download_release`) and point --bundles_dir (or "
        f"--stage_dirs) at it, or add {RANDOM_WEIGHTS_HINT} to time the cascade with random weights"
    )


class _QuietRandomInit(logging.Filter):
    """Drop the per-stage 'using random initialisation' warnings: :func:`load_segmenter` says it once."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "random initialisation" not in record.getMessage()


def load_cascade(
    organs: Sequence[int],
    device=None,
    amp=None,
    bundles_dir=None,
    stage_dirs=None,
    stage_overrides=None,
    require_weights: bool = True,
    seed: int = 0,
    engine: str | None = "auto",
    max_voxels="default",
    parsers: Mapping | None = None,
    calibration=None,
):
    """The cascade with the stages ``organs`` need, and the stages that run with random weights (no checkpoint,
    ``require_weights=False``: for timing). ``seed`` seeds their initialisation, so such runs repeat exactly.
    ``engine`` and ``max_voxels`` as in :meth:`Cascade.from_bundles` (``"default"``: its limit); ``parsers``: the
    stages' configs already parsed for these options (:func:`stage_parsers`)."""
    import torch

    from .cascade import MAX_CASE_VOXELS, Cascade

    max_voxels = parse_max_voxels(max_voxels)
    limit = MAX_CASE_VOXELS if max_voxels == "default" else max_voxels
    dirs, overrides = stage_sources(bundles_dir, stage_dirs, stage_overrides)
    parsers = stage_parsers(dirs, overrides, organs) if parsers is None else parsers
    missing = missing_weights(parsers)
    if missing and require_weights:
        raise weights_error(missing)
    if missing:
        logger.warning("no weights for %d stage(s): they run with random weights (timing only)", len(missing))
    device = parse_device(device)
    stages_logger = logging.getLogger("flare_c2f_extensions.stages")  # where load_stage says it
    quiet = _QuietRandomInit()
    stages_logger.addFilter(quiet)
    try:
        torch.manual_seed(int(seed))
        cascade = Cascade.from_bundles(
            device=device, amp=amp, stage_overrides=overrides, stage_dirs=dirs, require_weights=require_weights,
            organs=organs, engine=engine, max_voxels=limit, parsers=parsers, calibration=calibration,
        )
    finally:
        stages_logger.removeFilter(quiet)
    return cascade, missing


# -- the API ------------------------------------------------------------------------------------------------------


class Segmenter:
    """The cascade loaded once, for many images: ``Segmenter(organs="liver,spleen")(image)``.

    Options as :func:`segment`. ``threads`` sets torch's intra-op threads (process-wide).
    """

    def __init__(
        self,
        organs=None,
        device=None,
        amp=None,
        threads: int | None = None,
        bundles_dir=None,
        stage_dirs=None,
        stage_overrides=None,
        require_weights: bool = True,
        seed: int = 0,
        engine: str | None = "auto",
        max_voxels="default",
        override=None,
        stage_parsers=None,
        calibration=None,
    ):
        import torch

        threads = parse_threads(threads)
        if threads is not None:
            torch.set_num_threads(threads)
        self.organs = parse_organs(organs)
        amp = None if amp is None else as_bool(amp, "amp")
        stage_dirs = as_mapping(stage_dirs, "stage_dirs")
        stage_overrides = cascade_overrides(stage_overrides, override)
        self.seed = parse_seed(seed)
        self.cascade, self.random_weight_stages = load_cascade(
            self.organs, device, amp, bundles_dir, stage_dirs, stage_overrides,
            as_bool(require_weights, "require_weights"), self.seed, engine, max_voxels, stage_parsers, calibration,
        )

    def labels_options(self) -> dict:
        """What decides this segmenter's label maps (:meth:`Cascade.labels_options`, with the organs asked for and
        the seed of random weights), recorded in every label map ``flare-c2f segment`` writes."""
        options = self.cascade.labels_options()
        options["organs"] = [ORGANS[o] for o in self.organs]
        seeded = f"random (seed {self.seed})"
        options["weights"] = {name: seeded if sha == "random" else sha for name, sha in options["weights"].items()}
        return options

    def labels(self, path: str | os.PathLike, keep_confidence: bool = False):
        """The label map of the CT at ``path`` (file layout, FLARE ids of the chosen organs only) and the cascade's
        :class:`~flare_c2f_extensions.cascade.CaseResult` (seconds by stage, skipped stages; the confidence map with
        ``keep_confidence``)."""
        result = self.cascade.segment(path, keep_confidence=keep_confidence)
        labels = result.labels
        if len(self.organs) < len(ORGANS):  # a group's other organs are not asked for
            labels = np.where(np.isin(labels, self.organs), labels, 0).astype(np.uint8)
        return labels, result

    def __call__(self, image, statistics: bool = False):
        with _as_path(image) as path:
            try:
                labels, case = self.labels(path, keep_confidence=statistics)
            except InputError as error:
                if path == str(image):
                    raise
                # the temporary file is gone when the caller reads this: name what they passed
                raise InputError(str(error).replace(path, "the nibabel image given")) from None
            result = label_map_image(labels, path)
            if not statistics:
                return result
            from .outputs import organ_statistics, read_hu
            from .pseudo_label import organ_quality

            hu, affine = read_hu(path)
            quality = organ_quality(labels, case, affine, self.organs)
            return result, organ_statistics(labels, hu, affine, self.organs, quality)


class _as_path:
    """``with _as_path(image) as path``: a path as it is; a nibabel image written to a temporary ``.nii`` file
    (uncompressed, removed afterwards), since the cascade reads its input from disk."""

    def __init__(self, image):
        self.image = image
        self.folder = None

    def __enter__(self) -> str:
        if isinstance(self.image, (str, os.PathLike)):
            return str(self.image)
        if not isinstance(self.image, nib.spatialimages.SpatialImage):
            raise InputError(f"segment: expected a path or a nibabel image, got {type(self.image).__name__}")
        self.folder = tempfile.TemporaryDirectory(prefix="flare-c2f-")
        path = Path(self.folder.name) / "image.nii"
        image = self.image
        if not isinstance(image, nib.Nifti1Image):
            image = nib.Nifti1Image(np.asanyarray(image.dataobj), image.affine)
        nib.save(image, str(path))
        return str(path)

    def __exit__(self, *exc):
        if self.folder is not None:
            self.folder.cleanup()
        return False


def segment(image, organs=None, statistics: bool = False, **options):
    """Segment one CT: a path (NIfTI file or DICOM series folder) or a ``nibabel`` image.

    Returns a ``nibabel.Nifti1Image`` (uint8 FLARE ids, exactly the input's shape and affine), or
    ``(image, statistics)`` with ``statistics=True`` (per organ: voxel count, volume in ml, mean and median HU,
    whether it touches the image border). ``organs``: a subset (``"liver,spleen"`` or a list); only the stages
    they need run. Other options: ``device``, ``amp``, ``threads``, ``bundles_dir``, ``stage_dirs``,
    ``stage_overrides``, ``require_weights``, ``seed``, ``engine``, ``max_voxels`` (see :class:`Segmenter`).
    Loading the networks takes a while: for many images build one :class:`Segmenter` and call it.
    """
    return Segmenter(organs=organs, **options)(image, statistics=statistics)


# -- the command -------------------------------------------------------------------------------------------------


def resolve_inputs(source, output=None) -> tuple[list[tuple[str, str]], list[dict]]:
    """The images ``-i`` names, as (image, case name) pairs, and the folder entries that were ignored (with why):
    a NIfTI file, a DICOM series folder, or a folder of NIfTI files / series folders (``output`` never looked into).
    """
    from .discovery import case_name, find_images, is_nifti
    from .images import check_volume

    path = Path(str(source)).expanduser()
    if not path.exists():
        raise InputError(f"{path}: input does not exist")
    if not path.is_file() and not path.is_dir():
        raise InputError(f"{path}: not a file or a folder (a pipe, socket or device); -i takes a NIfTI file or folder")
    if path.is_file():
        if not is_nifti(path):
            raise InputError(f"{path}: not a NIfTI file (.nii, .nii.gz) or a DICOM series folder")
        check_volume(path)
        return [(str(path), case_name(path))], []
    found = find_images(path, subdir="", exclude=[str(output)] if output is not None else None)
    return [(item["image"], item.get("case") or case_name(item["image"])) for item in found], found.ignored


def plan_targets(images: Sequence[tuple[str, str]], output) -> list[tuple[str, Path]]:
    """(image, label map path) pairs: ``-o`` is the file for one input (``.nii.gz``/``.nii``), else a folder that
    gets ``<case>.nii.gz`` per input. Refused before any case: an output that would overwrite its input, and an
    output folder whose label maps would be taken for inputs on the next run (:func:`files.outputs_apart_from_inputs`).
    """
    from .discovery import NIFTI_SUFFIXES
    from .files import outputs_apart_from_inputs

    output = Path(str(output)).expanduser()
    if str(output).lower().endswith(NIFTI_SUFFIXES):
        if len(images) > 1:
            raise InputError(f"{output}: -o must be a folder for {len(images)} inputs, not a NIfTI file name")
        image = images[0][0]
        if os.path.realpath(output) == os.path.realpath(image):
            raise InputError(f"{output}: this output would overwrite the input {image}; choose another file name")
        return [(image, output)]
    outputs_apart_from_inputs(images, output)
    return [(image, output / f"{case}.nii.gz") for image, case in images]


def check_weights(organs: Sequence[int], options: Mapping) -> dict:
    """Fail now, with the one line of :func:`weights_error`, if a needed stage has no weights and they are required.
    Returns the stages' parsed configs (:func:`stage_parsers`), which the segmenter then loads without parsing again."""
    dirs, overrides = stage_sources(
        options.get("bundles_dir"), as_mapping(options.get("stage_dirs"), "stage_dirs"),
        cascade_overrides(options.get("stage_overrides"), options.get("override")),
    )
    parsers = stage_parsers(dirs, overrides, organs)
    missing = missing_weights(parsers)
    if missing and as_bool(options.get("require_weights", True), "require_weights"):
        raise weights_error(missing)
    return parsers


class _CollectWarnings(logging.Handler):
    """The package's warnings during a run: printed as ``warning: ...`` and kept for the run report."""

    def __init__(self, echo: bool = True):
        super().__init__(logging.WARNING)
        self.messages: list[str] = []
        self.echo = echo

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        self.messages.append(message)
        if self.echo:
            print(f"warning: {message}", file=sys.stderr)

    def take(self) -> list[str]:
        taken, self.messages = self.messages, []
        return taken


def _environment(segmenter: Segmenter) -> dict:
    import platform

    import monai
    import torch

    from .engines import thread_invariant
    from .version import __version__

    cascade = segmenter.cascade
    return {
        "flare_c2f_extensions": __version__,
        "torch": torch.__version__,
        "monai": monai.__version__,
        "python": platform.python_version(),
        "device": str(cascade.device),
        "threads": torch.get_num_threads(),
        "engine": cascade.engine,
        "thread_invariant": thread_invariant(cascade.engine, cascade.device),  # the same maps for any thread count
        **({"calibration": cascade.calibration} if cascade.calibration else {}),  # openvino-int8's
        "amp": cascade.amp,
        "coarse_amp": cascade.coarse_amp,
        "organs": [ORGANS[o] for o in segmenter.organs],
        "stages": [stage.name if stage.name != "refiner" else f"refiner:{ORGANS[stage.labels[0]]}"
                   for stage in cascade.stages],
        "random_weight_stages": segmenter.random_weight_stages,
    }


def run_segment(
    input,
    output,
    organs=None,
    per_organ: bool = False,
    dicom_seg: bool = False,
    statistics: bool = False,
    preview: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    reference=None,
    **options,
) -> dict:
    """``flare-c2f segment``: check everything that can be checked (inputs, output folder, organs, weights) before
    any network runs, then segment each input and write its outputs (:func:`outputs.write_case`) and a run report.
    A case that fails is reported and the others go on. Returns the report.

    Under ``torchrun`` each rank segments its share of the cases on its own device and rank 0 writes one merged
    report (:mod:`.distributed`); the other ranks return their part."""
    from .distributed import Ranks, merge_reports
    from .engines import resolve_engine
    from .files import prepare_output_dir, refuse_foreign_outputs
    from .pseudo_label import load_volume_reference

    chosen = parse_organs(organs)
    images, ignored = resolve_inputs(input, output)
    targets = plan_targets(images, output)
    if dicom_seg:
        from .dicom_seg import check_source

        for image, _ in images:
            check_source(image)
    device = parse_device(options.get("device"))
    if resolve_engine(options.get("engine", "auto"), device or ("cuda" if _cuda() else "cpu")) == "openvino-int8":
        from .int8 import check_calibration

        check_calibration(options.get("calibration"))
    parse_threads(options.get("threads"))
    parse_seed(options.get("seed", 0))
    parse_max_voxels(options.get("max_voxels", "default"))
    if "amp" in options and options["amp"] is not None:
        as_bool(options["amp"], "amp")
    parsers = check_weights(chosen, options)
    refuse_foreign_outputs(targets, overwrite)
    volumes = load_volume_reference(reference)
    folder = prepare_output_dir(targets[0][1].parent)
    single_file = len(targets) == 1 and targets[0][1] == Path(str(output)).expanduser()
    report_path = report_path_for(folder, targets, single_file)
    ranks = Ranks.from_env()  # one process: everything as it was
    device = options["device"] = ranks.device(options.get("device"))
    options["threads"] = ranks.threads(options.get("threads"), device)
    mine = ranks.shard(targets, key=lambda target: str(target[1]))  # every case on exactly one rank
    ranks.start()
    collect = _CollectWarnings(echo=progress)
    package_logger = logging.getLogger("flare_c2f_extensions")
    package_logger.addHandler(collect)
    try:
        segmenter = Segmenter(organs=chosen, **options, stage_parsers=parsers)
        run_warnings = collect.take()
        cases = _run_cases(segmenter, mine, overwrite, progress, collect,
                           dict(per_organ=per_organ, dicom_seg=dicom_seg, statistics=statistics, preview=preview),
                           volumes)
    finally:
        package_logger.removeHandler(collect)
    from .cascade import _summarise
    from .files import write_text_atomic

    report = {
        **_environment(segmenter), "warnings": run_warnings, **_summarise(cases, segmenter.cascade.device, ignored),
    }
    parts = ranks.gather(report)
    ranks.stop()
    if parts is None:  # not rank 0: rank 0 writes the merged report
        return {**report, "report": str(report_path)}
    if ranks.distributed:
        report = merge_reports(parts, lambda cases: _summarise(cases, segmenter.cascade.device, ignored))
    write_text_atomic(json.dumps(report, indent=4) + "\n", report_path)
    report["report"] = str(report_path)
    return report


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def report_path_for(folder: Path, targets, single_file: bool) -> Path:
    """``<name>_report.json`` for ``-o FILE``, else ``segment_report.json`` in the output folder, unless a case's own
    outputs would take that name (a case called ``segment_report``): then ``segment_report_run.json``."""
    from .outputs import case_outputs, stem_of

    if single_file:
        return folder / f"{stem_of(targets[0][1])}_report.json"
    taken = {path.name for _, target in targets for path in case_outputs(target, True, True, True, True)}
    name = "segment_report.json"
    while name in taken:
        name = name.replace(".json", "_run.json")
    return folder / name


def _quality(labels, result, image, affine, organs, reference) -> dict:
    """Each organ's quality signals and flags (:func:`pseudo_label.organ_quality`); a flagged organ is a warning."""
    from .pseudo_label import organ_quality

    quality = organ_quality(labels, result, affine, organs, reference=reference)
    for name, organ in quality.items():
        if organ["flags"]:
            logger.warning("%s: check the %s: %s", image, name, "; ".join(organ["flags"]))
    return quality


def _run_cases(
    segmenter: Segmenter, targets, overwrite: bool, progress: bool, collect, what: dict, reference=None
) -> list[dict]:
    from .discovery import case_name
    from .efficiency import ResourceMonitor
    from .errors import input_error_in
    from .files import output_provenance_of
    from .images import image_geometry
    from .outputs import case_outputs, write_case

    cases, claimed = [], {}
    labels_options = segmenter.labels_options()
    for number, (image, target) in enumerate(targets, start=1):
        case = {"case": case_name(image), "input": image, "output": str(target)}
        if str(target) in claimed:
            case.update(status="failed", error=f"{image}: its output {target} is already {claimed[str(target)]}'s")
        else:
            claimed[str(target)] = image
            try:
                provenance = output_provenance_of(image, labels_options, [n for n, wanted in what.items() if wanted])
                if not overwrite and _finished(target, provenance, case_outputs(target, **what), case):
                    case["status"] = "exists"
                else:
                    with ResourceMonitor(segmenter.cascade.device) as monitor:
                        labels, result = segmenter.labels(image, keep_confidence=True)
                        geometry = image_geometry(image)  # once, for the quality signals and the outputs
                        quality = _quality(labels, result, image, geometry.affine, segmenter.organs, reference)
                        written = write_case(labels, image, target, segmenter.organs, **what, provenance=provenance,
                                             quality=quality, geometry=geometry)
            except (KeyboardInterrupt, SystemExit):
                raise
            except Exception as error:  # one bad case must not stop the others
                cause = input_error_in(error)
                case.update(status="failed", error=str(cause) if cause else f"{image}: {type(error).__name__}: {error}")
            else:
                if case.get("status") != "exists":
                    case.update(status="done", outputs=[str(p) for p in written], **monitor.usage.as_dict())
                    case["stage_seconds"] = {k: round(v, 3) for k, v in result.seconds.items()}
                    case["skipped_stages"] = result.skipped
                    case["quality"] = quality
        case["warnings"] = collect.take()
        cases.append(case)
        if progress:
            print(_case_line(case, number, len(targets)), file=sys.stderr)
    return cases


def _finished(target: Path, provenance: dict, expected, case: dict) -> bool:
    from .files import finished

    why = finished(target, provenance, expected)
    if why == "":
        return False
    if why:
        case["redone"] = why
        logger.warning("%s: exists but %s: segmenting the case again", target, why)
    return why is None


def _case_line(case: dict, number: int, total: int) -> str:
    status = case["status"]
    if status == "done":
        return f"[{number}/{total}] {case['case']}: {case['seconds']:.1f} s -> {case['output']}"
    if status == "exists":
        return f"[{number}/{total}] {case['case']}: {case['output']} exists, skipped (--overwrite to redo it)"
    return f"[{number}/{total}] {case['case']}: failed: {case['error']}"
