"""Time the whole cascade at the paper's network size on a generated clinical-size CT.

Speed does not depend on the weights, so random (He-normal) weights give honest timings. Prints seconds per
stage, the total, peak RSS and, on CUDA, peak GPU memory.

    python benchmarks/cascade_speed.py                      # 512x512x300, 0.8x0.8x1.5 mm, best device
    python benchmarks/cascade_speed.py --device cpu --amp true --repeats 2
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import nibabel as nib
import torch

from flare_c2f_extensions.cascade import Cascade
from flare_c2f_extensions.efficiency import ResourceMonitor
from flare_c2f_extensions.phantom import make_case


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="512,512,300")
    parser.add_argument("--spacing", default="0.8,0.8,1.5")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--amp", default="auto", choices=["auto", "true", "false"])
    parser.add_argument("--repeats", type=int, default=2, help="cases timed after one warm-up")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
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
        cascade.segment(path)  # warm-up: allocator, kernels, cudnn autotuning
        runs = []
        for _ in range(args.repeats):
            with ResourceMonitor(args.device) as monitor:
                result = cascade.segment(path)
            runs.append({"usage": monitor.usage.as_dict(), "stage_seconds": result.seconds})
    best = min(runs, key=lambda r: r["usage"]["seconds"])
    print(f"device {args.device}, amp {cascade.amp}, threads {torch.get_num_threads()}, CT {shape} at {spacing} mm")
    for stage, seconds in best["stage_seconds"].items():
        print(f"  {stage:<14}{seconds:8.2f} s")
    usage = best["usage"]
    print(f"  {'total':<14}{usage['seconds']:8.2f} s   (runs: {', '.join(str(r['usage']['seconds']) for r in runs)})")
    print(f"  peak RSS {usage['peak_rss_mb']:.0f} MB, peak GPU {usage['peak_gpu_mb']:.0f} MB, "
          f"GPU area {usage['gpu_mb_seconds']:.0f} MB*s, CPU area {usage['cpu_percent_seconds']:.0f} %*s")
    print(json.dumps(best))


if __name__ == "__main__":
    main()
