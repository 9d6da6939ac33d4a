"""Start-up against per-case time for ``flare-c2f segment``: one case in a fresh process against the same case in a
warm process, with the fresh process split into imports, configs, network building, weight loading, engine
compilation and the first case.

Two measurements in one sitting:

* ``phases``: the command run in this process through ``__main__.main``, with timers around each phase;
* ``pairs``: ``python -m flare_c2f_extensions segment -i CASE -o OUT --bundles_dir WEIGHTS --engine E`` in a fresh
  subprocess, timed from its start to its exit (the user's wait: interpreter start to the label map written), then
  the same case in this process, now warm, through the command's own per-case code; ``--pairs`` times, in turn,
  so that each ratio compares runs taken moments apart on a shared machine. Wall and CPU seconds of both.

The ratio asked by issue 12 point 4 is the fresh process / the warm case (median over the pairs). Paper-size
stages get random weights, saved once as checkpoints in ``--weights`` (``<bundle>/models/``, a ``--bundles_dir``
for the command), so that weight loading and the OpenVINO cache (keyed by the checkpoint's sha256) work as with
trained weights. The first run of an OpenVINO cascade converts every stage and fills the cache; later runs read it.
``--first_calls`` times each stage's network pass twice in a fresh process (the first call's one-off set-up).

``--separate``: no phases, and the warm case is measured in a child process too, as the second of two copies of the
case in one ``segment`` run (its ``seconds`` in the run report; read ahead during the first copy, as in any batch).
This process then holds no cascade while the fresh process runs: on this project's machine a fresh process started
beside a warm benchmark process holding 4 to 5 GB ran 10 to 25% slower than the same command started alone.

    python benchmarks/startup.py --engine openvino        # run it twice: the second run is the usual one
    python benchmarks/startup.py --engine torch
"""

from __future__ import annotations

import time

STARTED = time.perf_counter()

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import resource  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def write_checkpoints(folder: Path) -> None:
    """Random paper-size checkpoints for every stage under ``folder/<bundle>/models/`` (written once)."""
    import torch

    from flare_c2f_extensions.cascade.configs import read_stage_config
    from flare_c2f_extensions.labels import GROUPS, ORGANS
    from flare_c2f_extensions.paths import BUNDLES_DIR, STAGE_BUNDLES

    count = 0
    for name, bundle in STAGE_BUNDLES.items():
        organs = [ORGANS[o] for o in GROUPS["small"]] if name == "refiner" else [None]
        for organ in organs:
            extra = {"organ": organ} if organ else {}
            parser = read_stage_config(BUNDLES_DIR / bundle, {"bundle_root": str(folder / bundle), **extra})
            checkpoint = Path(parser.get_parsed_content("ckpt_path"))
            if not checkpoint.is_file():
                checkpoint.parent.mkdir(parents=True, exist_ok=True)
                torch.manual_seed(count)
                torch.save(parser.get_parsed_content("network_def").state_dict(), checkpoint)
            count += 1


def command(args, output: str) -> list[str]:
    extra = ["--amp", args.amp] if args.amp else []
    extra += ["--calibration", args.calibration] if args.calibration else []
    return [
        "segment", "-i", args.case, "-o", output, "--bundles_dir", args.weights, "--engine", args.engine,
        "--overwrite", "true", *extra,
    ]


def run_cli(args) -> tuple[float, float]:
    """Wall and CPU seconds (user + system, all threads) of ``flare-c2f segment`` on the case in a fresh process,
    from its start to its exit."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    cpu = _children_cpu()
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "flare_c2f_extensions", *command(args, args.out + "/cli.nii.gz")],
                   check=True, env=env, stdout=subprocess.DEVNULL)
    return time.perf_counter() - started, _children_cpu() - cpu


def warm_in_child(args) -> tuple[float, float, dict]:
    """Wall and CPU seconds of the case when it is the second of two copies in one ``segment`` run, and its stages."""
    folder = Path(args.out) / "warm_in"
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("first_0000.nii.gz", "second_0000.nii.gz"):
        copy = folder / name
        if not copy.exists():
            try:
                os.link(args.case, copy)
            except OSError:
                import shutil

                shutil.copyfile(args.case, copy)
    out = Path(args.out) / "warm_out"
    command_line = command(args, str(out))
    command_line[command_line.index("-i") + 1] = str(folder)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    subprocess.run([sys.executable, "-m", "flare_c2f_extensions", *command_line], check=True, env=env,
                   stdout=subprocess.DEVNULL)
    second = json.loads((out / "segment_report.json").read_text())["cases"][1]
    assert second["case"] == "second" and second["status"] == "done", second
    return second["seconds"], second["cpu_percent_seconds"] / 100, second.get("stage_seconds")


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def timed(module, name: str, totals: dict, key: str):
    """Wrap ``module.name`` so that its calls add their wall and CPU time to ``totals[key]`` and
    ``totals[key + " cpu"]`` (outermost calls only)."""
    original = getattr(module, name)
    depth = [0]

    def wrapper(*args, **kwargs):
        depth[0] += 1
        cpu, started = time.process_time(), time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            depth[0] -= 1
            if depth[0] == 0:
                totals[key] = totals.get(key, 0.0) + time.perf_counter() - started
                totals[key + " cpu"] = totals.get(key + " cpu", 0.0) + time.process_time() - cpu

    setattr(module, name, wrapper)
    return original


def run_phases(args, imports: tuple[float, float]):
    """The command in this process with each phase timed; returns the figures and a function that runs the case
    again in this (now warm) process."""
    from flare_c2f_extensions.__main__ import main as cli_main
    from flare_c2f_extensions.cascade import configs, stages
    from flare_c2f_extensions.runs import segment as segmenter

    totals: dict = {}
    timed(configs, "read_stage_config", totals, "configs")  # as segmenter's checks import it
    timed(stages, "read_stage_config", totals, "configs")
    timed(stages, "load_weights", totals, "weights")
    timed(stages, "openvino_cache_key", totals, "hashing")
    timed(stages, "openvino_engine", totals, "engine")
    if args.engine != "torch":
        import openvino

        timed(openvino.Core, "compile_model", totals, "compile")  # on a background thread for cached models
    segmenter_class = timed(segmenter, "Segmenter", totals, "loading")
    from flare_c2f_extensions.runs import batch

    run_cases = timed(batch.BatchRunner, "run", totals, "first case")
    built = {}
    original_init = segmenter_class.__init__

    def keep(self, *a, **k):
        original_init(self, *a, **k)
        built["segmenter"] = self

    segmenter_class.__init__ = keep
    started = time.perf_counter()
    cli_main(command(args, args.out + "/phases.nii.gz"))
    totals["in-process whole"] = time.perf_counter() - started + imports[0]
    segmenter_class.__init__ = original_init
    totals["engine used"] = built["segmenter"].cascade.engine
    first_report = json.loads((Path(args.out) / "phases_report.json").read_text())
    totals["first stages"] = first_report["cases"][0].get("stage_seconds")
    return totals, lambda: warm_case(built["segmenter"], run_cases, args)


def warm_case(loaded, run_cases, args) -> tuple[float, float, dict]:
    """Wall and CPU seconds of the case in this warm process, through the command's per-case code, and its stages."""
    from flare_c2f_extensions.runs.batch import BatchRunner, Case
    from flare_c2f_extensions.runs.segment import SegmentWork

    case = Case(args.case, "warm", Path(args.out) / "warm.nii.gz")
    what = dict(per_organ=False, dicom_seg=False, statistics=False, preview=False)  # the command's defaults
    runner = BatchRunner(SegmentWork(loaded, what), [case], loaded.cascade.device, overwrite=True, progress=None)
    cpu, started = time.process_time(), time.perf_counter()
    cases = run_cases(runner)["cases"]
    if cases[0]["status"] != "done":
        raise RuntimeError(f"the warm case did not run: {cases[0]}")
    return time.perf_counter() - started, time.process_time() - cpu, cases[0].get("stage_seconds")


def first_calls(args) -> None:
    """Each stage's network run twice on the same input in a fresh process: the first call's one-off set-up."""
    import torch

    from flare_c2f_extensions.runs.segment import Segmenter

    cpu, started = time.process_time(), time.perf_counter()
    cascade = Segmenter(bundles_dir=args.weights, engine=args.engine).cascade
    print(f"engine {cascade.engine}: loading {time.perf_counter() - started:.2f} s wall, "
          f"{time.process_time() - cpu:.2f} s CPU; network pass, first / second call, wall (CPU) s")
    for stage in [cascade.coarse, *cascade.groups, cascade.locator, *cascade.refiners]:
        x = torch.rand((1, *stage.spatial_size), generator=torch.Generator().manual_seed(0))
        seconds = []
        for _ in range(2):
            cpu, started = time.process_time(), time.perf_counter()
            with torch.inference_mode():
                stage.predict(x, cascade.amp)
            seconds.append(f"{time.perf_counter() - started:6.2f} ({time.process_time() - cpu:6.2f})")
        print(f"  {stage.name:10s} {stage.spatial_size}  {seconds[0]}  {seconds[1]}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--engine", default="auto")
    parser.add_argument("--amp", default=None, help="true or false (default: the command's, by device)")
    parser.add_argument("--calibration", default=None, help="CTs that calibrate --engine openvino-int8")
    parser.add_argument("--case", default="/tmp/speed_bench/bench_0000.nii.gz", help="a CT (cascade_speed.py --case)")
    parser.add_argument("--weights", default="/tmp/flare_c2f_startup_weights")
    parser.add_argument("--out", default="/tmp/flare_c2f_startup_out")
    parser.add_argument("--pairs", type=int, default=2, help="fresh-process runs, each followed by a warm case")
    parser.add_argument("--phases_only", action="store_true", help="no fresh-process runs: warm cases only")
    parser.add_argument("--first_calls", action="store_true", help="only time each stage's first and second pass")
    parser.add_argument("--separate", action="store_true", help="warm cases in child processes too (see above)")
    args = parser.parse_args()
    Path(args.out).mkdir(parents=True, exist_ok=True)

    import flare_c2f_extensions.__main__  # noqa: F401  (what the command imports first)
    from flare_c2f_extensions.runs import segment  # noqa: F401

    imports = time.perf_counter() - STARTED, time.process_time()
    print(f"imports {imports[0]:.2f} s wall, {imports[1]:.2f} s CPU")
    write_checkpoints(Path(args.weights))
    if args.first_calls:
        first_calls(args)
    elif args.separate:
        pairs = [(*run_cli(args), *warm_in_child(args)) for _ in range(args.pairs)]
        report({"engine used": args.engine}, imports, pairs, separate=True)
    else:
        totals, warm = run_phases(args, imports)
        pairs = []
        for _ in range(args.pairs):  # fresh process and warm case in turn: the ratio pair by pair
            cli = (float("nan"), float("nan")) if args.phases_only else run_cli(args)
            pairs.append((*cli, *warm()))
        report(totals, imports, pairs)
    sys.stdout.flush()
    os._exit(0)  # skip interpreter teardown: not part of the figures


def report(totals: dict, imports: tuple[float, float], pairs: list, separate: bool = False) -> None:
    import torch

    for kind in ("", " cpu"):
        others = sum(totals.get(k + kind, 0.0) for k in ("configs", "weights", "hashing", "engine"))
        totals["building" + kind] = totals.get("loading" + kind, 0.0) - others
    totals["imports"], totals["imports cpu"] = imports
    print(f"engine {totals['engine used']}, threads {torch.get_num_threads()}; wall s (CPU s, all threads)")
    phases = [("imports", "imports (package, torch, monai)"), ("configs", "configs parsed"),
              ("building", "network building (and the rest)"), ("weights", "weight loading"),
              ("hashing", "checkpoint hashing"), ("engine", "engine set-up (OpenVINO)"), ("first case", "first case")]
    for key, label in [] if separate else phases:
        print(f"  {label:33s} {totals.get(key, 0.0):7.2f} ({totals.get(key + ' cpu', 0.0):7.2f})")
    if not separate:
        print(f"  OpenVINO compile_model calls      {totals.get('compile', 0.0):7.2f}   (wall; cached models compile "
              f"on a background thread during the first case)")
        print(f"    first case stages {totals['first stages']}")
        print(f"  in-process whole                  {totals['in-process whole']:7.2f}   (to the first case written)")
    where = "the second of two copies in one segment run" if separate else "this process"
    print(f"  pairs: fresh process (segment command, start to exit) | warm case ({where}); wall and CPU s")
    for cli_wall, cli_cpu, warm_wall, warm_cpu, stages in pairs:
        print(f"    fresh {cli_wall:7.2f} wall {cli_cpu:7.2f} cpu | warm {warm_wall:7.2f} wall {warm_cpu:7.2f} cpu"
              f" | ratio {cli_wall / warm_wall:.2f} wall {cli_cpu / warm_cpu:.2f} cpu")
        print(f"      warm stages {stages}")
    if pairs:
        wall = statistics.median(p[0] / p[2] for p in pairs)
        cpu = statistics.median(p[1] / p[3] for p in pairs)
        print(f"  fresh process / warm case (median of {len(pairs)} pairs): {wall:.2f} wall, {cpu:.2f} CPU")
        peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
        print(f"  peak RSS of a fresh process (the largest of them): {peak:.0f} MB")
        if not separate:
            print(f"  in-process whole / median warm case: "
                  f"{totals['in-process whole'] / statistics.median(p[2] for p in pairs):.2f} wall")


if __name__ == "__main__":
    main()
