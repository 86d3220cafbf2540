"""Outputs that survive kill -9: append-only jsonl where only whole lines count, and whole
files (and folders) replaced atomically.

The translation cache, the train log and the eval metrics are appended to while a run may be
killed at any byte. A line counts only when its newline is on disk (a torn line can still
parse as JSON), and a writer cuts a torn last line off before it appends again, so a new
record never glues onto half an old one. Every append is flushed and fsync'd.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Sequence
from typing import Any

from stt_jax import faults


def records(path: str | os.PathLike) -> list[Any]:
  """The JSON value of every complete line ([] if the file does not exist)."""
  out = []
  try:
    with open(path, encoding="utf-8") as f:
      for line in f:
        if not line.endswith("\n"):
          continue  # A torn last line of an interrupted write.
        try:
          out.append(json.loads(line))
        except json.JSONDecodeError:
          continue
  except FileNotFoundError:
    pass
  return out


def cut_torn_tail(path: str | os.PathLike) -> bool:
  """Truncates an unterminated last line; returns whether there was one."""
  try:
    with open(path, "rb+") as f:
      data = f.read()
      if not data or data.endswith(b"\n"):
        return False
      f.truncate(data.rfind(b"\n") + 1)
  except FileNotFoundError:
    return False
  logging.warning("%s: dropped a torn last line (interrupted run)", path)
  return True


def append(path: str | os.PathLike, rows: Sequence[Any], point: str) -> None:
  """Appends one JSON line per row, durably; `point` names the write for stt_jax.faults."""
  with open(path, "a", encoding="utf-8") as f:
    faults.write(f, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), point)


def write_atomic(path: str | os.PathLike, text: str, point: str | None = None) -> None:
  """Replaces `path` with `text` all at once: a reader sees the old file or the new one,
  never a part. `point` names the moment before the rename for stt_jax.faults."""
  tmp = f"{os.fspath(path)}.tmp{os.getpid()}"
  with open(tmp, "w", encoding="utf-8") as f:
    f.write(text)
    f.flush()
    os.fsync(f.fileno())
  if point:
    faults.point(point)
  os.replace(tmp, path)


def write_json(path: str | os.PathLike, obj: Any, *, indent: int | None = 2,
               point: str | None = None) -> None:
  """Replaces `path` with `obj` as JSON (UTF-8, not \\u-escaped, trailing newline) via
  `write_atomic`, so a config, index or marker file is never seen half written."""
  write_atomic(path, json.dumps(obj, indent=indent, ensure_ascii=False) + "\n", point)


def replace_dir(tmp: str | os.PathLike, out: str | os.PathLike) -> None:
  """Renames the finished folder `tmp` to `out`; an old `out` is moved aside first, then
  deleted, so `out` is always either the old folder or the whole new one (or, killed
  between the two renames, absent: a rerun writes it again)."""
  out = os.fspath(out)
  old = None
  if os.path.exists(out):
    old = f"{out}.old-{os.getpid()}"
    os.rename(out, old)
  os.rename(tmp, out)
  if old is not None:
    shutil.rmtree(old, ignore_errors=True)
