"""Start-up against per-case time: one case in a fresh process, split into imports, network building, weight loading,
engine compilation and the case itself, then the same case again in the warm process.

Paper-size stages get random weights saved once as checkpoints (``--weights``), so that weight loading and the
OpenVINO cache (keyed by the checkpoint's sha256) work as with trained weights. The first run of an OpenVINO
cascade converts every stage and fills the cache (``--cache``); later runs read it. Prints one line per phase and
the ratio of the whole process (interpreter start to the label map written) to the warm per-case time.

    python benchmarks/startup.py --engine openvino        # run it twice: the second run is the usual one
    python benchmarks/startup.py --engine torch
"""

from __future__ import annotations

import time

STARTED = time.perf_counter()

import argparse  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402


def checkpoint_overrides(folder: Path) -> dict:
    """Random paper-size checkpoints for every stage under ``folder`` (written once) and the overrides using them."""
    import torch

    from flare_c2f_extensions.configs import read_stage_config
    from flare_c2f_extensions.labels import GROUPS, ORGANS
    from flare_c2f_extensions.paths import BUNDLES_DIR, STAGE_BUNDLES

    overrides = {}
    for name, bundle in STAGE_BUNDLES.items():
        root = folder / bundle
        organs = [ORGANS[o] for o in GROUPS["small"]] if name == "refiner" else [None]
        for organ in organs:
            extra = {"organ": organ} if organ else {}
            parser = read_stage_config(BUNDLES_DIR / bundle, {"bundle_root": str(root), **extra})
            checkpoint = Path(parser.get_parsed_content("ckpt_path"))
            if not checkpoint.is_file():
                checkpoint.parent.mkdir(parents=True, exist_ok=True)
                torch.manual_seed(len(overrides))
                torch.save(parser.get_parsed_content("network_def").state_dict(), checkpoint)
        overrides[name] = {"bundle_root": str(root)}
    return overrides


def timed(module, name: str, totals: dict, key: str):
    """Wrap ``module.name`` so that its calls add their wall time to ``totals[key]``."""
    original = getattr(module, name)

    def wrapper(*args, **kwargs):
        started = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            totals[key] = totals.get(key, 0.0) + time.perf_counter() - started

    setattr(module, name, wrapper)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--engine", default="auto")
    parser.add_argument("--case", default="/tmp/speed_bench/bench_0000.nii.gz", help="a CT (cascade_speed.py --case)")
    parser.add_argument("--weights", default="/tmp/flare_c2f_startup_weights")
    parser.add_argument("--out", default="/tmp/flare_c2f_startup_out")
    parser.add_argument("--warm", type=int, default=1, help="warm cases timed after the first")
    args = parser.parse_args()

    import torch  # noqa: F401  (timed with the package's imports)

    import flare_c2f_extensions.cascade as cascade_module

    imports = time.perf_counter() - STARTED
    overrides = checkpoint_overrides(Path(args.weights))
    prepared = time.perf_counter()

    totals: dict = {}
    timed(cascade_module.torch, "load", totals, "weights")
    timed(cascade_module, "openvino_engine", totals, "engine")
    timed(cascade_module, "openvino_cache_key", totals, "hashing")
    started = time.perf_counter()
    cascade = cascade_module.Cascade.from_bundles(device="cpu", engine=args.engine, stage_overrides=overrides)
    building = time.perf_counter() - started
    started = time.perf_counter()
    cascade_module.segment_to_file(cascade, args.case, args.out)
    first = time.perf_counter() - started
    whole = time.perf_counter() - STARTED - (prepared - STARTED - imports)  # the checkpoints' writing left out
    warm = []
    for _ in range(args.warm):
        started = time.perf_counter()
        cascade_module.segment_to_file(cascade, args.case, args.out)
        warm.append(time.perf_counter() - started)

    network = building - sum(totals.values())
    print(f"engine {cascade.engine}, threads {torch.get_num_threads()}, case {args.case}")
    print(f"  imports                 {imports:7.2f} s")
    print(f"  network building        {network:7.2f} s   (configs parsed, networks made)")
    print(f"  weight loading          {totals.get('weights', 0.0):7.2f} s")
    print(f"  checkpoint hashing      {totals.get('hashing', 0.0):7.2f} s")
    print(f"  engine compilation      {totals.get('engine', 0.0):7.2f} s   (OpenVINO: converted or cached, compiled)")
    print(f"  first case              {first:7.2f} s")
    print(f"  whole process           {whole:7.2f} s   (interpreter start to the label map written)")
    best = min(warm) if warm else float("nan")
    print(f"  warm case (best of {len(warm)})   {best:7.2f} s")
    print(f"  whole process / warm case: {whole / best:.2f}")
    sys.stdout.flush()
    os._exit(0)  # skip interpreter teardown: not part of the user's wait


if __name__ == "__main__":
    main()
