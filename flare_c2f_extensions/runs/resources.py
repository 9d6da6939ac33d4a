"""Efficiency as FLARE22 measured it: wall time, peak memory, and areas under the memory- and CPU-time curves.

A background thread samples every 0.1 s: the process's resident memory (RSS) and CPU utilisation (psutil:
portable and per process), and on CUDA the GPU memory PyTorch holds for this process
(``torch.cuda.memory_reserved``; the CUDA context's own few hundred MB, which nvidia-smi also counts, is not
included).
"""

from __future__ import annotations

import threading
import time
from dataclasses import asdict, dataclass

import psutil
import torch

__all__ = ["SAMPLE_SECONDS", "ResourceMonitor", "Usage"]

SAMPLE_SECONDS = 0.1


@dataclass
class Usage:
    seconds: float = 0.0
    peak_rss_mb: float = 0.0
    peak_gpu_mb: float = 0.0
    gpu_mb_seconds: float = 0.0  # area under the GPU memory-time curve
    cpu_percent_seconds: float = 0.0  # area under the CPU utilisation-time curve (100 % = one core)

    def as_dict(self) -> dict:
        return {key: round(value, 2) for key, value in asdict(self).items()}


class ResourceMonitor:
    """``with ResourceMonitor(device) as monitor: ...`` then ``monitor.usage``."""

    def __init__(self, device: torch.device | str = "cpu", interval: float = SAMPLE_SECONDS):
        self.device = torch.device(device)
        self.interval = interval
        self.usage = Usage()
        self._process = psutil.Process()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _gpu_mb(self) -> float:
        if self.device.type != "cuda":
            return 0.0
        return torch.cuda.memory_reserved(self.device) / 2**20

    def _sample(self, elapsed: float) -> None:
        rss = self._process.memory_info().rss / 2**20
        gpu = self._gpu_mb()
        cpu = self._process.cpu_percent(None)  # since the previous call
        usage = self.usage
        usage.peak_rss_mb = max(usage.peak_rss_mb, rss)
        usage.peak_gpu_mb = max(usage.peak_gpu_mb, gpu)
        usage.gpu_mb_seconds += gpu * elapsed
        usage.cpu_percent_seconds += cpu * elapsed

    def _loop(self) -> None:
        last = time.perf_counter()
        while not self._stop.wait(self.interval):
            now = time.perf_counter()
            self._sample(now - last)
            last = now
        self._sample(time.perf_counter() - last)

    def __enter__(self) -> ResourceMonitor:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        self._process.cpu_percent(None)
        self._start = time.perf_counter()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.usage.seconds = time.perf_counter() - self._start
        if self.device.type == "cuda":
            self.usage.peak_gpu_mb = max(self.usage.peak_gpu_mb, torch.cuda.max_memory_reserved(self.device) / 2**20)
