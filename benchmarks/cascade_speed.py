"""Time the whole cascade at the paper's network size on a generated clinical-size CT.

Speed does not depend on the weights, so random (He-normal) weights give honest timings of the networks, with two
exceptions. The boxes: a random coarse network labels noise all over the volume, so every box would be the whole
volume; with ``--guides truth`` (the default) the coarse stage and the locator still run their networks (timed) but
then hand on the phantom's ground truth as their mask, so every box has the size a trained cascade gives it. And the
work after the groups and refiners: random logits make every voxel a near-tie and every organ thousands of
fragments, which costs the fusion and the largest-component step more than trained outputs do; with ``--outputs
truth`` they too run (timed) and then hand on the truth's logits; with ``--stub`` as well, no network runs and only
that work around them is timed.
Prints seconds per stage split into the network's time and the time around it (crop and resize, resize back and
fusion, reading, largest components), the total, peak RSS and, on CUDA, peak GPU memory.

    python benchmarks/cascade_speed.py                      # 512x512x300, 0.8x0.8x1.5 mm, best device
    python benchmarks/cascade_speed.py --device cpu --amp true --repeats 2 --engine openvino
    python benchmarks/cascade_speed.py --case /tmp/bench   # keep the generated CT there and reuse it
    python benchmarks/cascade_speed.py --device cpu --outputs truth   # fusion and components as trained weights
    python benchmarks/cascade_speed.py --weights /tmp/w --engine openvino-int8 --calibration /tmp/bench

``--weights DIR`` saves the random paper-size weights there once as checkpoints (``startup.py`` does the same), so
that OpenVINO's converted and quantised models are cached between runs as with trained weights; without it every
run converts (and for INT8 quantises) the random networks again.

The script also runs against older checkouts of the package (``cd OLD && python NEW/benchmarks/cascade_speed.py``,
without ``--engine``), so today's and yesterday's code can be timed side by side.
"""

from __future__ import annotations

import argparse
import inspect
import json
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from monai.data import MetaTensor

from flare_c2f_extensions.cascade.pipeline import Cascade
from flare_c2f_extensions.labels import GROUPS
from flare_c2f_extensions.paths import STAGE_BUNDLES
from flare_c2f_extensions.runs.resources import ResourceMonitor
from flare_c2f_extensions.synthetic.phantom import make_case
from flare_c2f_extensions.transforms.resizing import crop_resize, resize_spatial, soft_labels


def use_truth_as_guides(cascade: Cascade, case) -> None:
    """The coarse stage and the locator run (and are timed) as usual, then pass on the ground truth instead."""
    truth = _ras_truth(cascade, case)
    coarse_predict, locate = cascade.coarse.predict, cascade._locate
    # made once here, so that the benchmark's own work does not count as the cascade's
    on_grid = resize_spatial(truth[None], cascade.coarse.spatial_size, "nearest")[0].long()
    coarse_truth = torch.nn.functional.one_hot(on_grid, 14).permute(3, 0, 1, 2)[None].float()
    small = torch.where(torch.isin(truth, torch.tensor(GROUPS["small"], device=truth.device)), truth, 0)
    small = small[None].to(torch.uint8)

    def coarse(x, amp):
        coarse_predict(x, amp)
        return coarse_truth

    def locator(image, coarse_mask):
        locate(image, coarse_mask)
        return MetaTensor(small, affine=image.affine)

    cascade.coarse.predict, cascade._locate = coarse, locator


class NetworkTimer:
    """Wraps a stage's network (or engine) call and adds its wall time to ``seconds[stage]``."""

    def __init__(self, call, seconds: dict, stage: str, device: str):
        self.call, self.seconds, self.stage, self.device = call, seconds, stage, device

    def __call__(self, x):
        started = time.perf_counter()
        out = self.call(x)
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
        self.seconds[self.stage] = self.seconds.get(self.stage, 0.0) + time.perf_counter() - started
        return out


def time_networks(cascade: Cascade, device: str) -> dict:
    """Time every stage's network calls; returns the dict the times accumulate in (stage name -> seconds)."""
    seconds: dict = {}
    stages = [cascade.coarse, *cascade.groups, cascade.locator, *cascade.refiners]
    for stage in stages:
        if stage is None:
            continue
        label = stage.name if stage.name != "refiner" else f"refiner_{stage.labels[0]}"
        if getattr(stage, "engine", None) is not None:
            stage.engine = NetworkTimer(stage.engine, seconds, label, device)
        else:
            stage.network = NetworkTimer(stage.network, seconds, label, device)
    return seconds


class StubNetwork:
    """Fixed random logits of a stage's shape instead of its network: times the work around the networks alone."""

    def __init__(self, stage):
        generator = torch.Generator().manual_seed(len(stage.labels))
        self.logits = torch.randn((1, len(stage.labels) + 1, *stage.spatial_size), generator=generator)

    def __call__(self, x):
        return self.logits


class TruthOutputs:
    """A group's or refiner's logits taken from the ground truth in the stage's box: organs where the truth has them,
    soft only at their borders, as a trained network hands them on. Random weights instead make every voxel a
    near-tie and every organ a cloud of fragments, which inflates the fusion and the largest-component step.

    ``network``: the stage's own network (or engine), still run and timed on each call (``--outputs truth``);
    ``None``: no network at all (``--stub --outputs truth``). The truth's logits are made once per box (in the
    warm-up case), so that the benchmark's own work does not count as the cascade's."""

    def __init__(self, stage, truth: torch.Tensor, network=None):
        self.stage, self.truth, self.network, self.box, self.made = stage, truth, network, None, {}
        compute_box = stage.cropper.compute_box

        def remember(*args, **kwargs):
            self.box = compute_box(*args, **kwargs)
            return self.box

        stage.cropper.compute_box = remember

    def __call__(self, x):
        if self.network is not None:
            self.network(x)
        key = repr(self.box)
        if key not in self.made:
            one_hot = soft_labels(self.truth[None], self.stage.labels)
            probs = crop_resize(one_hot, self.box, self.stage.spatial_size, "trilinear")
            self.made[key] = torch.log(probs.mul_(0.98).add_(0.02 / probs.shape[0]))[None]
        return self.made[key]


def stub_networks(cascade: Cascade) -> None:
    """Replace every stage's network by fixed random logits."""
    for stage in [cascade.coarse, *cascade.groups, cascade.locator, *cascade.refiners]:
        if stage is not None:
            stage.network = StubNetwork(stage)
            if getattr(stage, "engine", None) is not None:
                stage.engine = stage.network


def hand_on_truth(cascade: Cascade, case, run_networks: bool = True) -> None:
    """The groups and refiners hand on the truth's logits (:class:`TruthOutputs`), after their (timed) network ran
    or, without ``run_networks``, instead of it. With ``--guides truth`` the coarse stage and the locator do the
    same, so that every step after a network sees what trained networks give it."""
    truth = _ras_truth(cascade, case)
    for stage in [*cascade.groups, *cascade.refiners]:
        network = (stage.engine or stage.network) if run_networks else None
        stage.network = TruthOutputs(stage, truth, network)
        if stage.engine is not None:
            stage.engine = stage.network


def _ras_truth(cascade: Cascade, case) -> torch.Tensor:
    ornt = nib.orientations.io_orientation(case.affine)
    truth = torch.from_numpy(np.ascontiguousarray(nib.orientations.apply_orientation(case.label, ornt)))
    return truth.to(cascade.device)


def write_case(folder: Path, shape, spacing):
    """The benchmark CT (and its truth) in ``folder``, generated once."""
    image, label = folder / "bench_0000.nii.gz", folder / "bench_label.nii.gz"
    if not (image.is_file() and label.is_file()):
        folder.mkdir(parents=True, exist_ok=True)
        case = make_case(0, shape=shape, spacing=spacing, orientation="LPS")
        nib.save(nib.Nifti1Image(case.image, case.affine), str(image))
        nib.save(nib.Nifti1Image(case.label, case.affine), str(label))
    truth = nib.load(str(label))
    return image, _Truth(np.asarray(truth.dataobj), truth.affine)


class _Truth:
    def __init__(self, label, affine):
        self.label, self.affine = label, affine


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="512,512,300")
    parser.add_argument("--spacing", default="0.8,0.8,1.5")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--amp", default="auto", choices=["auto", "true", "false"])
    parser.add_argument("--repeats", type=int, default=2, help="cases timed after one warm-up")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--guides", default="truth", choices=["truth", "network"], help="see the docstring")
    parser.add_argument("--outputs", default="network", choices=["truth", "network"], help="truth: the groups and "
                        "refiners run (timed) and then hand on the ground truth's logits, so that fusion and the "
                        "largest-component step work on what trained networks give them (needs --guides truth)")
    parser.add_argument("--engine", default=None, help="torch, openvino or auto (default: the package's default)")
    parser.add_argument("--case", default=None, help="folder to keep the generated CT in (default: a temporary one)")
    parser.add_argument("--weights", default=None, help="folder of random paper-size checkpoints, written once "
                        "(a --bundles_dir): engines are cached as with trained weights")
    parser.add_argument("--calibration", default=None, help="CTs that calibrate --engine openvino-int8")
    parser.add_argument("--stub", action="store_true", help="fixed random logits instead of the networks (with "
                        "--outputs truth, the truth's): only the time around them (reading, crops, resizes, fusion, "
                        "largest components) is spent")
    parser.add_argument("--channels", default=None, help="network widths, e.g. 4,8,8,8,8: tiny networks, to time "
                        "the work around them quickly (default: the paper's size)")
    args = parser.parse_args()
    if args.outputs == "truth" and args.guides != "truth":
        parser.error("--outputs truth needs --guides truth (the truth's boxes)")
    if args.threads:
        torch.set_num_threads(args.threads)

    shape = tuple(int(s) for s in args.shape.split(","))
    spacing = tuple(float(s) for s in args.spacing.split(","))
    amp = None if args.amp == "auto" else args.amp == "true"
    options = {"engine": args.engine} if args.engine else {}
    if options and "engine" not in inspect.signature(Cascade.from_bundles).parameters:
        parser.error("this checkout's Cascade has no engine argument")
    with tempfile.TemporaryDirectory() as tmp:
        path, case = write_case(Path(args.case or tmp), shape, spacing)
        if args.channels:
            widths = [int(c) for c in args.channels.split(",")]
            options["stage_overrides"] = {name: {"network_def": {"channels": widths}} for name in STAGE_BUNDLES}
        if args.weights:
            from startup import write_checkpoints

            write_checkpoints(Path(args.weights))
            for name, bundle in STAGE_BUNDLES.items():  # the package's configs, these weights (as segment does it)
                overrides = options.setdefault("stage_overrides", {}).setdefault(name, {})
                overrides["ckpt_dir"] = str(Path(args.weights) / bundle / "models")
        if args.calibration:
            options["calibration"] = args.calibration
        cascade = Cascade.from_bundles(device=args.device, amp=amp, require_weights=False, **options)
        if args.stub:
            stub_networks(cascade)
        if args.guides == "truth":
            use_truth_as_guides(cascade, case)
        network_seconds = time_networks(cascade, args.device)
        if args.outputs == "truth":
            hand_on_truth(cascade, case, run_networks=not args.stub)
        cascade.segment(path)  # warm-up: allocator, kernels, cudnn autotuning
        runs = []
        for _ in range(args.repeats):
            network_seconds.clear()
            cpu = time.process_time()
            with ResourceMonitor(args.device) as monitor:
                result = cascade.segment(path)
            runs.append({"usage": monitor.usage.as_dict(), "stage_seconds": result.seconds,
                         "network_seconds": dict(network_seconds), "cpu_seconds": time.process_time() - cpu})
    best = min(runs, key=lambda r: r["usage"]["seconds"])
    print(f"device {args.device}, engine {getattr(cascade, 'engine', 'torch')}, amp {cascade.amp}, "
          f"threads {torch.get_num_threads()}, guides {args.guides}, CT {shape} at {spacing} mm")
    print(f"  {'stage':<14}{'all':>8}{'network':>9}{'around':>8}")
    around_total = 0.0
    for stage, seconds in best["stage_seconds"].items():
        network = best["network_seconds"].get(stage, 0.0)
        around_total += seconds - network
        print(f"  {stage:<14}{seconds:8.2f}{network:9.2f}{seconds - network:8.2f}")
    usage = best["usage"]
    print(f"  {'total':<14}{usage['seconds']:8.2f}{sum(best['network_seconds'].values()):9.2f}{around_total:8.2f} s"
          f"   (runs: {', '.join(str(r['usage']['seconds']) for r in runs)})")
    print(f"  CPU time of the case (all threads; steadier than wall time on a shared machine): "
          f"{', '.join('%.2f' % r['cpu_seconds'] for r in runs)} s")
    print(f"  peak RSS {usage['peak_rss_mb']:.0f} MB, peak GPU {usage['peak_gpu_mb']:.0f} MB, "
          f"GPU area {usage['gpu_mb_seconds']:.0f} MB*s, CPU area {usage['cpu_percent_seconds']:.0f} %*s")
    print(json.dumps(best))


if __name__ == "__main__":
    main()
