"""Peak memory of a stretch of benchmark work, on CUDA and on the CPU.

* CUDA: ``torch.cuda.max_memory_allocated`` since the last reset (everything allocated, as PyTorch counts it).
* CPU: PyTorch keeps no allocation statistics there, so the figure comes from the kernel: the process's
  resident-set high-water mark (``VmHWM`` in ``/proc/self/status``), reset by writing ``5`` to
  ``/proc/self/clear_refs``, minus the resident set at :meth:`PeakMemory.begin`. Memory the C library keeps
  after ``free`` would hide new allocations (they reuse it without growing the resident set), so
  ``malloc_trim(0)`` hands it back to the kernel first. The figure counts what the work allocates after
  ``begin`` (weights, gradients, optimizer state, activations) plus allocator overhead, not the interpreter
  and libraries. Linux only; elsewhere it is None.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import re
from pathlib import Path
from typing import Optional

import torch

from benchmarks.device import sync

STATUS = Path("/proc/self/status")
CLEAR_REFS = Path("/proc/self/clear_refs")


def _status_mib(field: str) -> Optional[float]:
    try:
        match = re.search(rf"^{field}:\s+(\d+) kB", STATUS.read_text(), re.MULTILINE)
    except OSError:
        return None
    return int(match.group(1)) / 1024 if match else None


def _trim() -> None:
    """Return the C library's free memory to the kernel (glibc ``malloc_trim``); a no-op elsewhere."""
    try:
        ctypes.CDLL(ctypes.util.find_library("c")).malloc_trim(ctypes.c_size_t(0))
    except (OSError, AttributeError, TypeError):
        pass


class PeakMemory:
    """``memory = PeakMemory(device).begin()`` ... ``memory.restart()`` (optional: a new window, same
    baseline) ... ``memory.read()`` -> MiB or None."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.device = device
        self.baseline: Optional[float] = None

    def begin(self) -> "PeakMemory":
        self.restart(rebase=True)
        return self

    def restart(self, rebase: bool = False) -> None:
        """Start a new window for the peak. The CPU baseline stays the one taken by :meth:`begin`, or with
        ``rebase`` becomes the resident set now (the window then counts only what it adds)."""
        if self.cuda:
            sync(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            return
        if rebase:
            _trim()
            self.baseline = _status_mib("VmRSS")
        try:
            CLEAR_REFS.write_text("5")
        except OSError:
            self.baseline = None  # the mark cannot be reset: it would include everything before

    def read(self) -> Optional[float]:
        """Peak MiB of the window so far."""
        if self.cuda:
            sync(self.device)
            return torch.cuda.max_memory_allocated(self.device) / 2**20
        peak = _status_mib("VmHWM")
        return None if self.baseline is None or peak is None else max(0.0, peak - self.baseline)
