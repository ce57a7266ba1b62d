"""Peak memory while a block runs, for the per-variant cost in results.json and a training's provenance.

What the number means depends on the device, and the record says which (`peak_memory_source` in
results.json, `peak_memory_kind` in evalkit_train.json):
- "cuda_max_allocated": torch.cuda.max_memory_allocated over the block (reset at entry): tensor
  memory on the GPU, weights of every loaded model included, allocator cache excluded.
- "cpu_peak_rss": the process's peak resident set size over the block, sampled every 10 ms
  (psutil): everything the process holds (all loaded models, Python, allocator slack), so on
  CPU it bounds a variant's footprint from above rather than isolating it.
- "cpu_maxrss": where the resident set size cannot be read, the process's lifetime high-water
  mark (getrusage's ru_maxrss; the peak working set on Windows).
"""
from __future__ import annotations

import sys
import threading
from functools import cache
from types import TracebackType

import psutil


@cache
def _process() -> psutil.Process:
    return psutil.Process()


def rss_bytes() -> int | None:
    """The process's resident set size now; None where it cannot be read."""
    try:
        return int(_process().memory_info().rss)
    except (psutil.Error, OSError):
        return None


def max_rss_bytes() -> int | None:
    """The process's lifetime peak resident set size, in bytes; None where the OS does not say.

    psutil has no peak RSS on Linux or macOS, so this reads getrusage's ru_maxrss, whose unit
    differs: KiB on Linux and the BSDs, bytes on macOS. Windows has no `resource` module; psutil
    reports its peak working set there."""
    try:
        import resource
    except ImportError:
        peak = getattr(_process().memory_info(), "peak_wset", None)
        return int(peak) if peak is not None else None
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss) if sys.platform == "darwin" else int(rss) * 1024


class PeakMemory:
    """`with PeakMemory(device) as peak: ...` then `peak.mb` and `peak.source`."""

    def __init__(self, device: str = "cpu", interval_s: float = 0.01):
        self.device, self.interval_s = str(device), interval_s
        self.mb: float = 0.0
        self.source = ""
        self._peak = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> PeakMemory:
        if self.device.startswith("cuda"):
            import torch

            torch.cuda.reset_peak_memory_stats(self.device)
            self.source = "cuda_max_allocated"
        elif (now := rss_bytes()) is not None:
            self.source, self._peak = "cpu_peak_rss", now
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        else:
            self.source = "cpu_maxrss"
        return self

    def _sample(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._peak = max(self._peak, rss_bytes() or 0)

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if self.source == "cuda_max_allocated":
            import torch

            self.mb = torch.cuda.max_memory_allocated(self.device) / 2**20
        elif self._thread is not None:
            self._stop.set()
            self._thread.join()
            self.mb = max(self._peak, rss_bytes() or 0) / 2**20
        else:
            self.mb = (max_rss_bytes() or 0) / 2**20
