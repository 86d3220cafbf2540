"""TensorBoard event files beside the jsonl logs, for dashboards (the jsonl stays the record).

    tensorboard --logdir <workdir>    # runs/<variant>/train, eval/tensorboard/<variant>

Train: each metrics.jsonl row of `runs/<variant>/train/` is one event there, tags
`train/<name>` (TRAIN_SCALARS) at the row's step. Eval: each row of eval/metrics.jsonl is the
point `<task>/<lang>/<metric>` at the checkpoint's step (the base model at 0) in
`eval/tensorboard/<variant>/`, one TensorBoard run per variant (no runs/base folder, which the
report would take for a trained variant).

A run folder holds one event file, appended to and fsync'd per write like appendlog's jsonl:
a resumed train run rewinds it to the restored step (points logged after that checkpoint and
a torn last record go) and continues it, so each step has one point; the eval writer adds the
metrics.jsonl rows its file lacks, so rows appended just before a crash are not lost.
tensorboardX encodes the events (imported at the first write). Its SummaryWriter is not used:
it starts a new file per process, and its flush does not wait for the events still in its
queue.
"""

from __future__ import annotations

import collections
import functools
import importlib.util
import logging
import os
import struct
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence

from stt_jax import hosts

FILE_NAME = "events.out.tfevents.stt_jax"  # TensorBoard reads files whose name has 'tfevents'.
TRAIN_SCALARS = ("loss", "loss_mean", "lr", "grad_norm", "tokens_per_s", "mfu")


def writer_on(config) -> bool:
  """Whether this process writes event files: the config's logging.tensorboard (off for a
  config without a logging section), on process 0 only, with tensorboardX installed."""
  section = config.get("logging") if hasattr(config, "get") else None
  return bool(section is not None and section.get("tensorboard", False) and hosts.is_main()
              and _have_tensorboardx())


@functools.cache
def _have_tensorboardx() -> bool:
  """Whether tensorboardX is installed (found, not imported); if not, says so once."""
  if importlib.util.find_spec("tensorboardX") is not None:
    return True
  logging.warning("tensorboard: tensorboardX is not installed, so no TensorBoard event files "
                  "are written; pip install tensorboardX, or pass "
                  "--config.logging.tensorboard=False")
  return False


def train_scalars(row: Mapping) -> dict[str, float]:
  """The tags and values of one train metrics row (unknown values, e.g. MFU on CPU, skipped)."""
  return {f"train/{k}": float(row[k]) for k in TRAIN_SCALARS if row.get(k) is not None}


def eval_tag(row: Mapping) -> str:
  return f"{row['task']}/{row['lang']}/{row['metric']}"


# ------------------------------------------------------------------------------ one file


@functools.cache
def _tbx():
  """(event_pb2, summary_pb2, masked_crc32c) of tensorboardX, imported at first use. Its
  package imports torch where that is installed, only to accept torch tensors, which we never
  pass (stt_jax never imports torch): torch is hidden from that import, which saves a
  training process seconds and hundreds of MB."""
  hide = "torch" not in sys.modules
  if hide:
    sys.modules["torch"] = None  # `import torch` raises ImportError, which tensorboardX expects.
  try:
    from tensorboardX.proto import event_pb2, summary_pb2  # pylint: disable=g-import-not-at-top
    from tensorboardX.record_writer import masked_crc32c  # pylint: disable=g-import-not-at-top
  finally:
    if hide:
      del sys.modules["torch"]
  return event_pb2, summary_pb2, masked_crc32c


def _crc(data: bytes) -> int:
  return _tbx()[2](data)


def _frame(payload: bytes) -> bytes:
  """One TFRecord: length, its masked CRC32C, the payload, its masked CRC32C."""
  header = struct.pack("<Q", len(payload))
  return (header + struct.pack("<I", _crc(header)) + payload +
          struct.pack("<I", _crc(payload)))


def _records(data: bytes) -> list[tuple[int, bytes]]:
  """(end offset, payload) of each whole record, up to a torn or damaged one."""
  out, pos = [], 0
  while pos + 12 <= len(data):
    header = data[pos:pos + 8]
    (length,) = struct.unpack("<Q", header)
    end = pos + 12 + length + 4
    if end > len(data) or struct.unpack("<I", data[pos + 8:pos + 12])[0] != _crc(header):
      break
    payload = data[pos + 12:end - 4]
    if struct.unpack("<I", data[end - 4:end])[0] != _crc(payload):
      break
    out.append((end, payload))
    pos = end
  return out


class EventFile:
  """The one event file of a TensorBoard run folder; written by one process at a time."""

  def __init__(self, logdir: str | os.PathLike):
    self.path = os.path.join(os.fspath(logdir), FILE_NAME)

  def _events(self) -> tuple[int, list]:
    """(file size, [(end offset, Event)] of its whole records)."""
    event_pb2 = _tbx()[0]
    try:
      with open(self.path, "rb") as f:
        data = f.read()
    except FileNotFoundError:
      return 0, []
    return len(data), [(end, event_pb2.Event.FromString(p)) for end, p in _records(data)]

  def scalars(self) -> list[tuple[int, float, dict[str, float]]]:
    """(step, wall time, {tag: value}) of each event with scalars, in file order."""
    return [(e.step, e.wall_time, {v.tag: v.simple_value for v in e.summary.value})
            for _, e in self._events()[1] if e.summary.value]

  def rewind(self, step: int | None = None) -> None:
    """Cuts the file after its last whole event at or before `step` (None: after its last
    whole event), dropping points logged past `step` and a torn tail. Assumes the file's
    steps only grow, as `append` in step order keeps them."""
    size, events = self._events()
    keep = 0
    for end, event in events:
      if step is not None and event.step > step and event.HasField("summary"):
        break
      keep = end
    if keep < size:
      logging.warning("tensorboard: %s: dropped %d bytes after step %s (an interrupted run)",
                      self.path, size - keep, step)
      with open(self.path, "rb+") as f:
        f.truncate(keep)
        os.fsync(f.fileno())

  def append(self, points: Iterable[tuple[int, float, Mapping[str, float]]]) -> None:
    """Appends one event per (step, wall time, {tag: value}), flushed and fsync'd."""
    points = list(points)
    if not points:
      return
    os.makedirs(os.path.dirname(self.path), exist_ok=True)
    new = not os.path.exists(self.path) or os.path.getsize(self.path) == 0
    with open(self.path, "ab") as f:
      f.write(_encode(points, new))
      f.flush()
      os.fsync(f.fileno())

  def replace(self, points: Sequence[tuple[int, float, Mapping[str, float]]]) -> None:
    """Replaces the file with these events at once (a reader sees the old file or the new)."""
    tmp = f"{self.path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
      f.write(_encode(points, True))
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, self.path)


def _encode(points: Sequence[tuple[int, float, Mapping[str, float]]], start: bool) -> bytes:
  """The records of one event per (step, wall time, {tag: value}); with `start`, after the
  version record an event file begins with."""
  event_pb2, summary_pb2, _ = _tbx()
  events = []
  if start:
    events.append(event_pb2.Event(wall_time=points[0][1], file_version="brain.Event:2"))
  for step, walltime, scalars in points:
    events.append(event_pb2.Event(step=step, wall_time=walltime, summary=summary_pb2.Summary(
        value=[summary_pb2.Summary.Value(tag=t, simple_value=v) for t, v in scalars.items()])))
  return b"".join(_frame(e.SerializeToString()) for e in events)


# ------------------------------------------------------------------------------ eval


def sync_eval(rows: Sequence[Mapping], logdir_of: Callable[[str], str]) -> None:
  """Adds to each variant's event file (in `logdir_of(variant)`) the eval rows it lacks; a
  (tag, step) already there is never written again (the first row wins). The file stays in
  step order: a point whose step is not above the earlier ones of its tag makes TensorBoard's
  data server drop those (it reads a restart), so a step scored late (a checkpoint skipped,
  then rescored) rewrites the file instead of being appended."""
  by_variant = collections.defaultdict(list)
  for r in rows:
    by_variant[r["variant"]].append(r)
  for variant, mine in by_variant.items():
    events = EventFile(logdir_of(variant))
    events.rewind()  # Only a torn tail goes.
    old = events.scalars()
    have = {(tag, step) for step, _, values in old for tag in values}
    new: dict[int, tuple[float, dict]] = {}
    for r in mine:
      key = (eval_tag(r), int(r["step"]))
      if key not in have:
        have.add(key)
        new.setdefault(key[1], (float(r.get("time", 0.0)), {}))[1][key[0]] = float(r["value"])
    points = [(s, *new[s]) for s in sorted(new)]
    if points and old and points[0][0] < max(s for s, _, _ in old):
      events.replace(sorted(old + points, key=lambda p: p[0]))
    else:
      events.append(points)
