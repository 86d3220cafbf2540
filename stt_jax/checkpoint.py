"""Orbax checkpoints of a train state: async save every N steps, keep N, restore onto any mesh.

A checkpoint `<dir>/<step>/` holds two items: `state` (a pytree of arrays: step, trainable
params, optimizer state, rng) and `meta` (JSON: data-iterator position, anything small).
Orbax writes each step into a temporary folder and renames it when complete, so a process
killed mid-save leaves no `<step>/` folder, only a tmp one that is ignored (and removed when
the trainer reopens the folder). Restoring takes an abstract target (ShapeDtypeStructs with
the *new* shardings), so a state saved on one mesh loads onto another. A step that fails to
restore (truncated or corrupt files) is moved aside to `<dir>.corrupt/` with a warning and the
previous one is tried.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from collections.abc import Mapping
from typing import Any

import jax
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils


class CheckpointError(RuntimeError):
  """A checkpoint step that exists but cannot be read (truncated or corrupt files)."""


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
    self._manager = ocp.CheckpointManager(self.directory, options=options)
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

  def restore(self, abstract_state: Any, step: int | None = None
              ) -> tuple[int, Any, dict[str, Any]] | None:
    """(step, state, meta) of `step`, or of the newest readable checkpoint when None; None if
    there is none. `abstract_state` gives shapes, dtypes and target shardings."""
    candidates = [step] if step is not None else self.steps()[::-1]
    for s in candidates:
      try:
        out = self._manager.restore(s, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()))
      except Exception as e:  # pylint: disable=broad-exception-caught
        if step is not None:
          raise CheckpointError(f"checkpoints: step {s} in {self.directory} cannot be restored "
                                f"({type(e).__name__}: {str(e)[:300]})") from e
        logging.warning("checkpoints: step %d in %s cannot be restored (%s: %s); %s and trying "
                        "the previous one", s, self.directory, type(e).__name__, str(e)[:300],
                        "skipping it" if self.read_only else
                        f"moving it to {self.directory}.corrupt/")
        if not self.read_only:
          self._quarantine(s)
        continue
      return s, out.state, dict(out.meta)
    return None

  def _quarantine(self, step: int) -> None:
    """Moves an unreadable step out of the way so a later save of that step can succeed."""
    if jax.process_index() == 0:
      dest = os.path.join(self.directory + ".corrupt", f"{step}-{int(time.time())}")
      os.makedirs(os.path.dirname(dest), exist_ok=True)
      shutil.move(os.path.join(self.directory, str(step)), dest)
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices(f"checkpoint_quarantine_{step}")
    self._manager.reload()


def _listdir(path: str) -> list[str]:
  return sorted(os.listdir(path)) if os.path.isdir(path) else []


def abstract(tree: Any, shardings: Any) -> Any:
  """ShapeDtypeStructs of `tree` (arrays or ShapeDtypeStructs) with the given shardings."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      tree, shardings)
