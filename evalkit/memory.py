"""Peak memory while a block runs, for the per-variant cost in results.json.

What the number means depends on the device, and the run record says which (`peak_memory_source`):
- "cuda_max_allocated": torch.cuda.max_memory_allocated over the block (reset at entry): tensor
  memory on the GPU, weights of every loaded model included, allocator cache excluded.
- "cpu_peak_rss": the process's peak resident set size over the block, sampled every 10 ms from
  /proc/self/statm: everything the process holds (all loaded models, Python, allocator slack),
  so on CPU it bounds a variant's footprint from above rather than isolating it.
- "cpu_maxrss": where /proc is missing (macOS), getrusage's lifetime high-water mark.
"""
from __future__ import annotations

import os
import sys
import threading
from types import TracebackType

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def _rss_bytes() -> int | None:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * _PAGE
    except (OSError, ValueError, IndexError):
        return None


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
        elif _rss_bytes() is not None:
            self.source, self._peak = "cpu_peak_rss", _rss_bytes() or 0
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        else:
            self.source = "cpu_maxrss"
        return self

    def _sample(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._peak = max(self._peak, _rss_bytes() or 0)

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if self.source == "cuda_max_allocated":
            import torch

            self.mb = torch.cuda.max_memory_allocated(self.device) / 2**20
        elif self._thread is not None:
            self._stop.set()
            self._thread.join()
            self.mb = max(self._peak, _rss_bytes() or 0) / 2**20
        else:  # ru_maxrss is KiB on Linux, bytes on macOS
            import resource

            rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            self.mb = rss / (2**20 if sys.platform == "darwin" else 2**10)
