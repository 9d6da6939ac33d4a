"""Training data loading: seconds per epoch and the share of it the training loop waits for data.

On a generated cohort of clinical-size cases (default 8 cases of 512x512x120), one stage (default the solid group
at the paper's 160^3 grid) is trained through its bundle three ways, each from a fresh workflow:

- ``gzip``: from the original ``.nii.gz`` files, as ``configs/train.json`` alone does;
- ``cold``: ``flare-c2f train``'s decoded-once cache built first (its seconds are reported apart), then trained;
- ``warm``: the cache already there.

For each: setup seconds (building the in-memory dataset cache of the stage), then per epoch the training seconds
(first batch requested to last iteration done, validation excluded) and the share of them spent waiting for the
next batch (ignite's GET_BATCH_STARTED to GET_BATCH_COMPLETED). ``--channels paper`` is the paper-size network; the
default is a small one, so that data loading shows. ``--loader``: ``device`` (the bundles' default: each sample in
one resampling on the training device, ``sampling.DeviceTrainingLoader``) or ``monai`` (the MONAI transform chain in
``--num_workers`` worker processes, the path before it).

``--compare`` (one sitting, warm cache, same stage, grid and network): the CPU milliseconds (process time, one
torch thread) per training sample of the MONAI chain and of the device sampler, made in this process on ``--device``,
then one training run per loader; it ends with the line ``cpu ms per sample: before X, after Y``.

``--cascade_estimate``: every stage trained for ``--epochs`` on the cohort with the device sampler; from the measured
seconds per training sample of each stage, the training time of the whole cascade on a FLARE22-sized cohort (50
labelled cases, 10 of them validating: 40 training samples an epoch) for the configs' epochs (the paper's: 100 for
the coarse stage, 120 for the others). The four refiners share grid and network: one is measured, counted four
times. Validation passes are not in the estimate (measured: training epochs only).

    python benchmarks/train_loading.py --device cpu                      # small network, 2 epochs
    python benchmarks/train_loading.py --device cpu --compare
    python benchmarks/train_loading.py --device cuda --channels paper --batch_size 2 --num_workers 8
    python benchmarks/train_loading.py --device cuda --channels paper --batch_size 2 --cascade_estimate
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


OLD_LOADER = {"train#trainer#train_data_loader": "@train#dataloader"}  # the MONAI chain in worker processes


def stage_settings(data: Path, args, loader: str) -> dict:
    return {
        "dataset_dir": str(data), "num_val": 1, "max_epochs": args.epochs, "val_interval": args.epochs + 1,
        "batch_size": args.batch_size, "num_workers": args.num_workers, "spatial_size": [args.grid] * 3,
        "network_def#channels": args.channels, "device": f"$torch.device({args.device!r})",
        "train#dataset#progress": False, "validate#dataset#progress": False, "resume": False,
        "elastic_prob": args.elastic_prob, **(OLD_LOADER if loader == "monai" else {}),
    }


def stage_workflow(data: Path, root: Path, args, bundle: str, loader: str, stage: str | None = None):
    shutil.rmtree(root, ignore_errors=True)
    copy_bundle(bundle, root.parent)
    settings = stage_settings(data, args, loader)
    organ = None
    if bundle == STAGE_BUNDLES["refiner"]:
        organ = "gallbladder"
        settings["organ"] = organ
    return _stage_workflow(StagePlan(stage or args.stage, bundle, organ), root, settings, distributed=False)


def train_once(data: Path, root: Path, args, bundle: str, loader: str | None = None, stage: str | None = None) -> dict:
    workflow = stage_workflow(data, root, args, bundle, loader or args.loader, stage)
    workflow.parser["val_interval"] = args.epochs + 1  # no validation: training epochs only
    workflow.initialize()
    started = time.perf_counter()
    trainer = workflow.parser.get_parsed_content("train#trainer")  # builds (and fills) the dataset cache
    if hasattr(trainer.data_loader, "prepare"):  # the device sampler decodes its cases on first use: now
        trainer.data_loader.prepare()
    setup = time.perf_counter() - started
    waits = DataWait(trainer, args.device)
    if args.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    trainer.run()
    result = {"setup_seconds": round(setup, 2), "epochs": waits.epochs}
    if args.device.startswith("cuda"):
        result["peak_gpu_mb"] = round(torch.cuda.max_memory_allocated() / 2**20)
    return result


def cpu_ms_per_sample(data: Path, work: Path, args, bundle: str) -> dict:
    """Process CPU milliseconds per training sample, made in this process on ``args.device`` with one torch thread
    (as in a DataLoader worker; on a shared machine more threads mostly spin): the MONAI chain (its cached decoded
    cases, then crop, resize, deformation, intensity) against the device sampler, in alternating rounds so that both
    see the same machine."""
    workflow = stage_workflow(data, work / "bundles" / bundle, args, bundle, "device")
    workflow.initialize()
    parser = workflow.parser
    dataset = parser.get_parsed_content("train#dataset")  # today's: decoded cases cached, the random tail per item
    loader = parser.get_parsed_content("train#device_loader")
    loader.prepare()
    cuda = args.device.startswith("cuda")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    spent = {"before": [], "after": []}
    walls = {"before": [], "after": []}
    position = 0
    for _ in range(args.rounds):
        for name in ("before", "after"):
            for _ in range(args.samples):
                case = position % len(dataset)
                wall, cpu = time.perf_counter(), time.process_time()
                if name == "before":
                    item = dataset[case]
                    torch.as_tensor(item["image"]).to(args.device), torch.as_tensor(item["label"]).to(args.device)
                else:
                    loader.sample(case, loader.draw(1, position, case))
                if cuda:
                    torch.cuda.synchronize()
                spent[name].append(time.process_time() - cpu)
                walls[name].append(time.perf_counter() - wall)
                position += 1
    torch.set_num_threads(threads)
    return {
        name: {"cpu_ms": round(1000 * sum(spent[name]) / len(spent[name]), 1),
               "wall_ms": round(1000 * sum(walls[name]) / len(walls[name]), 1), "samples": len(spent[name])}
        for name in spent
    }


PAPER_EPOCHS = {"coarse": 100}  # the configs' (the paper's) max_epochs; every other stage 120
FLARE22_TRAINING_CASES = 40  # 50 labelled, 10 validating
ESTIMATE_STAGES = ("coarse", "solid", "digestive", "vessels", "locator", "refiner")


def cascade_estimate(data: Path, work: Path, args) -> dict:
    """Measured: the training seconds per sample of each stage (its epochs on this cohort, the device sampler);
    extrapolated: x 40 training samples an epoch x the stage's epochs (x 4 for the refiners)."""
    grids = {"coarse": 128, "locator": 128, "refiner": 64}
    stages = {}
    for stage in ESTIMATE_STAGES:
        bundle = STAGE_BUNDLES[stage]
        stage_args = argparse.Namespace(**{**vars(args), "grid": grids.get(stage, args.grid) if args.paper_grids
                                           else args.grid})
        result = train_once(data, work / "bundles" / bundle, stage_args, bundle, "device", stage)
        samples = args.cases - 1  # num_val 1
        per_sample = [e["seconds"] / samples for e in result["epochs"]]
        measured = min(per_sample[1:] or per_sample)  # the first epoch warms up (allocator, cudnn)
        epochs = PAPER_EPOCHS.get(stage, 120)
        copies = 4 if stage == "refiner" else 1
        stages[stage] = {
            "grid": stage_args.grid, "measured_seconds_per_sample": round(measured, 3),
            "data_wait_share": result["epochs"][-1]["data_wait_share"], "epochs": epochs, "copies": copies,
            "estimated_hours": round(measured * FLARE22_TRAINING_CASES * epochs * copies / 3600, 2),
        }
        if "peak_gpu_mb" in result:
            stages[stage]["peak_gpu_mb"] = result["peak_gpu_mb"]
        print(stage, json.dumps(stages[stage]), flush=True)
    total = sum(s["estimated_hours"] for s in stages.values())
    return {"stages": stages, "estimated_hours_total": round(total, 2)}


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
    parser.add_argument("--loader", default="device", choices=["device", "monai"])
    parser.add_argument("--compare", action="store_true", help="before/after, one sitting (see above)")
    parser.add_argument("--samples", type=int, default=4, help="--compare: samples per path and round")
    parser.add_argument("--rounds", type=int, default=2, help="--compare: alternating rounds")
    parser.add_argument("--cascade_estimate", action="store_true", help="the whole cascade's training time")
    parser.add_argument("--paper_grids", action="store_true",
                        help="--cascade_estimate: each stage at its config's grid (128 coarse/locator, 64 refiner)")
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
    if args.compare or args.cascade_estimate:
        cache = work / "cache"
        prepare_cache(data, cache, progress=False)  # warm: both paths read the decoded cases
        if args.cascade_estimate:
            report["cascade_estimate"] = cascade_estimate(cache, work, args)
            print(json.dumps(report, indent=2))
            print(f"whole cascade, {FLARE22_TRAINING_CASES} training cases, the configs' epochs: "
                  f"{report['cascade_estimate']['estimated_hours_total']} h on {report['device_name']} (extrapolated "
                  "from measured seconds per sample; validation not included)")
            if not args.compare:
                return
        report["per_sample"] = cpu_ms_per_sample(cache, work, args, bundle)
        print("per sample", json.dumps(report["per_sample"]), flush=True)
        for loader in ("monai", "device"):
            report[loader] = train_once(cache, work / "bundles" / bundle, args, bundle, loader)
            print(loader, json.dumps(report[loader]), flush=True)
        print(json.dumps(report, indent=2))
        before, after = report["per_sample"]["before"]["cpu_ms"], report["per_sample"]["after"]["cpu_ms"]
        print(f"cpu ms per sample: before {before:.0f}, after {after:.0f}")
        return
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
