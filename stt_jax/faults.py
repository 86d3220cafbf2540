"""Named fault points, so the reliability suite can crash a real run at an exact place.

Each stage calls `point(name)` where an interruption matters (after a decoded batch, after a
train step, after a checkpoint save starts...) and writes its append-only outputs through
`write(...)`. Both do nothing unless the environment asks for a fault:

  STT_JAX_FAULT=<name>:<n>[:<kind>]   the n-th time (1-based) this process passes <name>:
      kill    SIGKILL itself (kill -9: no cleanup, no finally, no flush)        [default]
      torn    at a write point: write half of the bytes, fsync, then SIGKILL
      enospc  at a write point: write half of the bytes, then raise OSError(ENOSPC), as a
              full disk does
  STT_JAX_FAULT_TRACE=<file>          append every point passed to <file> ("<name> <unix time>"
      a line), so a test can pick seeded random points from what a real run goes through.

Unset (every real run), a point costs one dict lookup.
"""

from __future__ import annotations

import collections
import errno
import os
import signal
import time
from typing import IO

_counts: collections.Counter = collections.Counter()
_target: tuple[str, int, str] | None = None
_trace: str | None = None
_loaded = False

KINDS = ("kill", "torn", "enospc")


def _load() -> None:
  global _target, _trace, _loaded
  _loaded = True
  _trace = os.environ.get("STT_JAX_FAULT_TRACE") or None
  spec = os.environ.get("STT_JAX_FAULT")
  if not spec:
    return
  parts = spec.split(":")
  if len(parts) not in (2, 3) or not parts[1].isdigit() or (len(parts) == 3 and
                                                            parts[2] not in KINDS):
    raise ValueError(f"STT_JAX_FAULT={spec!r}: expected <point>:<n>[:{'|'.join(KINDS)}]")
  _target = (parts[0], int(parts[1]), parts[2] if len(parts) == 3 else "kill")


def _hit(name: str) -> str | None:
  """Counts a pass of `name`; returns the fault kind if this pass is the target."""
  if not _loaded:
    _load()
  if _trace:
    with open(_trace, "a", encoding="utf-8") as f:
      f.write(f"{name} {time.time():.3f}\n")
  if _target is None or _target[0] != name:
    return None
  _counts[name] += 1
  return _target[2] if _counts[name] == _target[1] else None


def _kill() -> None:
  os.kill(os.getpid(), signal.SIGKILL)


def point(name: str) -> None:
  """A place where the run may be killed."""
  if _hit(name):
    _kill()


def write(f: IO, text: str, name: str) -> None:
  """f.write(text), flushed and fsync'd; a write point where a fault may tear it."""
  kind = _hit(name)
  if kind == "kill":
    _kill()
  if kind in ("torn", "enospc"):
    f.write(text[:max(1, len(text) // 2)])
    f.flush()
    os.fsync(f.fileno())
    if kind == "torn":
      _kill()
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), getattr(f, "name", None))
  f.write(text)
  f.flush()
  os.fsync(f.fileno())
