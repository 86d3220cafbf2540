"""Orbax checkpoints of a train state: async save every N steps, keep N, restore onto any mesh.

A checkpoint `<dir>/<step>/` holds two items: `state` (a pytree of arrays: step, trainable
params, optimizer state, rng) and `meta` (JSON: data-iterator position, anything small).
Orbax writes each step into a temporary folder and renames it when complete, so a process
killed mid-save leaves no `<step>/` folder, only a tmp one that is ignored (and removed when
the trainer reopens the folder). Restoring takes an abstract target (ShapeDtypeStructs with
the *new* shardings), so a state saved on one mesh loads onto another. Evaluation restores the
`params` alone (`restore_params`): no optimizer state is read or allocated.

A failed restore is told apart by kind, because each needs a different answer:
- the saved state does not fit the requested one (a changed `train.lora.rank`, method, ...):
  `CheckpointMismatchError`, one line naming the changed setting; nothing is moved;
- the storage failed to answer (an OSError, or tensorstore's UNAVAILABLE / DEADLINE_EXCEEDED /
  PERMISSION_DENIED ...): retried once, then `CheckpointIOError`; nothing is moved;
- the data itself is unreadable (truncated or missing files): the step is moved aside to
  `<dir>.corrupt/` with a warning and the previous one is tried.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import shutil
import time
from collections.abc import Callable, Mapping
from typing import Any

import jax
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from stt_jax import errors


class CheckpointError(RuntimeError):
  """A checkpoint step that exists but cannot be read (truncated or corrupt files)."""


class CheckpointIOError(OSError):
  """The storage did not answer a checkpoint read (after one retry); the data may be fine."""


class CheckpointMismatchError(ValueError):
  """A checkpoint whose shapes or structure do not fit the state the run asks for."""


# What `restore_params` says of requested parameters that were never saved.
_NOT_SAVED = "are not in the saved state"
# Phrases of orbax's errors (and ours) for a requested state that does not fit the saved one.
_MISMATCH = ("not compatible with the stored shape", "tree structures do not match",
             "Requested shape", _NOT_SAVED)
# tensorstore status codes of a storage that failed to answer (not of damaged data), and
# errno values of the same.
_IO_STATUS = ("UNAVAILABLE", "DEADLINE_EXCEEDED", "PERMISSION_DENIED", "RESOURCE_EXHAUSTED",
              "ABORTED", "CANCELLED")
_IO_ERRNO = (errno.EIO, errno.EAGAIN, errno.ETIMEDOUT, errno.ECONNRESET, errno.EACCES,
             errno.EPERM, errno.ENOSPC, errno.ESTALE, errno.EINTR)


def error_kind(error: BaseException) -> str:
  """'mismatch', 'io' or 'corrupt': why a restore failed (see the module docstring)."""
  for e in errors.chain(error):
    text = str(e)
    if isinstance(e, ValueError) and any(p in text for p in _MISMATCH):
      return "mismatch"
    if isinstance(e, OSError) and not isinstance(e, FileNotFoundError) and (
        e.errno is None or e.errno in _IO_ERRNO):
      return "io"
    code = re.search(r"os_error_code='?(\d+)", text)
    if text.split(":", 1)[0].strip() in _IO_STATUS or (code and int(code.group(1)) in _IO_ERRNO):
      return "io"
  return "corrupt"


def changed_settings(saved: Any, now: Any, prefix: str = "") -> list[str]:
  """'key: saved -> now' for every leaf of two nested settings dicts that differs."""
  if isinstance(saved, Mapping) and isinstance(now, Mapping):
    out = []
    for key in sorted(set(saved) | set(now), key=str):
      name = f"{prefix}.{key}" if prefix else str(key)
      out += changed_settings(saved.get(key, "<unset>"), now.get(key, "<unset>"), name)
    return out
  norm = lambda v: list(v) if isinstance(v, (list, tuple)) else v
  return [] if norm(saved) == norm(now) else [f"{prefix}={saved!r} (now {now!r})"]


class Checkpoints:
  """A thin wrapper of `ocp.CheckpointManager` with the save/restore policy of training."""

  def __init__(self, directory: str | os.PathLike, *, every: int = 1, keep: int = 0,
               async_save: bool = True, read_only: bool = False):
    """read_only: for readers beside a running trainer (evaluation): never saves, deletes,
    cleans up or moves anything, so it cannot disturb a save in progress."""
    if every <= 0:
      raise ValueError(f"checkpoint.every must be positive, got {every}")
    self.directory = os.path.abspath(os.fspath(directory))
    self.every = int(every)
    self.read_only = read_only
    tmp_dirs = [d for d in _listdir(self.directory) if ".orbax-checkpoint-tmp" in d]
    if tmp_dirs and not read_only:
      logging.warning("checkpoints: removing unfinished save(s) %s in %s (a run stopped while "
                      "saving)", tmp_dirs, self.directory)
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep if keep > 0 and not read_only else None,
        enable_async_checkpointing=async_save and not read_only,
        cleanup_tmp_directories=not read_only, create=not read_only, read_only=read_only)
    self._manager = ocp.CheckpointManager(self.directory, options=options,
                                          handler_registry=_handlers())
    self._last_saved: int | None = None

  # --------------------------------------------------------------------------- save

  def should_save(self, step: int) -> bool:
    return step > 0 and step % self.every == 0

  def save(self, step: int, state: Any, meta: Mapping[str, Any], *, force: bool = False) -> bool:
    """Saves (asynchronously when configured) if `step` is due or `force`; returns whether a
    save started. Arrays are copied off device before this returns, so the caller may donate
    `state` to the next step."""
    if self.read_only:
      raise RuntimeError(f"checkpoints in {self.directory} were opened read-only")
    if not (force or self.should_save(step)) or step == self._last_saved or step in self.steps():
      return False
    self._manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(dict(meta))), force=True)
    self._last_saved = step
    return True

  def reached_preemption(self, step: int) -> bool:
    """True on every host at the same step once JAX's preemption service saw a SIGTERM
    (multi-host TPU runs); always False in a single process."""
    return jax.process_count() > 1 and self._manager.reached_preemption(step)

  def wait(self) -> None:
    """Blocks until pending async saves are on disk."""
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.close()

  # --------------------------------------------------------------------------- restore

  def steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def latest_step(self) -> int | None:
    steps = self.steps()
    return steps[-1] if steps else None

  def restore(self, abstract_state: Any, step: int | None = None,
              settings: Mapping[str, Mapping] | None = None
              ) -> tuple[int, Any, dict[str, Any]] | None:
    """(step, state, meta) of `step`, or of the newest readable checkpoint when None; None if
    there is none. `abstract_state` gives shapes, dtypes and target shardings.

    settings: {meta key: the run's current settings}, e.g. {"train": t.to_dict()}: when the
    saved state does not fit, the error names the settings that changed since the save.
    Raises CheckpointMismatchError (state does not fit), CheckpointIOError (storage failed
    twice), CheckpointError (`step` given and its data unreadable).
    """
    args = ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state),
                              meta=ocp.args.JsonRestore())
    found = self._restore_first(lambda s: self._manager.restore(s, args=args), step, settings)
    if found is None:
      return None
    s, out = found
    return s, out.state, dict(out.meta)

  def restore_params(self, abstract_params: Any, step: int | None = None,
                     settings: Mapping[str, Mapping] | None = None) -> tuple[int, Any] | None:
    """(step, params): only the state's `params` item, e.g. for evaluation.

    The optimizer state is neither read nor allocated (it need not even be on disk). Same
    choice of step and same errors as `restore`; a requested parameter the checkpoint lacks
    (another train.method, other LoRA targets) is a CheckpointMismatchError.
    """
    target = {"params": abstract_params}
    args = ocp.args.Composite(state=ocp.args.PyTreeRestore(
        item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
        partial_restore=True))

    def read(s: int) -> Any:
      params = self._manager.restore(s, args=args).state["params"]
      _check_restored(abstract_params, params)
      return params

    return self._restore_first(read, step, settings)

  def _restore_first(self, read: Callable[[int], Any], step: int | None,
                     settings: Mapping[str, Mapping] | None) -> tuple[int, Any] | None:
    """(step, read(step)) of `step`, else of the newest step that reads; the error policy of
    the module docstring (retry io once, name changed settings, skip or raise corrupt)."""
    candidates = [step] if step is not None else self.steps()[::-1]
    for s in candidates:
      try:
        return s, self._read_retrying(read, s)
      except CheckpointIOError:
        raise
      except Exception as e:  # pylint: disable=broad-exception-caught
        kind = error_kind(e)
        if kind == "mismatch":
          raise self._mismatch(s, e, settings) from e
        if step is not None:
          raise CheckpointError(f"checkpoints: step {s} in {self.directory} cannot be "
                                f"restored ({_short(e)})") from e
        logging.warning("checkpoints: step %d in %s cannot be restored (%s); %s and trying "
                        "the previous one", s, self.directory, _short(e),
                        "skipping it" if self.read_only else
                        f"moving it to {self.directory}.corrupt/")
        if not self.read_only:
          self._quarantine(s)
    return None

  def _read_retrying(self, read: Callable[[int], Any], step: int) -> Any:
    """read(step), once more after a storage error; CheckpointIOError if that fails too."""
    try:
      return read(step)
    except Exception as e:  # pylint: disable=broad-exception-caught
      if error_kind(e) != "io":
        raise
      logging.warning("checkpoints: reading step %d in %s failed (%s); retrying once", step,
                      self.directory, _short(e))
    try:
      return read(step)
    except Exception as e:  # pylint: disable=broad-exception-caught
      if error_kind(e) == "io":
        raise CheckpointIOError(
            f"checkpoints: reading step {step} in {self.directory} failed twice "
            f"({_short(e)}); nothing was moved or deleted. Check the storage and rerun") from e
      raise

  def _mismatch(self, step: int, error: BaseException,
                settings: Mapping[str, Mapping] | None) -> CheckpointMismatchError:
    """One line: which settings changed since `step` was saved, and the two ways out."""
    changed = []
    if settings:
      try:
        meta = self._manager.restore(step, args=ocp.args.Composite(
            meta=ocp.args.JsonRestore())).meta or {}
      except Exception:  # pylint: disable=broad-exception-caught
        meta = {}
      for key, now in settings.items():
        if key in meta:
          changed += changed_settings(meta[key], dict(now), key)
    what = (f"it was saved with {', '.join(changed[:4])}" if changed else
            f"its arrays do not fit this run's state ({_short(error, 160)})")
    return CheckpointMismatchError(
        f"checkpoints: step {step} in {self.directory} does not fit this config: {what}. Set "
        "the saved value(s) again to continue it, or use a new --workdir to start over; "
        "nothing was moved")

  def _quarantine(self, step: int) -> None:
    """Moves an unreadable step out of the way so a later save of that step can succeed."""
    if jax.process_index() == 0:
      dest = os.path.join(self.directory + ".corrupt", f"{step}-{int(time.time())}")
      os.makedirs(os.path.dirname(dest), exist_ok=True)
      shutil.move(os.path.join(self.directory, str(step)), dest)
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices(f"checkpoint_quarantine_{step}")
    self._manager.reload()


def _check_restored(want: Any, got: Any) -> None:
  """Raises a mismatch ValueError unless `got` has every leaf of `want`, in its shape. A
  partial restore hands back the request itself for keys the checkpoint lacks, and (without
  target shardings) arrays of the saved shape."""
  pairs = zip(jax.tree_util.tree_flatten_with_path(want)[0], jax.tree.leaves(got))
  missing, wrong = [], []
  for (path, w), g in pairs:
    if isinstance(g, jax.ShapeDtypeStruct):
      missing.append(jax.tree_util.keystr(path))
    elif g.shape != w.shape:
      wrong.append(f"params{jax.tree_util.keystr(path)}: Requested shape: {w.shape} is not "
                   f"compatible with the stored shape: {g.shape}")
  if missing:
    raise ValueError(f"{len(missing)} requested params (e.g. params{missing[0]}) {_NOT_SAVED}")
  if wrong:
    raise ValueError(wrong[0])


def _handlers() -> ocp.handlers.DefaultCheckpointHandlerRegistry:
  """Item handlers of one manager for both reads: the whole `state` (StandardRestore) and its
  params alone (PyTreeRestore, partial). Orbax otherwise binds an item to the first handler
  it is used with and refuses the other."""
  registry = ocp.handlers.DefaultCheckpointHandlerRegistry()
  standard, meta = ocp.StandardCheckpointHandler(), ocp.JsonCheckpointHandler()
  registry.add("state", ocp.args.StandardSave, standard)
  registry.add("state", ocp.args.StandardRestore, standard)
  registry.add("state", ocp.args.PyTreeRestore, ocp.PyTreeCheckpointHandler())
  registry.add("meta", ocp.args.JsonSave, meta)
  registry.add("meta", ocp.args.JsonRestore, meta)
  return registry


def _short(error: BaseException, limit: int = 300) -> str:
  """`Type: first line of the message`, cut: tensorstore messages run to pages."""
  first = (str(error).strip().splitlines() or [""])[0]
  return f"{type(error).__name__}: {first[:limit]}"


def _listdir(path: str) -> list[str]:
  return sorted(os.listdir(path)) if os.path.isdir(path) else []


def abstract(tree: Any, shardings: Any) -> Any:
  """ShapeDtypeStructs of `tree` (arrays or ShapeDtypeStructs) with the given shardings."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      tree, shardings)
