"""The commands of ``flare-c2f`` (``python -m flare_c2f_extensions <command> --help``), each a function whose
parameters are its options."""

from __future__ import annotations


def phantom(out: str, n: int = 4, seed: int = 0, **options):
    """Write a synthetic FLARE22-layout cohort (:func:`.synthetic.phantom.write_cohort`); ``--n_test``
    held-out cases, ``--n_unlabelled`` unlabelled ones (``imagesUnlabelled/``, truth aside in ``truthUnlabelled/``)."""
    from flare_c2f_extensions.synthetic.phantom import write_cohort

    return write_cohort(out, n=n, seed=seed, **options)


def network_info(spatial_size: int = 128, channels=None, blocks_per_level: int = 1, out_channels: int = 14):
    """Parameter count and FLOPs of the ResUNet-ASPP (defaults: the paper-size network)."""
    from flare_c2f_extensions.cascade.networks import PAPER_CHANNELS, describe

    return describe(
        spatial_size, channels=channels or PAPER_CHANNELS, blocks_per_level=blocks_per_level, out_channels=out_channels
    )


def evaluate(pred: str, gt: str, out: str):
    """FLARE22 DSC and NSD of the label maps in ``pred`` against ``gt``; writes metrics.csv and summary.json.
    Exit status 3 when a case could not be scored (it is listed; the others are scored)."""
    import sys

    from flare_c2f_extensions.errors import FAILED_CASES_EXIT_STATUS, InputError
    from flare_c2f_extensions.evaluation.metrics import evaluate_folder, format_summary

    try:
        summary = evaluate_folder(pred, gt, out)
    except InputError as error:  # a folder or naming mistake: one line, nothing scored
        raise SystemExit(f"error: {error}") from None
    print(format_summary(summary))
    if summary["failed_cases"]:
        print(f"error: {len(summary['failed_cases'])} case(s) could not be scored (see above)", file=sys.stderr)
        sys.exit(FAILED_CASES_EXIT_STATUS)


def quickstart(out: str = "./quickstart", **options):
    """Generate a cohort, train briefly, segment held-out cases and evaluate them, on the CPU."""
    from flare_c2f_extensions.cli.quickstart import quickstart as run

    run(out, **options)


def train(
    dataset_dir: str,
    out: str,
    stages=None,
    epochs: int | None = None,
    device: str | None = None,
    override=None,
    num_val: int = 10,
    evaluate: bool = True,
    workers: int = 1,
):
    """Train every stage of the cascade (or ``--stages coarse,solid``; ``refiner`` = the four refiners) from a
    FLARE-layout folder into ``out/<bundle>/`` through each bundle's configs/train.json, then evaluate the cascade
    on the last ``num_val`` labelled cases. ``--override "solid#learning_rate=0.001"`` (repeatable; no stage
    prefix: every stage) or ``--override overrides.yaml`` ({stage: {key: value}}). Rerunning resumes.
    ``--workers N``: N stages side by side (small networks on CPU cores; each stage's lines go to its logs/).
    Several GPUs: ``torchrun --nproc_per_node=N -m flare_c2f_extensions train ...``."""
    from flare_c2f_extensions.errors import InputError
    from flare_c2f_extensions.training.train import train_cascade

    stages = ",".join(stages) if isinstance(stages, (list, tuple)) else stages
    overrides = list(override) if isinstance(override, (list, tuple)) else override
    try:
        if isinstance(workers, bool) or not str(workers).isdigit() or int(workers) < 1:
            raise InputError(f"--workers: expected a positive whole number, got {workers!r}")
        train_cascade(dataset_dir, out, stages, epochs, device, overrides, num_val, evaluate, workers=int(workers))
    except InputError as error:
        raise SystemExit(f"error: {error}") from None


def assemble(bundles_dir: str, out: str | None = None):
    """Assemble the cascade bundle's one network (every stage a submodule) and ``models/model.pt`` from trained stage
    bundles in ``bundles_dir`` (``flare-c2f train`` does it at its end), into ``out`` (default
    ``bundles_dir/flare22_cascade``), for MONAI Label, MONAI Deploy and ``ckpt_export``."""
    from flare_c2f_extensions.cascade.assemble import assemble_cascade
    from flare_c2f_extensions.errors import InputError

    try:
        print(assemble_cascade(bundles_dir, out))
    except InputError as error:
        raise SystemExit(f"error: {error}") from None


def sample_ct(out: str, cache: str | None = None):
    """Write the real sample CT (TotalSegmentator 2.18.0's example, fetched once with pip and cached in
    ``$FLARE_C2F_CACHE`` or ``~/.cache/flare_c2f``) as ``out/imagesTs/example_0000.nii.gz`` and its reference
    organs as FLARE ids in ``out/labelsTs/example.nii.gz``."""
    from flare_c2f_extensions.releases.sample_ct import write_sample_dataset

    paths = write_sample_dataset(out, cache)
    for path in paths.values():
        print(path)


def pack(
    out: str, bundles=None, weights: str = "inside", weights_url: str | None = None, bundles_dir: str | None = None
):
    """Pack bundles into reproducible ``<name>_v<version>.zip`` release files (+ ``.sha256``) in ``out``.

    ``--bundles flare22_coarse,flare22_cascade`` (default: all); ``--weights inside`` (models/ in the zip) or
    ``--weights large_files --weights_url URL`` (weights beside the zips, listed with sha256 in large_files.yml).
    """
    from flare_c2f_extensions.releases.bundles import ReleaseError
    from flare_c2f_extensions.releases.bundles import pack as run

    try:
        items = run(out, bundles, weights, weights_url, bundles_dir)
    except ReleaseError as error:
        raise SystemExit(f"error: {error}") from None
    for item in items:
        print(f"{item['sha256']}  {item['zip']}")


def _hex(sha256):
    """fire reads an all-digit hash as a number: give back its 64 digits."""
    return f"{sha256:064d}" if isinstance(sha256, int) and not isinstance(sha256, bool) else sha256


def verify_release(zip: str, sha256: str | None = None, name: str | None = None):
    """Check a release zip before extracting it: sha256 (``--sha256`` or the ``.sha256`` sidecar), CRCs, and that
    every entry stays inside its bundle folder. Exits non-zero with the reason if it is refused."""
    from flare_c2f_extensions.releases.bundles import ReleaseError
    from flare_c2f_extensions.releases.bundles import verify_release as run

    try:
        report = run(zip, _hex(sha256), name)
    except ReleaseError as error:
        raise SystemExit(f"error: {error}") from None
    print(f"ok: {report['zip']} ({report['name']} {report['version']}, {report['entries']} entries)")
    print(f"sha256 {report['sha256']}")


def download_release(
    url: str, bundle_dir: str = ".", sha256: str | None = None, name: str | None = None, max_bytes: int | None = None
):
    """Download a release zip, verify it (``--sha256`` or ``<url>.sha256``), fetch its hash-checked large files,
    and only then put ``<name>/`` into ``bundle_dir``. ``--max_bytes``: the largest zip accepted (default 4 GiB)."""
    from flare_c2f_extensions.releases.bundles import ReleaseError
    from flare_c2f_extensions.releases.bundles import download_release as run

    try:
        print(run(url, bundle_dir, _hex(sha256), name, max_bytes=max_bytes))
    except ReleaseError as error:
        raise SystemExit(f"error: {error}") from None


def export(bundle_dir: str, formats: str = "ts,onnx", out: str | None = None, overrides=None, check: bool = True):
    """Export every checkpoint of a bundle to TorchScript (``ckpt_export``) and ONNX (``onnx_export``) and print
    each format's max absolute difference from PyTorch on a random input."""
    import json

    from flare_c2f_extensions.cascade.export import export_bundle

    for item in export_bundle(bundle_dir, formats, out, overrides, check):
        print(json.dumps(item))


def segment(
    input: str | None = None,
    output: str | None = None,
    organs=None,
    device: str | None = None,
    threads: int | None = None,
    amp=None,
    bundles_dir: str | None = None,
    stage_dirs=None,
    stage_overrides=None,
    require_weights=True,
    overwrite=False,
    per_organ=False,
    dicom_seg=False,
    statistics=False,
    preview=False,
    seed: int = 0,
    engine: str = "auto",
    max_voxels="default",
    reference: str | None = None,
    override=None,
    calibration: str | None = None,
):
    """Segment the 13 FLARE22 organs in CT: ``flare-c2f segment -i CT -o OUT [options]``.

    ``-i``: a NIfTI file, a DICOM series folder, or a folder of them. ``-o``: the label map's file name for one
    input (``seg.nii.gz``), else a folder (``<case>.nii.gz`` per input). Beside each label map: its label names
    (``.json`` in MONAI channel_def form, ``.itksnap.txt``, ``.ctbl`` for 3D Slicer), and with ``--per_organ`` one
    mask per organ, ``--dicom_seg`` a DICOM Segmentation (DICOM input), ``--statistics`` volumes and HU (JSON and
    CSV), ``--preview`` a PNG; a run report JSON per run. ``--organs liver,spleen``: only these (and only the
    stages they need). ``--device cuda``, ``--threads N``, ``--amp true|false``, ``--engine torch|openvino|auto``
    (auto: OpenVINO on a CPU for stages with weights; ``openvino-int8``: quantised, calibrated on the CTs of
    ``--calibration FOLDER_OR_DATALIST``, e.g. the training images), ``--max_voxels N`` (larger inputs refused from
    their header). Weights: ``--bundles_dir DIR`` (trained stage bundles) or ``--stage_dirs "{'coarse': DIR, ...}"``;
    ``--require_weights false`` runs random weights (seeded by ``--seed``) for timing. ``--override
    "solid#key=value"`` (repeatable, or a JSON/YAML file ``{stage: {key: value}}``) overrides stage configs, as in
    ``train``; ``--stage_overrides`` takes the same as one mapping (JSON).
    Each organ's quality signals (the cascade's confidence, stray components) go into the statistics and the run
    report, and an organ that fails a check is a warning; ``--reference`` (a labels folder or a
    ``volume_reference.json``) adds the check of its volume against that cohort's range.
    An existing label map is kept if this command wrote it for the same input and options, redone if its input or
    options changed, and never replaced otherwise unless ``--overwrite``.
    """
    from flare_c2f_extensions.errors import InputError
    from flare_c2f_extensions.options import as_bool
    from flare_c2f_extensions.runs.segment import run_segment

    try:
        if input is None or output is None or isinstance(input, bool) or isinstance(output, bool):
            raise InputError("segment needs an input and an output: flare-c2f segment -i CT -o OUT")
        flags = dict(overwrite=overwrite, per_organ=per_organ, dicom_seg=dicom_seg, statistics=statistics,
                     preview=preview)
        flags = {name: as_bool(value, name) for name, value in flags.items()}
        report = run_segment(
            str(input), str(output), organs=organs, device=device, threads=threads, amp=amp, bundles_dir=bundles_dir,
            stage_dirs=stage_dirs, stage_overrides=stage_overrides, require_weights=require_weights, seed=seed,
            engine=engine, max_voxels=max_voxels, reference=reference, override=override, calibration=calibration,
            **flags,
        )
    except InputError as error:
        raise SystemExit(f"error: {error}") from None
    failed = [case for case in report.get("cases", []) if case["status"] == "failed"]  # other ranks: none
    if failed:  # the report is written; exit status 3 as the cascade bundle's (README, "Inputs")
        import sys

        from flare_c2f_extensions.errors import FAILED_CASES_EXIT_STATUS

        for case in failed:
            print(f"error: {case['error']}", file=sys.stderr)
        total = len(report["cases"])
        print(f"error: {len(failed)} of {total} case(s) failed (see {report['report']})", file=sys.stderr)
        raise SystemExit(FAILED_CASES_EXIT_STATUS)


def pseudo_label(
    bundles_dir: str | None = None,
    input: str | None = None,
    output: str | None = None,
    reference: str | None = None,
    rule=None,
    device: str | None = None,
    stage_overrides=None,
    require_weights=True,
    overwrite=False,
    seed: int = 0,
    override=None,
):
    """Pseudo-label unlabelled CTs with a teacher and gate each case:
    ``flare-c2f pseudo_label --bundles_dir TEACHER -i UNLABELLED -o OUT [--reference D/labelsTr]``.

    Writes ``OUT/labels/<case>.nii.gz``, ``OUT/signals/<case>.json`` (per organ: confidence mean and percentiles,
    volume, components the largest-component step dropped; organs missing), ``OUT/quality.json``/``.csv`` with
    each case's ``keep`` and reasons, and ``OUT/kept.json`` (a datalist of the kept cases). ``--reference``: the
    labelled cohort's label maps (or a ``volume_reference.json``) for the organ volume check. ``--rule`` overrides
    thresholds (JSON, e.g. ``'{"min_mean_confidence": 0.9}'``, or a JSON file); a rerun skips finished cases and
    gates them again with the new rule. ``--require_weights false`` runs random weights seeded by ``--seed``
    (plumbing only). Under ``torchrun`` the cases are shared between the ranks, each on its own device.
    Exit status 3 when a case failed (listed at the end; the report is written first).
    """
    import dataclasses

    from flare_c2f_extensions.errors import InputError
    from flare_c2f_extensions.options import SegmentOptions, as_bool
    from flare_c2f_extensions.runs.pseudo_label import pseudo_label as run
    from flare_c2f_extensions.runs.ranks import Ranks
    from flare_c2f_extensions.runs.segment import load_cascade

    ranks = Ranks.from_env()
    try:
        if bundles_dir is None or input is None or output is None:
            raise InputError("pseudo_label needs a teacher, an input and an output: --bundles_dir DIR -i IN -o OUT")
        options = SegmentOptions.parse(device=device, bundles_dir=bundles_dir, stage_overrides=stage_overrides,
                                       override=override, require_weights=require_weights, seed=seed)
        teacher, _ = load_cascade(dataclasses.replace(options, device=ranks.device(options.device)))
        report = run(teacher, input, output, reference=reference, rule=rule, overwrite=as_bool(overwrite, "overwrite"))
    except InputError as error:
        raise SystemExit(f"error: {error}") from None
    finally:
        ranks.stop()
    if report is None:
        return  # not rank 0: rank 0 reports
    print(f"{report['num_kept']} of {report['num_cases']} case(s) kept ({report['num_failed']} failed): {output}")
    if report["num_failed"]:  # the report is written; exit status 3 as segment's and evaluate's
        import sys

        from flare_c2f_extensions.errors import FAILED_CASES_EXIT_STATUS

        for case in report["cases"]:
            if case["status"] == "failed":
                print(f"error: {case['error']}", file=sys.stderr)
        print(f"error: {report['num_failed']} of {report['num_cases']} case(s) failed (see {output}/quality.json)",
              file=sys.stderr)
        raise SystemExit(FAILED_CASES_EXIT_STATUS)


def self_train(
    dataset_dir: str,
    unlabelled: str,
    out: str,
    rounds: int = 1,
    teacher: str | None = None,
    epochs: int | None = None,
    device: str | None = None,
    override=None,
    num_val: int = 10,
    labelled_repeat: int = 1,
    rule=None,
):
    """Self-train on unlabelled CTs: ``flare-c2f self_train --dataset_dir D --unlabelled U --rounds K --out DIR``.

    Round 0 trains the teacher on D's labelled cases (or takes ``--teacher BUNDLES``); each round then pseudo-labels
    U with the best cascade so far (quality gate: ``--rule``, see ``pseudo_label``), trains a student on the labelled
    training cases (``--labelled_repeat`` times) plus the kept pseudo-labels, and scores it on the last ``num_val``
    labelled cases. ``DIR/self_train.json`` names the best round; its ``bundles`` folder is the result. ``--epochs``,
    ``--device`` and ``--override`` go to every training as in ``train``. Rerunning resumes."""
    from flare_c2f_extensions.errors import InputError
    from flare_c2f_extensions.training.self_train import self_train as run

    overrides = list(override) if isinstance(override, (list, tuple)) else override
    try:
        run(dataset_dir, unlabelled, out, rounds, teacher, epochs, device, overrides, num_val, labelled_repeat, rule)
    except InputError as error:
        raise SystemExit(f"error: {error}") from None


COMMANDS = {
    "segment": segment,
    "quickstart": quickstart,
    "train": train,
    "phantom": phantom,
    "pseudo_label": pseudo_label,
    "self_train": self_train,
    "evaluate": evaluate,
    "network_info": network_info,
    "sample_ct": sample_ct,
    "pack": pack,
    "verify_release": verify_release,
    "download_release": download_release,
    "export": export,
    "assemble": assemble,
}


# TotalSegmentator's -i/-o; fire has no such aliases
SHORT_FLAGS = {command: {"-i": "--input", "-o": "--output"} for command in ("segment", "pseudo_label")}


def expand_short_flags(argv: list[str]) -> list[str]:
    """``segment -i CT -o OUT`` -> ``segment --input CT --output OUT`` (also ``-i=CT``)."""
    aliases = SHORT_FLAGS.get(argv[0], {}) if argv else {}
    expanded = []
    for arg in argv:
        flag, equals, value = arg.partition("=")
        expanded.append(aliases[flag] + equals + value if flag in aliases else arg)
    return expanded


def _options_of(command: str):
    """The function whose parameters a command's options are (the wrapped one where a command passes them on)."""
    if command == "phantom":
        from flare_c2f_extensions.synthetic.phantom import write_cohort

        return write_cohort
    if command == "quickstart":
        from flare_c2f_extensions.cli.quickstart import quickstart as run

        return run
    return COMMANDS[command]


# the commands that only segment: MONAI imports the modules below whenever they are installed (about 1.5 s of a
# start), and these commands use none of them
INFERENCE_COMMANDS = ("segment", "pseudo_label")
# ignite: training only; pydicom: imported where a DICOM series is read; scipy.signal and scipy.sparse: only MONAI's
# ultrasound confidence map, signal transforms and DiNTS use them, and they are 0.7 s of MONAI's 1.2 s import
NOT_NEEDED_FOR_INFERENCE = ("ignite", "pydicom", "scipy.signal", "scipy.sparse")


class _NotImported:
    """A meta path finder that answers "not installed" for ``names`` (modules, top-level or dotted) and their
    submodules."""

    def __init__(self, names):
        self.names = tuple(names)

    def find_spec(self, fullname, path=None, target=None):
        if any(fullname == name or fullname.startswith(name + ".") for name in self.names):
            raise ModuleNotFoundError(f"No module named {fullname!r} (not imported for this command)", name=fullname)
        return None


def preload(command: str | None) -> None:
    """torch and MONAI imported up front with the garbage collector paused (their imports create a great many
    objects: collecting meanwhile costs about 0.9 s a start); for :data:`INFERENCE_COMMANDS` MONAI is imported as if
    the modules of :data:`NOT_NEEDED_FOR_INFERENCE` were not installed: it then never uses them, and they stay
    importable afterwards for whoever needs them."""
    import gc
    import sys

    if "monai" in sys.modules:
        return
    collecting = gc.isenabled()
    gc.disable()
    blocker = _NotImported(NOT_NEEDED_FOR_INFERENCE) if command in INFERENCE_COMMANDS else None
    if blocker is not None:
        sys.meta_path.insert(0, blocker)
    try:
        import monai  # noqa: F401
        import torch  # noqa: F401
    finally:
        if blocker is not None:
            sys.meta_path.remove(blocker)
        if collecting:
            gc.enable()


def main(argv: list[str] | None = None):
    import gc
    import sys

    import fire

    from flare_c2f_extensions.cli.arguments import check_options, keep_hashes
    from flare_c2f_extensions.errors import InputError, start_run

    start_run()  # one-line input errors, known noise silenced: for this run, never as an import's side effect
    argv = keep_hashes(expand_short_flags(sys.argv[1:] if argv is None else list(argv)))
    preload(argv[0] if argv else None)
    gc.freeze()  # the imports' objects live to the end: the run's later collections skip them
    if argv and argv[0] in COMMANDS:
        try:
            check_options(argv[0], _options_of(argv[0]), argv[1:])
        except InputError as error:
            raise SystemExit(f"error: {error}") from None
    fire.Fire(COMMANDS, command=argv)


def _terminated(signum, frame):
    raise KeyboardInterrupt("terminated")


def console(argv: list[str] | None = None):
    """The ``flare-c2f`` program: :func:`main`, then an exit that skips the interpreter's teardown. Tearing down
    torch, MONAI and OpenVINO module by module costs about half a second of every run (measured), after every
    output has been written and closed; streams and logging are flushed first. Errors leave the usual way.
    Ctrl-C and SIGTERM end with one line (exit status 130 and 143) after the clean-up of partial outputs."""
    import logging
    import os
    import signal
    import sys

    signal.signal(signal.SIGTERM, _terminated)  # as Ctrl-C: every partial output is removed on the way out
    try:
        main(argv)
        code = 0
    except SystemExit as stop:  # as the interpreter would: None is 0, a message is printed and gives 1
        code = 0 if stop.code is None else stop.code
        if not isinstance(code, int):
            print(code, file=sys.stderr)
            code = 1
    except KeyboardInterrupt as stop:
        what = str(stop) or "interrupted"
        print(f"error: {what}: finished outputs are kept, partial ones removed; run again to go on", file=sys.stderr)
        code = 143 if what == "terminated" else 130
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)

