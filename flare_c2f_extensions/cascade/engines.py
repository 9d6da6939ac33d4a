"""Engines that run a stage's network: PyTorch (any device) or OpenVINO (CPU).

``engine="auto"`` takes OpenVINO on a CPU when the ``openvino`` package is installed and torch otherwise, and
torch for a stage without a checkpoint (random weights, as in timing runs and tests): such a stage cannot be cached,
and converting it in every process costs more than it saves on a few cases. The rule is measured, not assumed
(README "Measured"): on this project's CPUs OpenVINO runs the cascade's grids faster than torch in the same
precision; on CUDA only torch runs.

OpenVINO stages are converted from the PyTorch network (trained weights loaded) at first use. Conversion takes
seconds to minutes for the paper-size network, so the converted model (OpenVINO IR) is cached in
``<cache>/openvino/<key>/`` where ``key`` is the sha256 of the checkpoint's bytes together with the network
config, the grid and the OpenVINO version: a changed checkpoint gets a new key and is never served stale (the
checkpoint's sha256 is remembered by the file's identity, ctime included: :func:`checkpoint_sha256`). A
network without a checkpoint (random weights, for timing) is converted each time and never cached. The cache is
``$FLARE_C2F_CACHE`` or ``~/.cache/flare_c2f`` (the sample CT's); OpenVINO's own compiled-blob cache lives in
the same folder.

Precision follows the cascade's ``amp``: with ``amp`` OpenVINO keeps its default inference precision (bf16 on
CPUs with native bf16, like torch's bf16 autocast; f32 elsewhere); without it f32.

One answer whatever the thread count: OpenVINO's CPU plugin runs an instance norm (MVN) in its input's layout, and
after a convolution that is channels-last, where each channel's voxels are split between the inference threads and
their partial sums added, so the means and variances, and through them near-tied voxels, depended on
``INFERENCE_NUM_THREADS`` (1 against 2 threads agreed on about 96% of a random-weight cascade's voxels). Every
converted model has its norms rewritten (:func:`fixed_order_norms`) to run on a planar ``(N, C, voxels)`` view,
where one thread sums each channel in one order: the logits, in f32 and bf16, are then bitwise the same for any
thread count at the cascade's grids (``benchmarks/engine_agreement.py`` measures it and the cost, about nothing).
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import torch

from flare_c2f_extensions.errors import InputError
from flare_c2f_extensions.io.files import remembered_sha256, usual_mode, write_text_atomic

logger = logging.getLogger(__name__)

INT8 = "openvino-int8"  # opt-in: OpenVINO with NNCF post-training quantisation (flare_c2f_extensions.int8)
ENGINES = ("torch", "openvino", INT8, "auto")
GRAPH_REWRITES = "fixed-order-norms-1"  # in the IR cache key: what _convert does to a model besides reshaping it


class EngineError(InputError):
    """An engine that cannot run here (not installed, wrong device, unknown name): a usage error, reported in one
    line like every :class:`InputError`."""


def openvino_available() -> bool:
    try:
        import openvino  # noqa: F401
    except ImportError:
        return False
    return True


def nncf_available() -> bool:
    try:
        import nncf  # noqa: F401
    except ImportError:
        return False
    return True


def resolve_engine(engine: str | None, device: torch.device | str) -> str:
    """``torch``, ``openvino`` or ``openvino-int8`` for ``engine`` (those, or ``auto``; ``None`` is ``auto``) on
    ``device``; :class:`EngineError` with what to do when the choice cannot run. ``auto`` never picks INT8."""
    engine = "auto" if engine is None else str(engine).lower()
    device = torch.device(device)
    if engine not in ENGINES:
        raise EngineError(f"unknown engine {engine!r}: use one of {', '.join(ENGINES)}")
    if engine == "auto":
        return "openvino" if device.type == "cpu" and openvino_available() else "torch"
    if engine in ("openvino", INT8):
        if device.type != "cpu":
            raise EngineError(f"the {engine} engine runs on the CPU only, not on {device} (use engine torch)")
        if not openvino_available():
            raise EngineError(
                "engine openvino asked for, but the openvino package is not installed: "
                "pip install 'flare-c2f-extensions[openvino]' (or pip install openvino), or use engine torch"
            )
    if engine == INT8 and not nncf_available():
        raise EngineError(
            f"engine {INT8} asked for, but the nncf package (which quantises the models) is not installed: "
            "pip install 'flare-c2f-extensions[int8]' (or pip install nncf), or use engine openvino"
        )
    return engine


def thread_invariant(engine: str, device: torch.device | str) -> bool:
    """Whether a cascade run on ``engine`` (as :class:`~flare_c2f_extensions.cascade.Cascade` names it: ``torch``,
    ``openvino``, ``mixed``) gives the same label maps whatever the thread count, and so whatever the number of
    ``torchrun`` ranks and the order of cases. On a CPU every engine does, in f32, bf16 and INT8 (OpenVINO since its
    norms are rewritten: :func:`fixed_order_norms`; measured by ``tests/test_thread_invariance.py`` and
    ``benchmarks/engine_agreement.py``). On CUDA nothing is promised: cuDNN picks its algorithms by timing.
    Measured, not proven: in bf16 oneDNN's blocking of a few convolution shapes follows the thread count (a 384 to
    192 channel 3x3x3 convolution on a 10^3 or 12^3 grid, which a paper-size network meets at 80^3 or 96^3 stage
    grids), so a grid override off the bundles' 64, 128 and 160 can bring bf16 differences back."""
    return torch.device(device).type == "cpu" and engine in ("torch", "openvino", INT8, "mixed")


def cache_root() -> Path:
    return Path(os.environ.get("FLARE_C2F_CACHE") or Path.home() / ".cache" / "flare_c2f")


def checkpoint_sha256(path: str | os.PathLike) -> str:
    """sha256 of a checkpoint, remembered in the cache by the file's identity (:func:`files.remembered_sha256`), so
    that a process start does not read every checkpoint again."""
    path = Path(path).resolve()
    memo = cache_root() / "openvino" / "sha256" / f"{hashlib.sha256(str(path).encode()).hexdigest()[:32]}.json"
    try:
        remembered = json.loads(memo.read_text())
    except (OSError, ValueError):
        remembered = None
    if not isinstance(remembered, dict) or remembered.get("path") != str(path):
        remembered = None
    hashed = remembered_sha256(path, remembered)
    if hashed["identity"] is not None and (remembered or {}).get("identity") != hashed["identity"]:
        try:
            memo.parent.mkdir(parents=True, exist_ok=True)
            write_text_atomic(json.dumps({"path": str(path), **hashed}), memo)
        except OSError as error:  # a read-only cache: hash every time
            logger.debug("could not remember a checkpoint hash in %s (%s)", memo, error)
    return hashed["sha256"]


def openvino_cache_key(checkpoint: str | os.PathLike, network_config, spatial_size: Sequence[int]) -> str:
    """The IR cache key: the checkpoint's sha256, the network config, the grid and the OpenVINO version."""
    import openvino

    parts = {
        "checkpoint_sha256": checkpoint_sha256(checkpoint),
        "network": network_config,
        "spatial_size": [int(s) for s in spatial_size],
        "openvino": openvino.__version__,
        "graph": GRAPH_REWRITES,  # an IR converted before a rewrite changed is converted again
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:32]


class TorchEngine:
    """Logits of a PyTorch module, under bf16 (CPU) or fp16 (CUDA) autocast when ``amp``."""

    name = "torch"

    def __init__(self, network: torch.nn.Module, amp: bool):
        self.network, self.amp = network, amp

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if not self.amp:
            return self.network(x)
        dtype = torch.float16 if x.device.type == "cuda" else torch.bfloat16
        with torch.autocast(x.device.type, dtype=dtype):
            return self.network(x)


class OpenVINOEngine:
    """Logits of a compiled OpenVINO model (CPU), as a float32 torch tensor. ``compiled``: the compiled model, or a
    :class:`~concurrent.futures.Future` of it (compiled in the background), awaited at the first call. ``source``:
    the model it was compiled from (the cached IR's ``model.xml``, or the converted ``openvino.Model``) and ``key``
    its cache key (``None``: not cached), for :mod:`~flare_c2f_extensions.int8`, which quantises it."""

    name = "openvino"

    def __init__(self, compiled, source=None, key: str | None = None, name: str | None = None):
        self._compiled = compiled
        self.source, self.key = source, key
        if name is not None:
            self.name = name
        self._request = None
        # one infer request runs one call at a time ("Infer Request is busy"): callers on other threads wait their
        # turn; each call uses every inference thread anyway
        self._lock = threading.Lock()

    def discard(self) -> None:
        """Not needed after all: a background compilation that has not started is cancelled."""
        if isinstance(self._compiled, Future):
            self._compiled.cancel()

    @property
    def compiled(self):
        if isinstance(self._compiled, Future):
            self._compiled = self._compiled.result()
        return self._compiled

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        array = x.detach().to("cpu", torch.float32).contiguous().numpy()
        with self._lock:
            if self._request is None:
                self._request = self.compiled.create_infer_request()
            result = self._request.infer({0: array}, share_inputs=True)
            return torch.from_numpy(next(iter(result.values())).copy())


def _compile_config(amp: bool, blob_cache: bool) -> dict:
    config = {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_NUM_THREADS": max(1, torch.get_num_threads())}
    blobs = cache_root() / "openvino" / "compiled"
    if blob_cache and _writable_folder(blobs):  # only for cached IRs: a random-weight model's blob would pile up
        config["CACHE_DIR"] = str(blobs)
    if not amp:
        config["INFERENCE_PRECISION_HINT"] = "f32"
    return config


def _compile(model, amp: bool, blob_cache: bool = False):
    import openvino

    return openvino.Core().compile_model(model, "CPU", _compile_config(amp, blob_cache))


CONVERT_SIZE = 32  # traced on a small input (a paper-size pass at 160^3 takes minutes to trace), then reshaped


def _convert(network: torch.nn.Module, spatial_size: Sequence[int]):
    """OpenVINO model of a fully convolutional network, traced on a small cube and reshaped to the stage's grid."""
    import openvino

    grid = [int(s) for s in spatial_size]
    example = torch.zeros((1, 1, *[min(CONVERT_SIZE, s) for s in grid]))
    with torch.no_grad():
        model = openvino.convert_model(network.cpu().float().eval(), example_input=example)
    model.reshape([1, 1, *grid])
    fixed_order_norms(model)
    return model



def fixed_order_norms(model) -> int:
    """Rewrite each per-channel normalisation of ``model`` (an MVN over all spatial axes: instance norm) in place so
    that its sums do not depend on the thread count; returns how many were rewritten.

    OpenVINO's CPU plugin runs MVN in its input's layout. After a convolution that layout is channels-last, where
    the kernel gives each inference thread a share of every channel's voxels and adds the threads' partial sums: a
    different thread count adds in a different order. On a ``(N, C, voxels)`` view (a reshape, which the plugin
    feeds a planar tensor) each channel is summed by one thread from its first voxel to its last. The reshapes cost
    two reorders per norm, within the noise of a paper-size pass (``benchmarks/engine_agreement.py --cost``).
    """
    import numpy as np
    import openvino.opset13 as ops

    rewritten = 0
    for mvn in list(model.get_ordered_ops()):
        if mvn.get_type_name() != "MVN":
            continue
        data, axes = mvn.input_value(0), mvn.input_value(1).get_node()
        rank = data.get_partial_shape().rank
        if rank.is_dynamic or rank.get_length() < 4 or axes.get_type_name() != "Constant":
            continue
        rank = rank.get_length()
        if sorted(int(a) % rank for a in axes.get_data().ravel()) != list(range(2, rank)):
            continue  # not per channel over every spatial axis: left as it is
        attributes = mvn.get_attributes()
        flat = ops.reshape(data, ops.constant(np.array([0, 0, -1], np.int64)), special_zero=True)
        normalised = ops.mvn(flat, ops.constant(np.array([2], np.int64)), attributes["normalize_variance"],
                             attributes["eps"], attributes["eps_mode"])
        back = ops.reshape(normalised, ops.shape_of(data), special_zero=False)
        back.set_friendly_name(mvn.get_friendly_name())
        mvn.output(0).replace(back.output(0))
        rewritten += 1
    return rewritten


def cached_openvino_ir(key: str | None) -> Path | None:
    """The cached IR for ``key`` if it exists (``None`` otherwise)."""
    if key is None:
        return None
    xml = cache_root() / "openvino" / key / "model.xml"
    return xml if xml.is_file() and xml.with_suffix(".bin").is_file() else None


def _writable_folder(folder: Path) -> bool:
    """Whether ``folder`` exists or can be made, and files can be written in it."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError:
        return False
    return os.access(folder, os.W_OK | os.X_OK)


def _save_ir(model, key: str) -> None:
    """Write the IR atomically: a temporary folder renamed into place (another process may race us). A cache that
    cannot be written (read-only, full, not a folder) leaves the model uncached, with a warning."""
    import openvino

    final, tmp = cache_root() / "openvino" / key, None
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{key}.", dir=final.parent))
        openvino.save_model(model, str(tmp / "model.xml"), compress_to_fp16=False)
        usual_mode(tmp, folder=True)
        for file in tmp.iterdir():
            usual_mode(file)
        os.replace(tmp, final)
    except (OSError, RuntimeError) as error:  # RuntimeError: OpenVINO's own failure to write
        if not cached_openvino_ir(key):
            logger.warning("could not cache the OpenVINO model in %s (%s): it runs uncached", final, error)
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


@functools.lru_cache(maxsize=None)
def _compiler() -> ThreadPoolExecutor:
    """The one background thread that compiles cached models, made at its first use."""
    return ThreadPoolExecutor(max_workers=1, thread_name_prefix="openvino-compile")


def _compile_in_background(name: str, xml: Path, amp: bool) -> Future:
    """Compile a cached IR on one background thread, in the order asked (the cascade's order): the process goes on
    reading the first CT meanwhile, and each stage waits for its model at its first call only."""
    config = _compile_config(amp, blob_cache=True)  # read torch's thread count here, on the caller's thread

    def compile_cached():
        import openvino

        started = time.perf_counter()
        try:
            compiled = openvino.Core().compile_model(str(xml), "CPU", config)
        except RuntimeError as error:
            raise EngineError(
                f"{xml}: the cached OpenVINO model of the {name} stage cannot be compiled ({error}); delete "
                f"{xml.parent} and it is converted again from the checkpoint"
            ) from error
        logger.info("%s: OpenVINO model from the cache %s (%.1f s)", name, xml.parent, time.perf_counter() - started)
        return compiled

    return _compiler().submit(compile_cached)


def openvino_engine(
    name: str, amp: bool, key: str | None = None, network_factory: Callable[[], torch.nn.Module] | None = None,
    spatial_size: Sequence[int] = (),
) -> OpenVINOEngine:
    """An OpenVINO engine for one stage: from the cached IR for ``key`` if there is one, otherwise converted from
    ``network_factory()`` (and cached under ``key`` unless it is ``None``)."""
    started = time.perf_counter()
    xml = cached_openvino_ir(key)
    if xml is not None:
        return OpenVINOEngine(_compile_in_background(name, xml, amp), xml, key)
    if network_factory is None:
        raise EngineError(f"{name}: no cached OpenVINO model and no network to convert")
    model = _convert(network_factory(), spatial_size)
    if key is not None:
        _save_ir(model, key)
    compiled = _compile(model, amp)
    logger.info("%s: converted to OpenVINO in %.1f s", name, time.perf_counter() - started)
    return OpenVINOEngine(compiled, cached_openvino_ir(key) or model, key)  # the model itself only if uncached


__all__ = [
    "ENGINES",
    "EngineError",
    "INT8",
    "OpenVINOEngine",
    "TorchEngine",
    "cache_root",
    "cached_openvino_ir",
    "checkpoint_sha256",
    "fixed_order_norms",
    "openvino_available",
    "openvino_cache_key",
    "nncf_available",
    "openvino_engine",
    "resolve_engine",
    "thread_invariant",
]
