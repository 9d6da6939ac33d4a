"""Training data loading: seconds per epoch and the share of it the training loop waits for data.

On a generated cohort of clinical-size cases (default 8 cases of 512x512x120), one stage (default the solid group
at the paper's 160^3 grid) is trained through its bundle three ways, each from a fresh workflow:

- ``gzip``: from the original ``.nii.gz`` files, as ``configs/train.json`` alone does;
- ``cold``: ``flare-c2f train``'s decoded-once cache built first (its seconds are reported apart), then trained;
- ``warm``: the cache already there.

For each: setup seconds (building the in-memory dataset cache of the stage), then per epoch the training seconds
(first batch requested to last iteration done, validation excluded) and the share of them spent waiting for the
next batch (ignite's GET_BATCH_STARTED to GET_BATCH_COMPLETED). Augmentations run in ``--num_workers`` worker
processes. ``--channels paper`` is the paper-size network; the default is a small one, so that data loading shows.

    python benchmarks/train_loading.py --device cpu                      # small network, 2 epochs
    python benchmarks/train_loading.py --device cuda --channels paper --batch_size 2 --num_workers 8
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import torch

from flare_c2f_extensions.cascade.networks import PAPER_CHANNELS
from flare_c2f_extensions.paths import STAGE_BUNDLES
from flare_c2f_extensions.synthetic.phantom import write_cohort
from flare_c2f_extensions.training.train import StagePlan, _stage_workflow, copy_bundle, prepare_cache


class DataWait:
    """Per epoch: training seconds and seconds waiting for batches."""

    def __init__(self, trainer, device: str):
        from ignite.engine import Events

        self.cuda = device.startswith("cuda")

        self.epochs: list[dict] = []
        trainer.add_event_handler(Events.EPOCH_STARTED, self.epoch_started)
        trainer.add_event_handler(Events.GET_BATCH_STARTED, self.batch_requested)
        trainer.add_event_handler(Events.GET_BATCH_COMPLETED, self.batch_ready)
        trainer.add_event_handler(Events.ITERATION_COMPLETED, self.iteration_done)
        trainer.add_event_handler(Events.EPOCH_COMPLETED, self.epoch_completed)

    def epoch_started(self, _):
        self.start = self.last = time.perf_counter()
        self.wait = 0.0

    def batch_requested(self, _):
        self.requested = time.perf_counter()

    def batch_ready(self, _):
        self.wait += time.perf_counter() - self.requested

    def iteration_done(self, trainer):
        if self.cuda:  # the iteration's GPU work is done
            torch.cuda.synchronize()
        self.last = time.perf_counter()

    def epoch_completed(self, _):
        seconds = self.last - self.start
        self.epochs.append({"seconds": round(seconds, 2), "data_wait_share": round(self.wait / max(seconds, 1e-9), 3)})


def train_once(data: Path, root: Path, args, bundle: str) -> dict:
    settings = {
        "dataset_dir": str(data), "num_val": 1, "max_epochs": args.epochs, "val_interval": args.epochs + 1,
        "batch_size": args.batch_size, "num_workers": args.num_workers, "spatial_size": [args.grid] * 3,
        "network_def#channels": args.channels, "device": f"$torch.device({args.device!r})",
        "train#dataset#progress": False, "validate#dataset#progress": False, "resume": False,
        "elastic_prob": args.elastic_prob,
    }
    shutil.rmtree(root, ignore_errors=True)
    copy_bundle(bundle, root.parent)
    workflow = _stage_workflow(StagePlan(args.stage, bundle), root, settings, distributed=False)
    workflow.parser["val_interval"] = args.epochs + 1  # no validation: training epochs only
    workflow.initialize()
    started = time.perf_counter()
    trainer = workflow.parser.get_parsed_content("train#trainer")  # builds (and fills) the dataset cache
    setup = time.perf_counter() - started
    waits = DataWait(trainer, args.device)
    if args.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    trainer.run()
    result = {"setup_seconds": round(setup, 2), "epochs": waits.epochs}
    if args.device.startswith("cuda"):
        result["peak_gpu_mb"] = round(torch.cuda.max_memory_allocated() / 2**20)
    return result


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", default="/tmp/flare_c2f_train_loading")
    parser.add_argument("--cases", type=int, default=8)
    parser.add_argument("--shape", type=int, nargs=3, default=[512, 512, 120])
    parser.add_argument("--stage", default="solid", choices=["coarse", "solid", "digestive", "vessels", "locator"])
    parser.add_argument("--grid", type=int, default=160)
    parser.add_argument("--channels", default="8,16,32,32,64", help="comma-separated widths, or 'paper'")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch_size", type=int, default=2)
    parser.add_argument("--num_workers", type=int, default=2)
    parser.add_argument("--elastic_prob", type=float, default=0.5, help="the configs' default: 0.5 (the paper's)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    args.channels = list(PAPER_CHANNELS) if args.channels == "paper" else [int(c) for c in args.channels.split(",")]
    work = Path(args.work)
    data = work / "data"
    if not (data / "labelsTr").is_dir() or len(list((data / "labelsTr").glob("*.nii.gz"))) < args.cases:
        started = time.perf_counter()
        write_cohort(data, n=args.cases, seed=0, shape=tuple(args.shape))
        print(f"generated {args.cases} cases of {args.shape} in {time.perf_counter() - started:.0f} s", flush=True)
    bundle = STAGE_BUNDLES[args.stage]
    report = {"config": {k: v for k, v in vars(args).items() if k != "work"}, "device_name": _device_name(args.device)}
    report["gzip"] = train_once(data, work / "bundles" / bundle, args, bundle)
    print("gzip", json.dumps(report["gzip"]), flush=True)
    cache = work / "cache"
    shutil.rmtree(cache, ignore_errors=True)
    started = time.perf_counter()
    prepare_cache(data, cache, progress=False)
    report["cache_build_seconds"] = round(time.perf_counter() - started, 2)
    report["cold"] = train_once(cache, work / "bundles" / bundle, args, bundle)
    print("cold", json.dumps(report["cold"]), f"(+ cache build {report['cache_build_seconds']} s)", flush=True)
    report["warm"] = train_once(cache, work / "bundles" / bundle, args, bundle)
    print("warm", json.dumps(report["warm"]), flush=True)
    print(json.dumps(report, indent=2))


def _device_name(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    return "cpu"


if __name__ == "__main__":
    main()
