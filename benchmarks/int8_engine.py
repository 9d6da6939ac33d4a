"""The opt-in INT8 engine against OpenVINO f32 and bf16, in one sitting: voxel agreement with f32 and FLARE22 mean
DSC on held-out generated cases, and per-case seconds.

Trained weights: a quickstart's (``--quickstart DIR``, every stage; calibrated on its ``data/imagesTr``), else the
big-organ stages trained here briefly (``small_weights.py``). Held-out cases: ``--held_out N`` generated with the
quickstart's generator (its own two held-out cases first). ``--paper``: timing only, paper-size random weights at
the bundles' grids, calibrated on two generated CTs.

    python benchmarks/int8_engine.py --quickstart /tmp/qs --held_out 6
    python benchmarks/int8_engine.py --paper --shape 256,256,160 --organs liver --held_out 2

The first INT8 build quantises every stage (its seconds are printed); the cases are timed warm, the engines
alternating case by case.
"""

from __future__ import annotations

import argparse
import logging
import os
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import small_weights
import torch

from flare_c2f_extensions.cascade.pipeline import Cascade
from flare_c2f_extensions.cascade.stages import default_amp
from flare_c2f_extensions.evaluation.metrics import organ_scores
from flare_c2f_extensions.paths import BUNDLES_DIR
from flare_c2f_extensions.synthetic.phantom import write_cohort


def build(engine, amp, overrides, small_organs, calibration=None, require_weights=True, organs=None):
    started = time.perf_counter()
    torch.manual_seed(0)
    cascade = Cascade.from_bundles(BUNDLES_DIR, device="cpu", amp=amp, engine=engine, stage_overrides=overrides,
                                   small_organs=small_organs, calibration=calibration, organs=organs,
                                   require_weights=require_weights)
    return cascade, time.perf_counter() - started


class Timed:
    """A stage's engine, its seconds summed (the networks alone, without the resampling around them)."""

    def __init__(self, engine, clock: list):
        self.engine, self.clock, self.name = engine, clock, engine.name

    def __call__(self, x):
        started = time.perf_counter()
        try:
            return self.engine(x)
        finally:
            self.clock[0] += time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quickstart", default=None)
    parser.add_argument("--work", default=None, help="folder kept between runs (default: a temporary one)")
    parser.add_argument("--held_out", type=int, default=4, help="held-out cases to score")
    parser.add_argument("--shape", default="96,96,64")
    parser.add_argument("--paper", action="store_true", help="timing only: paper-size random weights")
    parser.add_argument("--repeats", type=int, default=1, help="timed passes over the cases")
    parser.add_argument("--organs", default=None, help="only the stages these organs need, e.g. liver")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("flare_c2f_extensions.cascade.int8").setLevel(logging.INFO)
    logging.getLogger("flare_c2f_extensions.cascade.stages").setLevel(logging.ERROR)  # random initialisation: meant
    print(f"{len(os.sched_getaffinity(0))} cores, {torch.get_num_threads()} threads; load average "
          f"{os.getloadavg()[0]:.1f}", flush=True)
    work = Path(args.work or tempfile.mkdtemp(prefix="int8_engine_"))
    os.environ.setdefault("FLARE_C2F_CACHE", str(work / "cache"))
    shape = tuple(int(s) for s in args.shape.split(","))
    quickstart = Path(args.quickstart) if args.quickstart else None
    organs = args.organs.split(",") if args.organs else None
    if args.paper:
        data = work / "paper"
        if not (data / "imagesTs").is_dir():
            write_cohort(data, n=2, n_test=args.held_out, seed=11, shape=shape)
        overrides = small_weights.random_overrides(work, paper=True, organs=organs)
        small_organs, require = None, False
    else:
        data = quickstart / "data" if quickstart else small_weights.cohort(work, 8, args.held_out, shape)
        overrides, small_organs = small_weights.trained_overrides(work, data, quickstart)
        require = True
    held_out = work / "held_out"  # the quickstart's generator: its own held-out cases first, then more
    if quickstart and not (held_out / "imagesTs").is_dir():
        write_cohort(held_out, n=0, n_test=args.held_out, seed=0, shape=shape)
    cases_dir = held_out if quickstart else data
    cases = sorted((cases_dir / "imagesTs").glob("*_0000.nii.gz"))[: args.held_out]
    variants = {"f32": ("openvino", False)}
    if default_amp(torch.device("cpu")):
        variants["bf16"] = ("openvino", True)
    variants["int8"] = ("openvino-int8", None)  # the unquantised layers in the default precision
    cascades = {}
    for name, (engine, amp) in variants.items():
        calibration = data / "imagesTr" if engine == "openvino-int8" else None
        cascades[name], seconds = build(engine, amp, overrides, small_organs, calibration, require, organs)
        print(f"{name}: built in {seconds:.1f} s", flush=True)
    clocks = {name: [0.0] for name in cascades}
    for name, cascade in cascades.items():
        cascade.segment(cases[0])  # warm: compiled models awaited, first-call set-up
        for stage in cascade.stages:
            stage.engine = Timed(stage.engine, clocks[name])
    maps, times = {name: {} for name in cascades}, {name: [] for name in cascades}
    networks = {name: [] for name in cascades}
    for _ in range(args.repeats):
        for case in cases:
            for name, cascade in cascades.items():  # alternating: the machine's load falls on every engine alike
                clocks[name][0] = 0.0
                started = time.perf_counter()
                maps[name][case.name] = cascade.segment(case).labels
                times[name].append(time.perf_counter() - started)
                networks[name].append(clocks[name][0])
    print(f"\nper case, warm ({len(cases)} cases x {args.repeats}; load average {os.getloadavg()[0]:.1f}):")
    for name, seconds in times.items():
        print(f"  {name:<5} median {np.median(seconds):.2f} s (networks {np.median(networks[name]):.2f} s), mean "
              f"{np.mean(seconds):.2f} s; runs {' '.join(f'{s:.2f}' for s in seconds)}; networks "
              f"{' '.join(f'{s:.2f}' for s in networks[name])}")
    if args.paper:
        return
    print("\n| case | int8 agreement with f32 | bf16 agreement with f32 | mean DSC f32 | bf16 | int8 |")
    print("|---|---|---|---|---|---|")
    dsc = {name: [] for name in cascades}
    for case in cases:
        label = cases_dir / "labelsTs" / case.name.replace("_0000.nii.gz", ".nii.gz")
        truth = nib.load(str(label))
        gt, spacing = np.asarray(truth.dataobj), truth.header.get_zooms()[:3]
        for name in cascades:
            scores = organ_scores(maps[name][case.name], gt, spacing)
            dsc[name].append(float(np.mean([s[0] for s in scores.values()])))
        agree = {name: float(np.mean(maps[name][case.name] == maps["f32"][case.name])) for name in cascades}
        print(f"| {case.name} | {agree['int8']:.5f} | {agree.get('bf16', float('nan')):.5f} | {dsc['f32'][-1]:.4f} | "
              f"{dsc.get('bf16', [float('nan')])[-1]:.4f} | {dsc['int8'][-1]:.4f} |")
    print(f"| mean | | | {np.mean(dsc['f32']):.4f} | {np.mean(dsc.get('bf16', [np.nan])):.4f} | "
          f"{np.mean(dsc['int8']):.4f} |")


if __name__ == "__main__":
    main()
