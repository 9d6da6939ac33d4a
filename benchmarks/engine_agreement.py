"""One answer whatever the thread count: voxel agreement of the cascade's label maps across thread counts (1, 2,
every core), engines (torch, OpenVINO) and precisions (f32, bf16), on random and on small trained weights; with
``--cost``, what the thread-invariant norms cost a paper-size network.

Each (weights, engine, precision) builds the cascade once per thread count, as a new process would (OpenVINO's
``INFERENCE_NUM_THREADS`` follows torch's thread count at compile time), segments the held-out generated cases (in
reverse order at every other thread count: the order of cases must not matter either) and compares each label map
with the one-thread map. Random weights are the harsh case: near-ties everywhere.

    python benchmarks/engine_agreement.py                       # a few minutes on 2 cores (trains briefly once)
    python benchmarks/engine_agreement.py --quickstart /tmp/qs  # a quickstart's trained bundles, every stage
    python benchmarks/engine_agreement.py --cost                # paper-size network per stage grid, alternating

``--work`` keeps the generated cases, random and trained weights and the OpenVINO cache for the next run.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import small_weights
import torch

from flare_c2f_extensions.cascade.pipeline import Cascade
from flare_c2f_extensions.cascade.stages import default_amp
from flare_c2f_extensions.paths import BUNDLES_DIR


def cores() -> int:
    return len(os.sched_getaffinity(0))


def thread_counts(spec: str) -> list[int]:
    counts = [cores() if item == "all" else int(item) for item in spec.split(",")]
    return list(dict.fromkeys(counts))


def agreement(args, weights: dict, data: Path) -> list[tuple]:
    cases = sorted((data / "imagesTs").glob("*_0000.nii.gz"))
    precisions = ["f32", "bf16"] if default_amp(torch.device("cpu")) else ["f32"]
    rows = []
    for name, (overrides, small_organs) in weights.items():
        for engine in args.engines.split(","):
            for precision in precisions:
                maps, seconds = {}, {}
                for index, threads in enumerate(thread_counts(args.threads)):
                    torch.set_num_threads(threads)
                    cascade = Cascade.from_bundles(BUNDLES_DIR, device="cpu", amp=precision == "bf16", engine=engine,
                                                   stage_overrides=overrides, small_organs=small_organs)
                    order = cases if index % 2 == 0 else cases[::-1]
                    started = time.perf_counter()
                    maps[threads] = {case.name: cascade.segment(case).labels for case in order}
                    seconds[threads] = (time.perf_counter() - started) / len(cases)
                first = next(iter(maps))
                for threads, labels in maps.items():
                    agree = [float(np.mean(labels[c] == maps[first][c])) for c in labels]
                    identical = sum(a == 1.0 for a in agree)
                    labelled = np.mean([len(np.unique(m)) - 1 for m in labels.values()])
                    rows.append((name, engine, precision, threads, min(agree), identical, len(agree), labelled,
                                 seconds[threads]))
                    print(f"{name:<8} {engine:<9} {precision:<5} {threads:>2} threads: lowest agreement with {first} "
                          f"thread(s) {min(agree):.6f}, {identical}/{len(agree)} cases identical, "
                          f"{labelled:.1f} organs per map, {seconds[threads]:.2f} s per case", flush=True)
    return rows


def cost(args) -> None:
    """A paper-size network per stage grid: the converted model as it was (OpenVINO's own MVN layout) against the
    rewritten one (:func:`engines.fixed_order_norms`), runs alternating, one sitting; and whether each is the same
    for 1 thread and every core."""
    import openvino

    from flare_c2f_extensions.cascade import engines
    from flare_c2f_extensions.cascade.networks import ResUNetASPP

    core = openvino.Core()
    for grid, precision in [(160, "bf16"), (128, "f32"), (64, "bf16")]:
        if precision == "bf16" and not default_amp(torch.device("cpu")):
            precision = "f32"
        torch.manual_seed(0)
        network = ResUNetASPP(out_channels=14).eval()
        with torch.no_grad():
            traced = openvino.convert_model(network, example_input=torch.zeros(1, 1, 32, 32, 32))
        traced.reshape([1, 1, grid, grid, grid])
        rewritten = traced.clone()
        engines.fixed_order_norms(rewritten)
        x = torch.rand(1, 1, grid, grid, grid, generator=torch.Generator().manual_seed(1)).numpy()
        for threads in thread_counts(args.threads)[::-1]:
            requests, outputs = {}, {}
            for name, model in (("as converted", traced), ("fixed-order norms", rewritten)):
                config = {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_NUM_THREADS": threads,
                          "INFERENCE_PRECISION_HINT": precision}
                requests[name] = core.compile_model(model, "CPU", config).create_infer_request()
                outputs[name] = next(iter(requests[name].infer({0: x}).values())).copy()  # warm
            times = {name: [] for name in requests}
            for _ in range(args.repeats):
                for name, request in requests.items():
                    started = time.perf_counter()
                    request.infer({0: x})
                    times[name].append(time.perf_counter() - started)
            line = ", ".join(f"{name} median {np.median(t):.3f} s (min {min(t):.3f}, runs "
                             f"{' '.join(f'{s:.2f}' for s in t)})" for name, t in times.items())
            ratio = np.median(times["fixed-order norms"]) / np.median(times["as converted"])
            print(f"{grid}^3 {precision} {threads} thread(s): {line}; ratio {ratio:.3f}", flush=True)
            if threads == 1:
                one = outputs
            else:
                last = outputs
        if len(thread_counts(args.threads)) > 1:
            for name in one:
                same = np.array_equal(one[name], last[name])
                share = float(np.mean(one[name].argmax(1) == last[name].argmax(1)))
                print(f"{grid}^3 {precision} {name}: 1 thread against {max(thread_counts(args.threads))}: logits "
                      f"{'identical' if same else 'differ'}, argmax agreement {share:.6f}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quickstart", default=None, help="a quickstart's folder: its bundles and held-out cases")
    parser.add_argument("--work", default=None, help="folder kept between runs (default: a temporary one)")
    parser.add_argument("--cases", type=int, default=2, help="held-out cases generated (without --quickstart)")
    parser.add_argument("--shape", default="96,96,64", help="their shape")
    parser.add_argument("--threads", default="1,2,all", help="thread counts; all: every core")
    parser.add_argument("--engines", default="torch,openvino")
    parser.add_argument("--weights", default="random,trained")
    parser.add_argument("--cost", action="store_true", help="time the norm rewrite on a paper-size network instead")
    parser.add_argument("--repeats", type=int, default=5, help="runs per variant with --cost")
    parser.add_argument("--as_converted", action="store_true",
                        help="OpenVINO without the norm rewrite (as before it), in a cache of its own: the baseline")
    args = parser.parse_args()
    print(f"{cores()} cores; torch {torch.__version__}; load average {os.getloadavg()[0]:.1f}", flush=True)
    if args.cost:
        return cost(args)
    work = Path(args.work or tempfile.mkdtemp(prefix="engine_agreement_"))
    os.environ.setdefault("FLARE_C2F_CACHE", str(work / ("cache_as_converted" if args.as_converted else "cache")))
    if args.as_converted:
        from flare_c2f_extensions.cascade import engines

        engines.fixed_order_norms = lambda model: 0
    quickstart = Path(args.quickstart) if args.quickstart else None
    data = quickstart / "data" if quickstart else small_weights.cohort(
        work, 8, args.cases, [int(s) for s in args.shape.split(",")])
    weights = {}
    for name in args.weights.split(","):
        if name == "random":
            weights["random"] = (small_weights.random_overrides(work), None)
        elif name == "trained":
            weights["trained"] = small_weights.trained_overrides(work, data, quickstart)
    started = time.perf_counter()
    rows = agreement(args, weights, data)
    print("\n| weights | engine | precision | threads | lowest agreement with the first | identical | s/case, cold |")
    print("|---|---|---|---|---|---|---|")
    for name, engine, precision, threads, lowest, identical, n, _, seconds in rows:
        print(f"| {name} | {engine} | {precision} | {threads} | {lowest:.6f} | {identical}/{n} | {seconds:.2f} |")
    print(f"\n{len(rows)} rows in {time.perf_counter() - started:.0f} s; load average {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
