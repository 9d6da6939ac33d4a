"""Does self-training on unlabelled CTs close the gap between few and many labelled cases? (issue 11's benchmark)

On a generated cohort (4 labelled cases, 24 unlabelled ones whose truth is kept aside, ``--n_test`` held out), with
the same networks, grids, epochs and held-out cases in every arm:

- (a) the cascade trained on the 4 labelled cases only (also the teacher of (b));
- (b) self-training from (a) with the 24 unlabelled CTs, after 1 and after 2 rounds;
- (c) the cascade trained on all 28 cases with their true labels (the ceiling).

Prints held-out mean DSC and NSD per arm, and per organ group, and the pseudo-labels' quality per organ against the
kept-aside truth (all of them, and the kept ones). Everything resumes: rerun the same command after a stop.

    python benchmarks/self_training.py --out /tmp/selftrain --epochs 15 --grid 32 --channels 4,8,16,16,32
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from flare_c2f_extensions.cascade.pipeline import Cascade
from flare_c2f_extensions.evaluation.metrics import evaluate_folder
from flare_c2f_extensions.io.discovery import find_images
from flare_c2f_extensions.labels import GROUPS, ORGANS
from flare_c2f_extensions.runs.cascade_run import CascadeRunner
from flare_c2f_extensions.synthetic.phantom import write_cohort
from flare_c2f_extensions.training.self_train import self_train
from flare_c2f_extensions.training.train import train_cascade


# quick CPU settings (as the quickstart's, smaller): small grids, small network, high learning rate, no elastic
def _overrides(grid: int, channels: list[int]) -> dict:
    return {"all": {"spatial_size": [grid] * 3, "network_def#channels": channels, "num_workers": 0, "batch_size": 2,
                    "learning_rate": 0.01, "elastic_prob": 0.0}}


def _cohort(root: Path, shape, n_test: int, n_unlabelled: int, seed: int) -> tuple[Path, Path]:
    """``root/data`` (4 labelled, the unlabelled, held-out) and ``root/all`` (all with true labels, linked)."""
    data, all28 = root / "data", root / "all"
    if not (data / "imagesTs").is_dir():
        write_cohort(data, n=4, n_test=n_test, n_unlabelled=n_unlabelled, seed=seed, shape=shape)
    for images, labels in (("imagesTr", "labelsTr"), ("imagesUnlabelled", "truthUnlabelled")):
        for folder, source in (("imagesTr", images), ("labelsTr", labels)):
            (all28 / folder).mkdir(parents=True, exist_ok=True)
            for path in (data / source).iterdir():
                link = all28 / folder / path.name
                if not link.exists():
                    link.symlink_to(path.resolve())
    return data, all28


def _held_out(bundles: Path, data: Path, out: Path) -> dict:
    if (out / "summary.json").is_file():
        return json.loads((out / "summary.json").read_text())
    cascade = Cascade.from_bundles(bundles, device="cpu")
    CascadeRunner(cascade, find_images(data, "imagesTs"), out / "predictions", progress=False).run()
    return evaluate_folder(str(out / "predictions"), str(data / "labelsTs"), str(out))


def _groups(summary: dict) -> dict:
    organs = summary["organs"]
    return {g: float(np.mean([organs[ORGANS[o]]["DSC"] for o in ids])) for g, ids in GROUPS.items()}


def _pseudo_quality(pseudo: Path, truth: Path, out: Path) -> tuple[dict, dict | None]:
    """DSC per organ of every pseudo-label, and of the kept ones, against the kept-aside truth."""
    every = evaluate_folder(str(pseudo / "labels"), str(truth), str(out / "all"))
    kept = [Path(case["label"]).name for case in json.loads((pseudo / "kept.json").read_text())]
    if not kept:
        return every, None
    kept_truth = [str(truth / name) for name in kept]
    return every, evaluate_folder(str(pseudo / "labels"), kept_truth, str(out / "kept"))


def _row(name: str, summary: dict) -> str:
    groups = _groups(summary)
    return (f"{name:<32} {summary['mean_DSC']:6.3f} {summary['mean_NSD']:6.3f}   "
            + " ".join(f"{groups[g]:9.3f}" for g in GROUPS))


def _print_pseudo_quality(root: Path, data: Path, k: int, n_unlabelled: int) -> None:
    pseudo = root / "b_self" / f"round_{k}" / "pseudo"
    every, kept = _pseudo_quality(pseudo, data / "truthUnlabelled", root / "pseudo_quality" / f"round_{k}")
    n_kept = len(json.loads((pseudo / "kept.json").read_text()))
    print(f"\nround {k} pseudo-labels against the kept-aside truth: {n_kept} of {n_unlabelled} kept; DSC (all / kept)")
    for organ in ORGANS.values():
        kept_dsc = f"{kept['organs'][organ]['DSC']:.3f}" if kept else "-"
        print(f"  {organ:<22} {every['organs'][organ]['DSC']:.3f} / {kept_dsc}")
    print(f"  {'mean':<22} {every['mean_DSC']:.3f} / {kept['mean_DSC'] if kept else float('nan'):.3f}", flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="/tmp/flare_selftrain")
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--shape", default="64,64,40")
    parser.add_argument("--n_test", type=int, default=4)
    parser.add_argument("--n_unlabelled", type=int, default=24)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--labelled_repeat", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--grid", type=int, default=32, help="every stage's grid (cubed)")
    parser.add_argument("--channels", default="4,8,16,16,32")
    args = parser.parse_args()
    root = Path(args.out)
    started = time.perf_counter()
    data, everything = _cohort(root, tuple(int(v) for v in args.shape.split(",")), args.n_test, args.n_unlabelled,
                               args.seed)
    overrides = _overrides(args.grid, [int(c) for c in args.channels.split(",")])
    common = dict(epochs=args.epochs, device="cpu", overrides=overrides, num_val=1)
    rows = {}

    def arm(name: str, bundles: Path):  # score on the held-out cases and print the row at once
        where = root / "held_out" / bundles.relative_to(root).as_posix().replace("/", "_")
        rows[name] = _held_out(bundles, data, where)
        print(f"[{time.perf_counter() - started:.0f} s] " + _row(name, rows[name]), flush=True)

    train_cascade(data, root / "a_labelled4", evaluate=False, **common)
    arm("(a) 4 labelled", root / "a_labelled4")
    total = 4 + args.n_unlabelled
    for k in range(1, args.rounds + 1):
        self_train(data, data / "imagesUnlabelled", root / "b_self", rounds=k, teacher=root / "a_labelled4",
                   labelled_repeat=args.labelled_repeat, **common)
        arm(f"(b) + {args.n_unlabelled} unlabelled, {k} round(s)", root / "b_self" / f"round_{k}" / "bundles")
        _print_pseudo_quality(root, data, k, args.n_unlabelled)
        if k == 1:
            train_cascade(everything, root / "c_labelled_all", evaluate=False, **common)
            arm(f"(c) {total} labelled", root / "c_labelled_all")
    print(f"\nheld-out cases: {args.n_test}; epochs {args.epochs}; shape {args.shape}; grid {args.grid}; channels "
          f"{args.channels}; labelled_repeat {args.labelled_repeat}; {time.perf_counter() - started:.0f} s")
    print(f"{'arm':<32} {'DSC':>6} {'NSD':>6}   " + " ".join(f"{g:>9}" for g in GROUPS))
    for name, summary in rows.items():
        print(_row(name, summary))
    state = json.loads((root / "b_self" / "self_train.json").read_text())
    print("\nself_train validation (1 labelled case):", {r["round"]: r["mean_DSC"] for r in state["rounds"]},
          "best:", state["best"]["round"])


if __name__ == "__main__":
    main()
