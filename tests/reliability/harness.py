"""Runs pipeline stages as real subprocesses, interrupts them, and snapshots what they wrote.

A stage's outputs are reduced to what must not depend on interruptions (no timings), so a
killed-then-rerun workdir can be compared with an uninterrupted one. `finished_work` lists
what was durable at the moment of a kill; `lost_bytes` says how much of it a rerun lost.
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TASK_LANG = "xnli_zh"
VARIANTS = ("zero_shot", "self_translate", "self_translate_cs")  # configs/tiny.py's
# Async saves, so that a kill can land while a checkpoint is being written.
COMMON = ("--config.checkpoint.async_save=True",)
STAGES = ("translate", "train", "eval")
STAGE_OUTPUTS = {"translate": ("translations",), "train": ("runs",), "eval": ("eval",)}
WRITE_POINTS = {"translate": "translate.append", "train": "train.log", "eval": "eval.append"}


# A JAX persistent compilation cache warmed by the reference run (use_compile_cache): every
# later stage process starts from its own copy, so it loads the tiny model's programs instead
# of compiling them (about half of each process's time on 2 cores). A copy per process: JAX
# writes cache entries in place, and a process killed mid-write (or two processes of one
# multi-host run writing the same entry) must not leave a torn entry for another process.
_compile_cache: dict = {}  # {"path": str, "shared": bool} once set.


def use_compile_cache(path: str, *, shared: bool = False) -> None:
  """Processes started from now on use the compilation cache at `path`: itself when `shared`
  (the uninterrupted reference runs, which are never killed), else a fresh copy each."""
  _compile_cache.update(path=path, shared=shared)


def _cache_env() -> dict:
  if not _compile_cache:
    return {}
  path = _compile_cache["path"]
  if not _compile_cache["shared"]:
    copy = tempfile.mkdtemp(prefix="copy_", dir=os.path.dirname(path))
    shutil.copytree(path, copy, dirs_exist_ok=True)
    path = copy
  return {"JAX_COMPILATION_CACHE_DIR": path, "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
          "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}


def env(**extra: str) -> dict:
  out = dict(os.environ)
  for key in ("STT_JAX_FAULT", "STT_JAX_FAULT_TRACE", "JAX_COMPILATION_CACHE_DIR"):
    out.pop(key, None)
  out.update(XLA_FLAGS="--xla_force_host_platform_device_count=2", PYTHONPATH=ROOT,
             **_cache_env(), **extra)
  return out


def command(workdir: str, model: str, stage: str, *extra: str) -> list[str]:
  return [sys.executable, "-m", "stt_jax.main", "--config=configs/tiny.py",
          f"--workdir={workdir}", f"--config.model.path={model}",
          f"--config.stages=('{stage}',)", *COMMON, *extra]


def run(workdir: str, model: str, stage: str, *extra: str, fault: str | None = None,
        trace: str | None = None, max_file_bytes: int | None = None,
        timeout: float = 600) -> subprocess.CompletedProcess:
  """One stage in a fresh process; `fault` = STT_JAX_FAULT (see stt_jax/faults.py);
  `max_file_bytes`: the kernel refuses to grow any file past it (RLIMIT_FSIZE; Python
  ignores SIGXFSZ, so the write fails with EFBIG, like a full disk)."""
  more = {}
  if fault:
    more["STT_JAX_FAULT"] = fault
  if trace:
    more["STT_JAX_FAULT_TRACE"] = trace
  cmd = command(workdir, model, stage, *extra)
  if max_file_bytes:  # Set in a tiny launcher that then execs the stage (no fork hooks).
    cmd = [sys.executable, "-c", "import os, resource, sys; resource.setrlimit("
           f"resource.RLIMIT_FSIZE, ({max_file_bytes}, {max_file_bytes})); "
           "os.execv(sys.executable, [sys.executable] + sys.argv[1:])", *cmd[1:]]
  return subprocess.run(cmd, cwd=ROOT, env=env(**more), capture_output=True, text=True,
                        timeout=timeout)


def run_killed_after(workdir: str, model: str, stage: str, seconds: float
                     ) -> subprocess.CompletedProcess:
  """The stage, sent SIGKILL from outside after `seconds` (if it is still running)."""
  proc = subprocess.Popen(command(workdir, model, stage), cwd=ROOT, env=env(),
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  try:
    out, err = proc.communicate(timeout=seconds)
  except subprocess.TimeoutExpired:
    proc.send_signal(signal.SIGKILL)
    out, err = proc.communicate()
  return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def check_ok(proc: subprocess.CompletedProcess) -> None:
  if proc.returncode != 0:
    raise AssertionError(f"exit {proc.returncode}:\n{proc.stderr[-4000:]}")


def prepare(reference: str, workdir: str, stage: str) -> None:
  """A workdir holding the reference's outputs of the stages before `stage`."""
  os.makedirs(workdir)
  order = list(STAGE_OUTPUTS)
  for earlier in order[:order.index(stage)]:
    for name in STAGE_OUTPUTS[earlier]:
      shutil.copytree(os.path.join(reference, name), os.path.join(workdir, name))


# ------------------------------------------------------------------------------ points


def read_trace(path: str) -> list[tuple[str, float]]:
  """(point, unix time) of every fault point a run passed, in order."""
  with open(path, encoding="utf-8") as f:
    return [(name, float(t)) for name, t in (line.split() for line in f)]


def pick_points(trace: list[str], k: int, rng: np.random.Generator) -> list[str]:
  """k distinct seeded places of an uninterrupted run, as STT_JAX_FAULT `<name>:<n>` specs."""
  chosen = sorted(rng.choice(len(trace), size=min(k, len(trace)), replace=False))
  return [f"{trace[i]}:{trace[:i + 1].count(trace[i])}" for i in chosen]


# ------------------------------------------------------------------------------ snapshots


def _lines(path: str) -> list[str]:
  """The complete lines of a file (a torn last line is not one)."""
  if not os.path.isfile(path):
    return []
  with open(path, encoding="utf-8", errors="replace") as f:
    return [line for line in f if line.endswith("\n")]


def _json_rows(path: str) -> list[dict]:
  return [json.loads(line) for line in _lines(path)]


def _read(path: str) -> str | None:
  if not os.path.isfile(path):
    return None
  with open(path, encoding="utf-8") as f:
    return f.read()


def _drop(d: dict, *keys: str) -> dict:
  return {k: v for k, v in d.items() if k not in keys}


def translate_outputs(workdir: str) -> dict:
  folder = os.path.join(workdir, "translations")
  stats = json.loads(_read(os.path.join(folder, f"{TASK_LANG}.stats.json")) or "{}")
  stats = _drop(stats, "throughput", "wall_s")
  stats["segments"] = _drop(stats.get("segments", {}), "decoded_this_run", "cached")
  if "roundtrip" in stats:  # The back pass, when a run lists self_translate_rt.
    stats["roundtrip"] = _drop(stats["roundtrip"], "throughput")
    stats["roundtrip"]["segments"] = _drop(stats["roundtrip"]["segments"], "decoded_this_run",
                                           "cached")
  cache = sorted(line for path in glob.glob(os.path.join(folder, "cache", "*.jsonl"))
                 for line in _lines(path))
  return {"train": _read(os.path.join(folder, f"{TASK_LANG}.train.jsonl")),
          "cs": _read(os.path.join(folder, f"{TASK_LANG}.cs.jsonl")),
          "train_rt": _read(os.path.join(folder, f"{TASK_LANG}.train_rt.jsonl")),
          "roundtrip": _read(os.path.join(folder, f"{TASK_LANG}.roundtrip.jsonl")),
          "marker": _read(os.path.join(folder, f"{TASK_LANG}.done.json")),
          "stats": stats, "cache": cache}


def checkpoint_arrays(step_dir: str) -> dict[str, np.ndarray]:
  """Every array of a saved train state, read as numpy (any device count)."""
  import jax  # pylint: disable=g-import-not-at-top
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  path = os.path.join(step_dir, "state")
  ckptr = ocp.PyTreeCheckpointer()
  tree = ckptr.metadata(path)
  tree = getattr(tree, "item_metadata", tree)
  tree = getattr(tree, "tree", tree)
  args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
  state = ckptr.restore(path, args=ocp.args.PyTreeRestore(restore_args=args))
  return {jax.tree_util.keystr(k): np.asarray(v)
          for k, v in jax.tree_util.tree_flatten_with_path(state)[0]}


def finalized_steps(ckpt_dir: str) -> list[int]:
  if not os.path.isdir(ckpt_dir):
    return []
  return sorted(int(d) for d in os.listdir(ckpt_dir) if d.isdigit())


def train_outputs(workdir: str) -> dict:
  out = {}
  for variant in VARIANTS:
    run_dir = os.path.join(workdir, "runs", variant)
    ckpt_dir = os.path.join(run_dir, "checkpoints")
    steps = finalized_steps(ckpt_dir)
    rows = [_drop(r, "tokens_per_s", "mfu", "time")
            for r in _json_rows(os.path.join(run_dir, "train", "metrics.jsonl"))]
    done = json.loads(_read(os.path.join(run_dir, "train_done.json")) or "null")
    out[variant] = {"steps": steps, "rows": rows,
                    "done_step": done and done["step"],
                    "leftovers": sorted(d for d in os.listdir(ckpt_dir) if not d.isdigit())
                                 if os.path.isdir(ckpt_dir) else [],
                    "arrays": {s: checkpoint_arrays(os.path.join(ckpt_dir, str(s)))
                               for s in steps}}
  return out


def eval_outputs(workdir: str) -> dict:
  rows = sorted((_drop(r, "time", "seconds")
                 for r in _json_rows(os.path.join(workdir, "eval", "metrics.jsonl"))),
                key=lambda r: json.dumps(r, sort_keys=True))
  preds = {os.path.basename(p): _read(p)
           for p in glob.glob(os.path.join(workdir, "eval", "predictions", "*.jsonl"))}
  return {"rows": rows, "predictions": preds}


def assert_same_train(got: dict, want: dict) -> None:
  for variant in VARIANTS:
    g, w = got[variant], want[variant]
    assert g["steps"] == w["steps"], (variant, g["steps"], w["steps"])
    assert g["done_step"] == w["done_step"], variant
    assert g["leftovers"] == [], (variant, g["leftovers"])
    assert [r["step"] for r in g["rows"]] == [r["step"] for r in w["rows"]], variant
    for gr, wr in zip(g["rows"], w["rows"]):
      for key in ("loss", "loss_mean", "lr", "grad_norm"):
        np.testing.assert_allclose(gr[key], wr[key], rtol=1e-6, err_msg=f"{variant} {key}")
      assert _drop(gr, "loss", "loss_mean", "lr", "grad_norm") == _drop(
          wr, "loss", "loss_mean", "lr", "grad_norm"), variant
    for step in w["steps"]:
      assert g["arrays"][step].keys() == w["arrays"][step].keys()
      for name, value in w["arrays"][step].items():
        np.testing.assert_allclose(g["arrays"][step][name], value, rtol=1e-6, atol=1e-7,
                                   err_msg=f"{variant}@{step} {name}")


def assert_same_eval(got: dict, want: dict) -> None:
  assert got["predictions"] == want["predictions"]
  assert len(got["rows"]) == len(want["rows"])  # No row missing, none twice.
  for g, w in zip(got["rows"], want["rows"]):
    assert _drop(g, "value", "ci_low", "ci_high") == _drop(w, "value", "ci_low", "ci_high")
    np.testing.assert_allclose([g["value"], g["ci_low"], g["ci_high"]],
                               [w["value"], w["ci_low"], w["ci_high"]], rtol=1e-9)


# ------------------------------------------------------------------------------ lost work


def _digest(path: str) -> str:
  with open(path, "rb") as f:
    return hashlib.sha256(f.read()).hexdigest()


@dataclasses.dataclass
class FinishedWork:
  """What was durable when a stage was killed: complete lines of append-only files and
  finished files (checkpoints, atomically written outputs), with their sizes."""
  lines: dict[str, list[str]]
  files: dict[str, tuple[str, int]]


def finished_work(workdir: str) -> FinishedWork:
  lines = {}
  for pattern in ("translations/cache/*.jsonl", "eval/metrics.jsonl"):
    for path in glob.glob(os.path.join(workdir, pattern)):
      lines[os.path.relpath(path, workdir)] = _lines(path)
  for variant in VARIANTS:
    ckpt_dir = os.path.join(workdir, "runs", variant, "checkpoints")
    steps = finalized_steps(ckpt_dir)
    # Train log rows up to the newest checkpoint are finished; later ones are retrained.
    path = os.path.join(workdir, "runs", variant, "train", "metrics.jsonl")
    last = steps[-1] if steps else 0
    lines[os.path.relpath(path, workdir)] = [
        line for line in _lines(path) if json.loads(line)["step"] <= last]
  paths = [path for pattern in ("translations/*.jsonl", "eval/predictions/*.jsonl",
                                 "runs/*/train_done.json")
           for path in glob.glob(os.path.join(workdir, pattern))]
  for variant in VARIANTS:  # Finished checkpoints (not an unfinished save's tmp folder).
    ckpt_dir = os.path.join(workdir, "runs", variant, "checkpoints")
    for step in finalized_steps(ckpt_dir):
      paths += glob.glob(os.path.join(ckpt_dir, str(step), "**"), recursive=True)
  files = {os.path.relpath(p, workdir): (_digest(p), os.path.getsize(p))
           for p in paths if os.path.isfile(p)}
  return FinishedWork(lines, files)


def lost_bytes(before: FinishedWork, workdir: str) -> int:
  """Bytes of `before` that are gone from (or changed in) the workdir now."""
  lost = 0
  for rel, old in before.lines.items():
    now = set(_lines(os.path.join(workdir, rel)))
    lost += sum(len(line.encode()) for line in old if line not in now)
  for rel, (digest, size) in before.files.items():
    path = os.path.join(workdir, rel)
    if not os.path.isfile(path) or _digest(path) != digest:
      lost += size
  return lost


def record(name: str, **fields) -> None:
  """Appends a case's numbers to $STT_JAX_RELIABILITY_LOG (docs/reliability.md's table)."""
  path = os.environ.get("STT_JAX_RELIABILITY_LOG")
  if path:
    with open(path, "a", encoding="utf-8") as f:
      f.write(json.dumps({"case": name, "time": time.time(), **fields}) + "\n")


OUTPUTS = {"translate": translate_outputs, "train": train_outputs, "eval": eval_outputs}


def assert_same(stage: str, got: dict, want: dict) -> None:
  """A stage's outputs equal the reference's (up to float noise for train/eval numbers)."""
  if stage == "train":
    assert_same_train(got, want)
  elif stage == "eval":
    assert_same_eval(got, want)
  else:
    assert got == want
