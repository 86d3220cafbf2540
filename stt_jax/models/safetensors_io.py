"""Minimal safetensors reader/writer on numpy memory maps (bf16 included, no torch).

The reader parses the header itself and exposes each tensor as a read-only `np.memmap` view,
so slicing one device's shard touches only those bytes; `release()` drops the pages from the
process afterwards. The writer streams one tensor at a time.
"""

from __future__ import annotations

import dataclasses
import json
import mmap
import os
import struct
from collections.abc import Callable, Iterable

import ml_dtypes
import numpy as np

DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
    "BOOL": np.bool_,
}
NAMES = {np.dtype(v): k for k, v in DTYPES.items()}
_MAX_HEADER = 100 * 1024 * 1024


class SafetensorsError(ValueError):
  """A safetensors file that cannot be read."""


class SafetensorsFile:
  """Read-only, memory-mapped view of one .safetensors file."""

  def __init__(self, path: str):
    self.path = path
    size = os.path.getsize(path)
    with open(path, "rb") as f:
      head = f.read(8)
      if len(head) < 8:
        raise SafetensorsError(f"{path}: truncated safetensors file ({size} bytes); "
                               "re-download or re-export it")
      (n,) = struct.unpack("<Q", head)
      if n > min(_MAX_HEADER, size - 8):
        raise SafetensorsError(f"{path}: corrupt safetensors header (declared length {n}, file "
                               f"{size} bytes); re-download or re-export it")
      try:
        header = json.loads(f.read(n))
      except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SafetensorsError(f"{path}: corrupt safetensors header ({e}); re-download or "
                               "re-export it") from e
    self.metadata = header.pop("__metadata__", None) or {}
    self._data_start = 8 + n
    self._entries = header
    for name, e in header.items():
      if e.get("dtype") not in DTYPES:
        raise SafetensorsError(f"{path}: tensor {name!r} has unsupported dtype {e.get('dtype')!r}")
      begin, end = e["data_offsets"]
      expected = int(np.prod(e["shape"], dtype=np.int64)) * np.dtype(DTYPES[e["dtype"]]).itemsize
      if end - begin != expected or self._data_start + end > size:
        raise SafetensorsError(f"{path}: tensor {name!r} lies outside the file or has the wrong "
                               "byte size (truncated download?); re-download it")
    self._file = open(path, "rb")
    self._mmap = mmap.mmap(self._file.fileno(), 0, access=mmap.ACCESS_READ) if size else None

  def keys(self) -> list[str]:
    return list(self._entries)

  def shape(self, name: str) -> tuple[int, ...]:
    return tuple(self._entries[name]["shape"])

  def dtype(self, name: str) -> np.dtype:
    return np.dtype(DTYPES[self._entries[name]["dtype"]])

  def tensor(self, name: str) -> np.ndarray:
    """A zero-copy, read-only view; slicing it reads only the touched pages."""
    e = self._entries[name]
    begin, _ = e["data_offsets"]
    return np.ndarray(tuple(e["shape"]), dtype=DTYPES[e["dtype"]], buffer=self._mmap,
                      offset=self._data_start + begin)

  def release(self, name: str) -> None:
    """Tells the kernel we are done with a tensor's pages so they leave our RSS."""
    if self._mmap is None or not hasattr(mmap, "MADV_DONTNEED"):
      return
    begin, end = self._entries[name]["data_offsets"]
    start = (self._data_start + begin) // mmap.PAGESIZE * mmap.PAGESIZE
    length = self._data_start + end - start
    if length > 0:
      self._mmap.madvise(mmap.MADV_DONTNEED, start, length)

  def close(self):
    if self._mmap is not None:
      try:
        self._mmap.close()
      except BufferError:  # A caller still holds a view; the OS reclaims it at exit.
        pass
    self._file.close()

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()


@dataclasses.dataclass(frozen=True)
class LazyTensor:
  """A tensor to write: its shape/dtype now, its values only when `fetch()` is called."""

  shape: tuple[int, ...]
  dtype: np.dtype
  fetch: Callable[[], np.ndarray]


def write(path: str, tensors: Iterable[tuple[str, np.ndarray | LazyTensor]],
          metadata: dict[str, str] | None = None) -> None:
  """Writes (name, array) pairs, fetching lazy ones one at a time (peak RAM = one tensor).

  Written to `<path>.tmp` and renamed, so a crash never leaves a valid-looking partial file.
  """
  items = [(name, t if isinstance(t, LazyTensor) else
            LazyTensor(tuple(t.shape), np.dtype(t.dtype), lambda t=t: t)) for name, t in tensors]
  header: dict = {"__metadata__": dict(metadata or {"format": "pt"})}
  offset = 0
  for name, t in items:
    nbytes = int(np.prod(t.shape, dtype=np.int64)) * np.dtype(t.dtype).itemsize
    header[name] = {"dtype": NAMES[np.dtype(t.dtype)], "shape": list(t.shape),
                    "data_offsets": [offset, offset + nbytes]}
    offset += nbytes
  blob = json.dumps(header, separators=(",", ":")).encode()
  blob += b" " * (-len(blob) % 8)
  tmp = path + ".tmp"
  with open(tmp, "wb") as f:
    f.write(struct.pack("<Q", len(blob)))
    f.write(blob)
    for name, t in items:
      value = np.ascontiguousarray(t.fetch())
      if value.shape != tuple(t.shape) or value.dtype != np.dtype(t.dtype):
        raise SafetensorsError(f"{path}: tensor {name!r} produced {value.shape}/{value.dtype}, "
                               f"declared {tuple(t.shape)}/{np.dtype(t.dtype)}")
      f.write(value.tobytes())
  os.replace(tmp, path)
