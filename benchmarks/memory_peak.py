"""Peak RSS of the cascade on a very large CT (default 1024x1024x400 int16), with realistic and whole-volume boxes.

The CT is written once (``--case``, a plain int16 volume with body-like HU); the networks have random weights, so
the coarse stage and the locator run their networks but then hand on guides made here on a 128^3 grid: either
organs at realistic places and sizes (``--boxes realistic``) or organs in the volume's corners, so that every stage's
box is the whole volume (``--boxes whole``). Peak RSS is the process's, sampled every 0.1 s; with ``--cap_gb`` the
process stops itself when its RSS passes the cap (for older code whose whole-volume fusion needs more than the
machine can spare) and says so.

    python benchmarks/memory_peak.py --boxes realistic
    python benchmarks/memory_peak.py --boxes whole --cap_gb 12
    cd OLD_CHECKOUT && python NEW/benchmarks/memory_peak.py --boxes whole --cap_gb 12   # older code, same CT
"""

from __future__ import annotations

import argparse
import inspect
import os
import threading
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import psutil
import torch
from monai.data import MetaTensor

from flare_c2f_extensions.cascade.pipeline import Cascade
from flare_c2f_extensions.labels import GROUPS
from flare_c2f_extensions.paths import STAGE_BUNDLES
from flare_c2f_extensions.runs.resources import ResourceMonitor

GRID = 128


def write_ct(path: Path, shape) -> None:
    """A body-like int16 CT: air outside an elliptic body of soft tissue with some noise (quick to make)."""
    x, y = np.ogrid[: shape[0], : shape[1]]
    body = ((x - shape[0] / 2) / (0.45 * shape[0])) ** 2 + ((y - shape[1] / 2) / (0.35 * shape[1])) ** 2 < 1
    rng = np.random.default_rng(0)
    volume = np.empty(shape, dtype=np.int16)
    for z in range(shape[2]):
        volume[:, :, z] = np.where(body, 40, -1000) + rng.integers(-20, 20, size=shape[:2], dtype=np.int16)
    affine = np.diag([0.7, 0.7, 1.0, 1.0])
    nib.save(nib.Nifti1Image(volume, affine), str(path))


def guides(boxes: str):
    """Coarse labels and small-organ labels on a 128^3 grid spanning the CT."""
    coarse = np.zeros((GRID,) * 3, dtype=np.uint8)
    organs = [o for group in ("solid", "digestive", "vessels", "small") for o in GROUPS[group]]
    if boxes == "whole":  # each group's organs near opposite corners: every box is (about) the whole volume
        for index, group in enumerate(("solid", "digestive", "vessels", "small")):
            for k, organ in enumerate(GROUPS[group]):
                coarse[index, k, 0] = coarse[-1 - index, -1 - k, -1] = organ
    else:  # organs of a few cm at abdominal places (the grid's voxel is about 5.6 x 5.6 x 3.1 mm here)
        for index, organ in enumerate(organs):
            cx, cy, cz = 30 + (index * 7) % 70, 40 + (index * 11) % 50, 30 + (index * 5) % 60
            half = 14 if organ in GROUPS["solid"] else 8 if organ not in GROUPS["small"] else 3
            coarse[cx - half : cx + half, cy - half : cy + half, cz - half : cz + half] = organ
    small = np.where(np.isin(coarse, GROUPS["small"]), coarse, 0).astype(np.uint8)
    return torch.from_numpy(coarse), torch.from_numpy(small)


def use_guides(cascade: Cascade, coarse: torch.Tensor, small: torch.Tensor) -> None:
    coarse_predict, locate = cascade.coarse.predict, cascade._locate
    one_hot = torch.nn.functional.one_hot(coarse.long(), 14).permute(3, 0, 1, 2)[None].float()

    def coarse_stage(x, amp):
        coarse_predict(x, amp)
        return torch.nn.functional.interpolate(one_hot, size=tuple(x.shape[1:]), mode="nearest")

    def locator(image, coarse_mask):
        locate(image, coarse_mask)
        scale = np.diag([s / GRID for s in image.shape[1:]] + [1.0])
        scale[:3, 3] = [(s / GRID - 1) / 2 for s in image.shape[1:]]  # half-pixel geometry of a whole-volume grid
        return MetaTensor(small[None], affine=torch.as_tensor(np.asarray(image.affine) @ scale))

    cascade.coarse.predict, cascade._locate = coarse_stage, locator


def stub_networks(cascade: Cascade) -> None:
    """Fixed random logits instead of every network (``--stub``): the volumes' memory alone, quickly."""
    for stage in [cascade.coarse, *cascade.groups, cascade.locator, *cascade.refiners]:
        if stage is not None:
            logits = torch.randn((1, len(stage.labels) + 1, *stage.spatial_size))
            stage.network = stage.engine = (lambda x, logits=logits: logits)


def cap_rss(cap_gb: float) -> None:
    """Stop this process (exit 3) when its RSS passes ``cap_gb``: a guard for the machine, checked every 0.05 s."""
    process = psutil.Process()

    def watch():
        while True:
            rss = process.memory_info().rss / 2**30
            if rss > cap_gb:
                print(f"peak RSS over the cap: {rss:.1f} GB > {cap_gb} GB, stopped", flush=True)
                os._exit(3)
            time.sleep(0.05)

    threading.Thread(target=watch, daemon=True).start()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="1024,1024,400")
    parser.add_argument("--case", default="/tmp/flare_c2f_memory_ct")
    parser.add_argument("--boxes", default="realistic", choices=["realistic", "whole"])
    parser.add_argument("--channels", default=None, help="network widths (default: the paper's), e.g. 4,8,8,8,8")
    parser.add_argument("--engine", default=None, help="torch, openvino or auto (newer code only)")
    parser.add_argument("--stub", action="store_true", help="fixed random logits instead of the networks")
    parser.add_argument("--cap_gb", type=float, default=None, help="stop when RSS passes this many GB")
    args = parser.parse_args()
    shape = tuple(int(s) for s in args.shape.split(","))
    path = Path(args.case) / f"ct_{'x'.join(map(str, shape))}_0000.nii.gz"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        write_ct(path, shape)
    options = {"engine": args.engine} if args.engine else {}
    if "max_voxels" in inspect.signature(Cascade.from_bundles).parameters:
        options["max_voxels"] = None
    if args.channels:
        widths = [int(c) for c in args.channels.split(",")]
        options["stage_overrides"] = {name: {"network_def": {"channels": widths}} for name in STAGE_BUNDLES}
    cascade = Cascade.from_bundles(device="cpu", require_weights=False, **options)
    if args.stub:
        stub_networks(cascade)
    use_guides(cascade, *guides(args.boxes))
    if args.cap_gb:
        cap_rss(args.cap_gb)
    with ResourceMonitor("cpu") as monitor:
        result = cascade.segment(path)
    usage = monitor.usage
    print(f"CT {shape} int16, boxes {args.boxes}, engine {getattr(cascade, 'engine', 'torch')}, networks "
          f"{'stubbed' if args.stub else args.channels or 'paper size'}: peak RSS {usage.peak_rss_mb / 1024:.2f} GB, "
          f"{usage.seconds:.0f} s, "
          f"labels {np.unique(result.labels).tolist()}, skipped {result.skipped}")


if __name__ == "__main__":
    main()
