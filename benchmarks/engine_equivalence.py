"""OpenVINO against torch on trained weights: voxel agreement of the label maps and FLARE22 mean DSC per engine.

Takes a quickstart's output folder (``python -m flare_c2f_extensions quickstart --out DIR``: its trained stage
bundles, grids and network size) and one or more FLARE-layout folders with ``imagesTs``/``labelsTs`` (the quickstart's
held-out cases, or ``python -m flare_c2f_extensions sample_ct --out DIR`` for the real CT). Both cascades are built
with the default precision (bf16 on CPUs that have it); prints per case the share of voxels whose labels agree, the
mean DSC over the 13 organs under each engine and each engine's seconds for the case.

    python benchmarks/engine_equivalence.py --quickstart /tmp/qs --data /tmp/qs/data /tmp/sample
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import nibabel as nib
import numpy as np

from flare_c2f_extensions.cascade.pipeline import Cascade
from flare_c2f_extensions.cli.quickstart import QUICK_NETWORK, QUICK_STAGES
from flare_c2f_extensions.evaluation.metrics import organ_scores


def stage_overrides(quickstart: Path, channels) -> dict:
    network = {"network_def#channels": channels} if channels else QUICK_NETWORK
    return {
        name: {"bundle_root": str(quickstart / "bundles" / bundle), "spatial_size": settings["spatial_size"], **network}
        for name, (bundle, settings) in QUICK_STAGES.items()
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quickstart", required=True)
    parser.add_argument("--data", nargs="+", required=True)
    parser.add_argument("--amp", default="auto", choices=["auto", "true", "false"], help="false: f32 on both engines")
    parser.add_argument("--small_organs", default=None, help="organs with a refiner, e.g. gallbladder (default all)")
    parser.add_argument("--channels", default=None, help="network widths if not the quickstart's, e.g. 8,16,32,32,64")
    args = parser.parse_args()
    channels = [int(c) for c in args.channels.split(",")] if args.channels else None
    overrides = stage_overrides(Path(args.quickstart), channels)
    organs = args.small_organs.split(",") if args.small_organs else None
    amp = None if args.amp == "auto" else args.amp == "true"
    options = {"device": "cpu", "stage_overrides": overrides, "small_organs": organs, "amp": amp}
    cascades = {engine: Cascade.from_bundles(engine=engine, **options) for engine in ("torch", "openvino")}
    rows = []
    for folder in map(Path, args.data):
        for image in sorted((folder / "imagesTs").glob("*_0000.nii.gz")):
            label = folder / "labelsTs" / image.name.replace("_0000.nii.gz", ".nii.gz")
            truth = nib.load(str(label))
            maps, seconds = {}, {}
            for engine, cascade in cascades.items():
                cascade.segment(image)  # warm
                started = time.perf_counter()
                maps[engine] = cascade.segment(image).labels
                seconds[engine] = time.perf_counter() - started
            spacing = truth.header.get_zooms()[:3]
            gt = np.asarray(truth.dataobj)
            dsc = {e: float(np.mean([s[0] for s in organ_scores(m, gt, spacing).values()])) for e, m in maps.items()}
            agree = float(np.mean(maps["torch"] == maps["openvino"]))
            rows.append((folder, agree, dsc["torch"], dsc["openvino"]))
            print(f"{image.name:<32} agree {agree:.6f}  mean DSC torch {dsc['torch']:.4f} openvino "
                  f"{dsc['openvino']:.4f} (diff {dsc['openvino'] - dsc['torch']:+.4f})  seconds torch "
                  f"{seconds['torch']:.2f} openvino {seconds['openvino']:.2f}", flush=True)
    for folder in map(Path, args.data):  # FLARE22's mean DSC: over the folder's cases and the 13 organs
        own = [r for r in rows if r[0] == folder]
        torch_dsc, openvino_dsc = np.mean([r[2] for r in own]), np.mean([r[3] for r in own])
        print(f"{folder}: {len(own)} cases, lowest agreement {min(r[1] for r in own):.6f}, mean DSC torch "
              f"{torch_dsc:.4f} openvino {openvino_dsc:.4f} (diff {openvino_dsc - torch_dsc:+.4f}), largest "
              f"per-case difference {max(abs(r[3] - r[2]) for r in own):.4f}")


if __name__ == "__main__":
    main()
