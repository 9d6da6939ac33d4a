"""Time the whole cascade at the paper's network size on a generated clinical-size CT.

Speed does not depend on the weights, so random (He-normal) weights give honest timings, with one exception:
the boxes. A random coarse network labels noise all over the volume, so every box would be the whole volume;
with ``--guides truth`` (the default) the coarse stage and the locator still run their networks (timed) but
then hand on the phantom's ground truth as their mask, so every box has the size a trained cascade gives it.
Prints seconds per stage, the total, peak RSS and, on CUDA, peak GPU memory.

    python benchmarks/cascade_speed.py                      # 512x512x300, 0.8x0.8x1.5 mm, best device
    python benchmarks/cascade_speed.py --device cpu --amp true --repeats 2
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from monai.data import MetaTensor

from flare_c2f_extensions.cascade import Cascade
from flare_c2f_extensions.efficiency import ResourceMonitor
from flare_c2f_extensions.labels import GROUPS
from flare_c2f_extensions.phantom import make_case
from flare_c2f_extensions.transforms import resize_spatial


def use_truth_as_guides(cascade: Cascade, case) -> None:
    """The coarse stage and the locator run (and are timed) as usual, then pass on the ground truth instead."""
    ornt = nib.orientations.io_orientation(case.affine)
    truth = torch.from_numpy(np.ascontiguousarray(nib.orientations.apply_orientation(case.label, ornt)))
    truth = truth.to(cascade.device)
    coarse_predict, locate = cascade.coarse.predict, cascade._locate

    def coarse(x, amp):
        probs = coarse_predict(x, amp)
        on_grid = resize_spatial(truth[None], probs.shape[2:], "nearest")[0].long()
        return torch.nn.functional.one_hot(on_grid, probs.shape[1]).permute(3, 0, 1, 2)[None].float()

    def locator(image, coarse_mask):
        locate(image, coarse_mask)
        small = torch.where(torch.isin(truth, torch.tensor(GROUPS["small"], device=truth.device)), truth, 0)
        return MetaTensor(small[None].to(torch.uint8), affine=image.affine)

    cascade.coarse.predict, cascade._locate = coarse, locator


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="512,512,300")
    parser.add_argument("--spacing", default="0.8,0.8,1.5")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--amp", default="auto", choices=["auto", "true", "false"])
    parser.add_argument("--repeats", type=int, default=2, help="cases timed after one warm-up")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--guides", default="truth", choices=["truth", "network"], help="see the docstring")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    shape = tuple(int(s) for s in args.shape.split(","))
    spacing = tuple(float(s) for s in args.spacing.split(","))
    amp = None if args.amp == "auto" else args.amp == "true"
    with tempfile.TemporaryDirectory() as tmp:
        case = make_case(0, shape=shape, spacing=spacing, orientation="LPS")
        path = Path(tmp) / "bench_0000.nii.gz"
        nib.save(nib.Nifti1Image(case.image, case.affine), str(path))
        cascade = Cascade.from_bundles(device=args.device, amp=amp, require_weights=False)
        if args.guides == "truth":
            use_truth_as_guides(cascade, case)
        cascade.segment(path)  # warm-up: allocator, kernels, cudnn autotuning
        runs = []
        for _ in range(args.repeats):
            with ResourceMonitor(args.device) as monitor:
                result = cascade.segment(path)
            runs.append({"usage": monitor.usage.as_dict(), "stage_seconds": result.seconds})
    best = min(runs, key=lambda r: r["usage"]["seconds"])
    print(f"device {args.device}, amp {cascade.amp}, threads {torch.get_num_threads()}, guides {args.guides}, "
          f"CT {shape} at {spacing} mm")
    for stage, seconds in best["stage_seconds"].items():
        print(f"  {stage:<14}{seconds:8.2f} s")
    usage = best["usage"]
    print(f"  {'total':<14}{usage['seconds']:8.2f} s   (runs: {', '.join(str(r['usage']['seconds']) for r in runs)})")
    print(f"  peak RSS {usage['peak_rss_mb']:.0f} MB, peak GPU {usage['peak_gpu_mb']:.0f} MB, "
          f"GPU area {usage['gpu_mb_seconds']:.0f} MB*s, CPU area {usage['cpu_percent_seconds']:.0f} %*s")
    print(json.dumps(best))


if __name__ == "__main__":
    main()
