"""Time training steps of the paper-size network: forward, Dice + CE loss, backward and an AdamW step.

Prints seconds per iteration and peak GPU memory (CUDA) for one grid and batch size, with mixed precision as the
train configs use it. Random inputs: the speed of a step does not depend on the data.

    python benchmarks/train_step.py --grid 128 --batch 8 --classes 14        # the coarse stage
    python benchmarks/train_step.py --grid 160 --batch 8 --classes 5         # a big-organ group
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from monai.losses import DiceCELoss

from flare_c2f_extensions.cascade.networks import ResUNetASPP


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--grid", type=int, default=128)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--classes", type=int, default=14)
    parser.add_argument("--iterations", type=int, default=10, help="timed, after 3 warm-up steps")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--amp", default="true", choices=["true", "false"])
    args = parser.parse_args()
    device = torch.device(args.device)
    network = ResUNetASPP(out_channels=args.classes).to(device)
    optimizer = torch.optim.AdamW(network.parameters(), lr=1e-4, weight_decay=1e-4)
    loss_function = DiceCELoss(to_onehot_y=True, softmax=True)
    dtype = torch.float16 if device.type == "cuda" else torch.bfloat16
    scaler = torch.amp.GradScaler(device.type, enabled=args.amp == "true" and device.type == "cuda")
    x = torch.rand(args.batch, 1, *(args.grid,) * 3, device=device)
    y = torch.randint(0, args.classes, (args.batch, 1, *(args.grid,) * 3), device=device)

    def step():
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=dtype, enabled=args.amp == "true"):
            loss = loss_function(network(x), y)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()

    for _ in range(3):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(args.iterations):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = (time.perf_counter() - start) / args.iterations
    report = {"device": str(device), "grid": args.grid, "batch": args.batch, "classes": args.classes,
              "amp": args.amp, "seconds_per_iteration": round(seconds, 4)}
    if device.type == "cuda":
        report["gpu"] = torch.cuda.get_device_name(device)
        report["peak_gpu_mb"] = round(torch.cuda.max_memory_allocated(device) / 2**20)
    print(json.dumps(report))


if __name__ == "__main__":
    main()
