"""Start-up against per-case time for ``flare-c2f segment``: one case in a fresh process against the same case in a
warm process, with the fresh process split into imports, configs, network building, weight loading, engine
compilation and the first case.

Two measurements in one sitting:

* ``cli``: ``python -m flare_c2f_extensions segment -i CASE -o OUT --bundles_dir WEIGHTS --engine E`` in a fresh
  subprocess, timed from its start to its exit (the user's wait: interpreter start to the label map written);
* ``phases``: the same command run in this process through ``__main__.main`` with timers around each phase, then
  the same case again (``--warm`` times) through the command's own per-case code with everything loaded.

The ratio asked by issue 12 point 4 is ``cli`` whole process / warm case. Paper-size stages get random weights,
saved once as checkpoints in ``--weights`` (``<bundle>/models/``, a ``--bundles_dir`` for the command), so that
weight loading and the OpenVINO cache (keyed by the checkpoint's sha256) work as with trained weights. The first run
of an OpenVINO cascade converts every stage and fills the cache; later runs read it.

    python benchmarks/startup.py --engine openvino        # run it twice: the second run is the usual one
    python benchmarks/startup.py --engine torch
"""

from __future__ import annotations

import time

STARTED = time.perf_counter()

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def write_checkpoints(folder: Path) -> None:
    """Random paper-size checkpoints for every stage under ``folder/<bundle>/models/`` (written once)."""
    import torch

    from flare_c2f_extensions.configs import read_stage_config
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
    return [
        "segment", "-i", args.case, "-o", output, "--bundles_dir", args.weights, "--engine", args.engine,
        "--overwrite", "true",
    ]


def run_cli(args) -> float:
    """Wall seconds of ``flare-c2f segment`` on the case in a fresh process (start to exit)."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "flare_c2f_extensions", *command(args, args.out + "/cli.nii.gz")],
                   check=True, env=env, stdout=subprocess.DEVNULL)
    return time.perf_counter() - started


def timed(module, name: str, totals: dict, key: str):
    """Wrap ``module.name`` so that its calls add their wall time to ``totals[key]`` (outermost call only)."""
    original = getattr(module, name)
    depth = [0]

    def wrapper(*args, **kwargs):
        depth[0] += 1
        started = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            depth[0] -= 1
            if depth[0] == 0:
                totals[key] = totals.get(key, 0.0) + time.perf_counter() - started

    setattr(module, name, wrapper)
    return original


def run_phases(args, imports: float) -> dict:
    """The command in this process with each phase timed, then warm cases through its per-case code."""
    from flare_c2f_extensions import configs, segmenter, stages
    from flare_c2f_extensions.__main__ import main as cli_main

    totals: dict = {}
    timed(configs, "read_stage_config", totals, "configs")  # as segmenter's checks import it
    timed(stages, "read_stage_config", totals, "configs")
    timed(stages, "load_weights", totals, "weights")
    timed(stages, "openvino_cache_key", totals, "hashing")
    timed(stages, "openvino_engine", totals, "engine")
    segmenter_class = timed(segmenter, "Segmenter", totals, "loading")
    run_cases = timed(segmenter, "_run_cases", totals, "first case")
    built = {}
    original_init = segmenter_class.__init__

    def keep(self, *a, **k):
        original_init(self, *a, **k)
        built["segmenter"] = self

    segmenter_class.__init__ = keep
    started = time.perf_counter()
    cli_main(command(args, args.out + "/phases.nii.gz"))
    totals["in-process whole"] = time.perf_counter() - started + imports
    segmenter_class.__init__ = original_init
    loaded = built["segmenter"]
    warm, stage_seconds = [], []
    for _ in range(args.warm):
        collect = segmenter._CollectWarnings(echo=False)
        started = time.perf_counter()
        cases = run_cases(loaded, [(args.case, Path(args.out) / "warm.nii.gz")], True, False, collect, {})
        warm.append(time.perf_counter() - started)
        stage_seconds.append(cases[0].get("stage_seconds"))
    totals["warm"], totals["warm stages"], totals["engine used"] = warm, stage_seconds, loaded.cascade.engine
    first_report = json.loads((Path(args.out) / "phases_report.json").read_text())
    totals["first stages"] = first_report["cases"][0].get("stage_seconds")
    return totals


def first_calls(args) -> None:
    """Each stage's network run twice on the same input in a fresh process: the first call's one-off set-up."""
    import torch

    from flare_c2f_extensions.segmenter import Segmenter

    cascade = Segmenter(bundles_dir=args.weights, engine=args.engine).cascade
    stages = [cascade.coarse, *cascade.groups, cascade.locator, *cascade.refiners]
    print(f"engine {cascade.engine}: network pass, first / second call (s)")
    for stage in stages:
        x = torch.rand((1, *stage.spatial_size), generator=torch.Generator().manual_seed(0))
        seconds = []
        for _ in range(2):
            started = time.perf_counter()
            with torch.inference_mode():
                stage.predict(x, cascade.amp)
            seconds.append(time.perf_counter() - started)
        print(f"  {stage.name:10s} {stage.spatial_size}  {seconds[0]:6.2f}  {seconds[1]:6.2f}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--engine", default="auto")
    parser.add_argument("--case", default="/tmp/speed_bench/bench_0000.nii.gz", help="a CT (cascade_speed.py --case)")
    parser.add_argument("--weights", default="/tmp/flare_c2f_startup_weights")
    parser.add_argument("--out", default="/tmp/flare_c2f_startup_out")
    parser.add_argument("--warm", type=int, default=1, help="warm cases timed after the first")
    parser.add_argument("--phases_only", action="store_true", help="skip the fresh-process run of the command")
    parser.add_argument("--first_calls", action="store_true", help="only time each stage's first and second pass")
    args = parser.parse_args()
    Path(args.out).mkdir(parents=True, exist_ok=True)

    import flare_c2f_extensions.__main__  # noqa: F401  (what the command imports first)
    from flare_c2f_extensions import segmenter  # noqa: F401

    imports = time.perf_counter() - STARTED
    write_checkpoints(Path(args.weights))
    if args.first_calls:
        first_calls(args)
        sys.stdout.flush()
        os._exit(0)
    cli = None if args.phases_only else run_cli(args)
    report(run_phases(args, imports), imports, cli)
    sys.stdout.flush()
    os._exit(0)  # skip interpreter teardown: not part of the figures


def report(totals: dict, imports: float, cli: float | None) -> None:
    import torch

    loading = totals.get("loading", 0.0)
    building = loading - sum(totals.get(k, 0.0) for k in ("configs", "weights", "hashing", "engine"))
    print(f"engine {totals['engine used']}, threads {torch.get_num_threads()}")
    print(f"  imports (package, torch, monai)  {imports:7.2f} s")
    print(f"  configs parsed                   {totals.get('configs', 0.0):7.2f} s")
    print(f"  network building (and the rest)  {building:7.2f} s")
    print(f"  weight loading                   {totals.get('weights', 0.0):7.2f} s")
    print(f"  checkpoint hashing               {totals.get('hashing', 0.0):7.2f} s")
    print(f"  engine compilation               {totals.get('engine', 0.0):7.2f} s   (OpenVINO: cached IR compiled)")
    print(f"  first case                       {totals.get('first case', 0.0):7.2f} s   {totals['first stages']}")
    print(f"  in-process whole                 {totals['in-process whole']:7.2f} s")
    best = min(totals["warm"]) if totals["warm"] else float("nan")
    print(f"  warm case (best of {len(totals['warm'])})            {best:7.2f} s   {totals['warm stages']}")
    if cli is not None:
        print(f"  fresh process (segment command)  {cli:7.2f} s   (process start to exit)")
        print(f"  fresh process / warm case: {cli / best:.2f}")
    print(f"  in-process whole / warm case: {totals['in-process whole'] / best:.2f}")


if __name__ == "__main__":
    main()
