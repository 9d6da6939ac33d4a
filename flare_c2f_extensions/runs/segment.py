"""From a CT to organs in one call: the cascade (:class:`~flare_c2f_extensions.cascade.pipeline.Cascade`) behind the
``flare-c2f segment`` command and the Python API :func:`segment`.

Where the stages come from: the bundles folder (:mod:`flare_c2f_extensions.paths`), or ``bundles_dir`` (a folder of
trained stage bundles), or ``stage_dirs`` (one folder per stage). Such a folder is either a whole bundle
(``configs/`` and ``models/``) or just its weights (``models/``), the configs then coming from the shipped bundle.
Missing weights end with one line that says what to do, before anything is loaded.

:func:`segment` takes a path or a ``nibabel`` image and returns a ``nibabel.Nifti1Image`` with the input's geometry
(and per-organ statistics when asked), without writing anything the caller has to manage. The command
(:func:`run_segment`) adds the files: see :mod:`flare_c2f_extensions.io.outputs`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

import nibabel as nib
import numpy as np

from flare_c2f_extensions.errors import InputError
from flare_c2f_extensions.io.images import CT
from flare_c2f_extensions.io.label_maps import label_map_image
from flare_c2f_extensions.labels import ORGANS
from flare_c2f_extensions.options import SegmentOptions
from flare_c2f_extensions.paths import STAGE_BUNDLES
from flare_c2f_extensions.paths import bundles_dir as default_bundles_dir
from flare_c2f_extensions.runs.ranks import Ranks

__all__ = [
    "Segmenter", "load_cascade", "plan_targets", "resolve_inputs", "run_segment", "segment", "stage_parsers",
    "stage_sources",
]

logger = logging.getLogger(__name__)

RANDOM_WEIGHTS_HINT = "--require_weights false"


# -- options ------------------------------------------------------------------------------------------------------


# -- stages -------------------------------------------------------------------------------------------------------


def stage_sources(options: SegmentOptions) -> tuple[dict[str, Path], dict[str, dict]]:
    """Config folder and overrides of every stage.

    A stage folder with ``configs/inference.json`` is a whole bundle; one without is a weights folder: the configs
    come from the default bundles folder and ``ckpt_dir`` points at its ``models/``.
    """
    defaults = default_bundles_dir()
    root = options.bundles_dir if options.bundles_dir is not None else defaults
    if options.bundles_dir is not None and not root.is_dir():
        raise InputError(f"{root}: --bundles_dir folder does not exist")
    folders = {name: root / bundle for name, bundle in STAGE_BUNDLES.items()}
    unknown = sorted(set(options.stage_dirs) - set(STAGE_BUNDLES))
    if unknown:
        raise InputError(f"--stage_dirs: unknown stage(s) {', '.join(unknown)}; stages: {', '.join(STAGE_BUNDLES)}")
    folders.update({name: Path(path) for name, path in options.stage_dirs.items()})
    dirs, overrides = {}, {name: dict(value) for name, value in options.overrides.items()}
    for name, folder in folders.items():
        if (folder / "configs" / "inference.json").is_file():
            dirs[name] = folder
        else:
            dirs[name] = defaults / STAGE_BUNDLES[name]
            overrides.setdefault(name, {})["ckpt_dir"] = str(folder / "models")
    return dirs, overrides


def stage_parsers(options: SegmentOptions) -> dict:
    """Each stage the chosen organs need, its ``configs/inference.json`` parsed once: ``{(stage, refiner organ or
    None): parser}``, for the weights check and then the loading (:meth:`Cascade.from_bundles`' ``parsers``)."""
    from flare_c2f_extensions.cascade.configs import read_stage_config
    from flare_c2f_extensions.cascade.stages import needed_stages

    dirs, overrides = stage_sources(options)
    return {
        (name, extra.get("organ")): read_stage_config(dirs[name], {**overrides.get(name, {}), **extra}, name)
        for name, extra in needed_stages(options.organs)
    }


def missing_weights(parsers: Mapping) -> list[str]:
    """``"<stage>: <checkpoint path>"`` for every stage of :func:`stage_parsers` whose checkpoint does not exist."""
    missing = []
    for (name, organ), parser in parsers.items():
        checkpoint = Path(parser.get_parsed_content("ckpt_path"))
        if not checkpoint.is_file():
            missing.append(f"{name} ({organ}): {checkpoint}" if organ else f"{name}: {checkpoint}")
    return missing


def check_weights(options: SegmentOptions) -> dict:
    """The stages' parsed configs (:func:`stage_parsers`), after failing with one line if a needed stage has no
    weights and they are required; the segmenter then loads them without parsing again."""
    parsers = stage_parsers(options)
    missing = missing_weights(parsers)
    if missing and options.require_weights:
        more = f" (and {len(missing) - 1} more stage(s))" if len(missing) > 1 else ""
        raise InputError(
            f"no trained weights for stage {missing[0]}{more}: train the stages (`flare-c2f train`, or each bundle's "
            f"configs/train.json), download a release (`flare-c2f download_release`) and point --bundles_dir (or "
            f"--stage_dirs) at it, or add {RANDOM_WEIGHTS_HINT} to time the cascade with random weights"
        )
    return parsers


def load_cascade(options: SegmentOptions, parsers: Mapping | None = None):
    """The cascade with the stages ``options.organs`` need, and the stages that run with random weights (no
    checkpoint, ``require_weights=False``: for timing), seeded by ``options.seed`` so such runs repeat exactly.
    ``parsers``: the stages' configs already parsed for these options (:func:`check_weights`)."""
    import torch

    from flare_c2f_extensions.cascade.pipeline import MAX_CASE_VOXELS, Cascade

    parsers = check_weights(options) if parsers is None else parsers
    missing = missing_weights(parsers)
    if missing:
        logger.warning("no weights for %d stage(s): they run with random weights (timing only)", len(missing))
    dirs, overrides = stage_sources(options)
    stages_logger = logging.getLogger("flare_c2f_extensions.cascade.stages")  # each stage would say it again
    quiet = _QuietRandomInit()
    stages_logger.addFilter(quiet)
    try:
        torch.manual_seed(options.seed)
        cascade = Cascade.from_bundles(
            device=options.device, amp=options.amp, stage_overrides=overrides, stage_dirs=dirs,
            require_weights=options.require_weights, organs=options.organs, engine=options.engine,
            max_voxels=MAX_CASE_VOXELS if options.max_voxels == "default" else options.max_voxels, parsers=parsers,
            calibration=options.calibration,
        )
    finally:
        stages_logger.removeFilter(quiet)
    return cascade, missing


class _QuietRandomInit(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "random initialisation" not in record.getMessage()


# -- the API ------------------------------------------------------------------------------------------------------


class Segmenter:
    """The cascade loaded once, for many images: ``Segmenter(organs="liver,spleen")(image)``.

    ``options``: a :class:`~flare_c2f_extensions.options.SegmentOptions`, or its fields as keywords (as
    :meth:`SegmentOptions.parse <flare_c2f_extensions.options.SegmentOptions.parse>` takes them). ``threads`` sets
    torch's intra-op threads (process-wide). ``parsers``: the stages' configs already parsed (:func:`check_weights`).
    """

    def __init__(self, options: SegmentOptions | None = None, parsers: Mapping | None = None, **kwargs):
        import torch

        if options is not None and kwargs:
            raise TypeError("Segmenter: give options or keywords, not both")
        self.options = options if options is not None else SegmentOptions.parse(**kwargs)
        if self.options.threads is not None:
            torch.set_num_threads(self.options.threads)
        self.organs, self.seed = self.options.organs, self.options.seed
        self.cascade, self.random_weight_stages = load_cascade(self.options, parsers)

    def labels_options(self) -> dict:
        """What decides this segmenter's label maps (:meth:`Cascade.labels_options`, with the organs asked for and
        the seed of random weights), recorded in every label map ``flare-c2f segment`` writes."""
        options = self.cascade.labels_options()
        options["organs"] = [ORGANS[o] for o in self.organs]
        seeded = f"random (seed {self.seed})"
        options["weights"] = {name: seeded if sha == "random" else sha for name, sha in options["weights"].items()}
        return options

    def labels(self, image: str | os.PathLike | CT, keep_confidence: bool = False):
        """The label map of a CT (a path or an opened :class:`~flare_c2f_extensions.io.images.CT`; the file's layout,
        FLARE ids of the chosen organs only) and the cascade's :class:`~.pipeline.CaseResult` (seconds by stage,
        skipped stages; the confidence map with ``keep_confidence``)."""
        result = self.cascade.segment(image, keep_confidence=keep_confidence)
        labels = result.labels
        if len(self.organs) < len(ORGANS):  # a group's other organs are not asked for
            labels = np.where(np.isin(labels, self.organs), labels, 0).astype(np.uint8)
        return labels, result

    def __call__(self, image, statistics: bool = False):
        with _as_path(image) as path:
            try:
                ct = CT.open(path, keep_voxels=statistics)
                labels, case = self.labels(ct, keep_confidence=statistics)
            except InputError as error:
                if path == str(image):
                    raise
                # the temporary file is gone when the caller reads this: name what they passed
                raise InputError(str(error).replace(path, "the nibabel image given")) from None
            result = label_map_image(labels, ct.geometry)
            if not statistics:
                return result
            from flare_c2f_extensions.evaluation.quality import organ_quality
            from flare_c2f_extensions.io.outputs import organ_statistics

            quality = organ_quality(labels, case, ct.affine, self.organs)
            return result, organ_statistics(labels, ct.hu(), ct.affine, self.organs, quality)


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
    from flare_c2f_extensions.io.discovery import case_name, find_images, is_nifti
    from flare_c2f_extensions.io.images import check_volume

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
    from flare_c2f_extensions.io.discovery import NIFTI_SUFFIXES
    from flare_c2f_extensions.io.files import outputs_apart_from_inputs

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


def _environment(segmenter: Segmenter) -> dict:
    import platform

    import monai
    import torch

    from flare_c2f_extensions.cascade.engines import thread_invariant
    from flare_c2f_extensions.version import __version__

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
    """``flare-c2f segment``: check everything that can be checked (inputs, output folder, options, weights) before
    any network runs, then segment each input and write its outputs (:func:`outputs.write_case`) through the one
    batch runner (:class:`~.batch.BatchRunner`: a case that fails is reported and the others go on; under
    ``torchrun`` each rank takes its share of the cases on its own device) and write one run report (rank 0).
    Returns the report (on other ranks their part)."""
    from flare_c2f_extensions.cascade.engines import INT8, resolve_engine
    from flare_c2f_extensions.evaluation.quality import load_volume_reference
    from flare_c2f_extensions.io.files import prepare_output_dir, refuse_foreign_outputs, write_text_atomic
    from flare_c2f_extensions.runs.batch import BatchRunner, Case, CollectWarnings, summarise

    chosen = SegmentOptions.parse(organs=organs, **options)
    images, ignored = resolve_inputs(input, output)
    targets = plan_targets(images, output)
    if dicom_seg:
        from flare_c2f_extensions.io.dicom_seg import check_source

        for image, _ in images:
            check_source(image)
    ranks = Ranks.from_env()  # one process: everything as it was
    device = ranks.device(chosen.device)
    chosen = dataclasses.replace(chosen, device=None if device is None else torch_device(device),
                                 threads=ranks.threads(chosen.threads, device))
    if resolve_engine(chosen.engine, chosen.device or ("cuda" if _cuda() else "cpu")) == INT8:
        from flare_c2f_extensions.cascade.int8 import check_calibration

        check_calibration(chosen.calibration)
    parsers = check_weights(chosen)
    refuse_foreign_outputs(targets, overwrite)
    volumes = load_volume_reference(reference)
    folder = prepare_output_dir(targets[0][1].parent)
    single_file = len(targets) == 1 and targets[0][1] == Path(str(output)).expanduser()
    report_path = report_path_for(folder, targets, single_file)
    names = dict(images)
    cases = [Case(image, names[image], target) for image, target in targets]
    what = dict(per_organ=per_organ, dicom_seg=dicom_seg, statistics=statistics, preview=preview)
    run_warnings = CollectWarnings(echo=progress)  # while the cascade loads, for the run report
    package_logger = logging.getLogger("flare_c2f_extensions")
    package_logger.addHandler(run_warnings)
    try:
        segmenter = Segmenter(chosen, parsers=parsers)
    finally:
        package_logger.removeHandler(run_warnings)
    work = SegmentWork(segmenter, what, volumes)
    batch = BatchRunner(work, cases, segmenter.cascade.device, overwrite, "lines" if progress else None).run()
    ranks.stop()
    if batch is None:  # not rank 0: rank 0 writes the report
        return {"report": str(report_path)}
    report = {**_environment(segmenter), "warnings": run_warnings.messages,
              **summarise(batch["cases"], segmenter.cascade.device, ignored)}
    if batch["ranks"]:
        report.update(world_size=len(batch["ranks"]), ranks=batch["ranks"])
    write_text_atomic(json.dumps(report, indent=4) + "\n", report_path)
    report["report"] = str(report_path)
    return report


class SegmentWork:
    """Each case of ``flare-c2f segment``: its label map and the outputs asked for (``what``: per-organ masks, DICOM
    SEG, statistics, preview), its quality signals (a flagged organ is a warning), and the record of where the label
    map came from, which decides on a rerun whether the case is finished (:func:`files.finished`)."""

    def __init__(self, segmenter: Segmenter, what: Mapping, reference=None):
        self.segmenter, self.what, self.reference = segmenter, dict(what), reference
        self.labels_options = segmenter.labels_options()
        self.wanted = [name for name, wanted in self.what.items() if wanted]

    def finished(self, case):
        from flare_c2f_extensions.io.files import finished, output_provenance_of
        from flare_c2f_extensions.io.outputs import case_outputs

        provenance = output_provenance_of(case.image, self.labels_options, self.wanted)
        return finished(case.target, provenance, case_outputs(case.target, **self.what)), {}

    def read_ahead(self, case) -> CT:
        """The case's CT, its voxels decoded (:meth:`CT.decode`)."""
        return self._open(case).decode()

    def _open(self, case) -> CT:
        """The case's CT, read once and used by every output (its HU kept for statistics and the preview)."""
        return CT.open(case.image, keep_voxels=self.what["statistics"] or self.what["preview"])

    def process(self, case, ahead: CT | None = None) -> dict:
        from flare_c2f_extensions.evaluation.quality import organ_quality
        from flare_c2f_extensions.io.files import output_provenance_of
        from flare_c2f_extensions.io.outputs import write_case

        provenance = output_provenance_of(case.image, self.labels_options, self.wanted)  # its hash is remembered
        ct = ahead or self._open(case)
        labels, result = self.segmenter.labels(ct, keep_confidence=True)
        quality = organ_quality(labels, result, ct.affine, self.segmenter.organs, reference=self.reference)
        for name, organ in quality.items():
            if organ["flags"]:
                logger.warning("%s: check the %s: %s", case.image, name, "; ".join(organ["flags"]))
        written = write_case(labels, ct, case.target, self.segmenter.organs, **self.what, provenance=provenance,
                             quality=quality)
        seconds = {stage: round(value, 3) for stage, value in result.seconds.items()}
        return {"outputs": [str(p) for p in written], "stage_seconds": seconds, "skipped_stages": result.skipped,
                "quality": quality}


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def torch_device(device):
    import torch

    return torch.device(device)


def report_path_for(folder: Path, targets, single_file: bool) -> Path:
    """``<name>_report.json`` for ``-o FILE``, else ``segment_report.json`` in the output folder, unless a case's own
    outputs would take that name (a case called ``segment_report``): then ``segment_report_run.json``."""
    from flare_c2f_extensions.io.outputs import case_outputs, stem_of

    if single_file:
        return folder / f"{stem_of(targets[0][1])}_report.json"
    taken = {path.name for _, target in targets for path in case_outputs(target, True, True, True, True)}
    name = "segment_report.json"
    while name in taken:
        name = name.replace(".json", "_run.json")
    return folder / name
