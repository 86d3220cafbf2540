"""Resident memory of this process: a stage's peak, and freed heap handed back to the OS.

  with memory.Peak() as peak:      # resets the kernel's high-water mark where it may
    run_a_stage()
  peak.bytes, peak.since          # VmHWM of the stage ("stage") or of the process ("process")

Linux keeps a per-process resident high-water mark (VmHWM in /proc/self/status); writing "5"
to /proc/self/clear_refs resets it to the current RSS, so each stage's peak is its own. Where
the reset is not permitted (or there is no /proc), the peak is `getrusage` ru_maxrss: the
process's high-water mark so far, which a later stage can only inherit, never lower; `since`
says which one a number is. RSS counts every resident page: JAX's buffers, XLA's compiled
programs and temporaries, Python objects, and the touched pages of a memory-mapped
safetensors file.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import resource
import sys

GIB = 2**30


def _status_kib(field: str) -> int | None:
  try:
    with open("/proc/self/status", encoding="ascii") as f:
      for line in f:
        if line.startswith(field + ":"):
          return int(line.split()[1])
  except OSError:
    pass
  return None


def rss_bytes() -> int | None:
  """Resident set size now (None without /proc)."""
  kib = _status_kib("VmRSS")
  return None if kib is None else kib * 1024


def _maxrss_bytes() -> int:
  peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
  return peak if sys.platform == "darwin" else peak * 1024  # KiB on Linux.


def reset_peak() -> bool:
  """Resets VmHWM to the current RSS; False where the kernel does not let us."""
  try:
    with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
      f.write("5")
    return True
  except OSError:
    return False


def peak_bytes() -> int:
  """VmHWM (since the last reset), else the process's ru_maxrss."""
  kib = _status_kib("VmHWM")
  return _maxrss_bytes() if kib is None else kib * 1024


def release() -> None:
  """Frees unreachable objects (an NNX model in a reference cycle holds its arrays until the
  collector runs) and asks glibc to return free heap pages to the OS, so the next stage starts
  from what is really live. A no-op for the allocator where libc has no malloc_trim."""
  gc.collect()
  try:
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    libc.malloc_trim(0)
  except (OSError, AttributeError):
    pass


class Peak:
  """Context manager: the resident peak of the code inside it (see the module docstring).

  After the block: `bytes` (the peak), `end_bytes` (RSS at the end, after `release()`),
  `since` ("stage": reset at entry; "process": a process-wide high-water mark)."""

  def __init__(self):
    self.bytes = self.end_bytes = 0
    self.since = "process"

  def __enter__(self) -> Peak:
    release()
    self.since = "stage" if reset_peak() else "process"
    return self

  def __exit__(self, *exc) -> None:
    self.bytes = peak_bytes()
    release()
    self.end_bytes = rss_bytes() or 0
