"""The command-line plumbing every entry point shares: flags, process start-up, one-line errors.

`python -m stt_jax.main` (the pipeline), `python -m stt_jax.stages.evaluate` (the separate eval
loop; alias `python -m stt_jax.evaluate`) and `python -m stt_jax.budgets` parse the same
--config/--workdir flags, start `jax.distributed` the same way, and end known input errors
(and a full disk, and a lost peer process) as one line. Kept apart from the stages so that no
entry point imports another.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import sys
import sysconfig
import time

from absl import app, flags
from ml_collections import config_flags

from stt_jax import errors, run_config
from stt_jax.workdir import Workdir

_CONFIG = config_flags.DEFINE_config_file("config", None, "Run config file (configs/*.py).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Folder for every output of the run.")
_COORDINATOR = flags.DEFINE_string(
    "coordinator", os.environ.get("STT_JAX_COORDINATOR"),
    "host:port of process 0 for multi-process runs (TPU VMs find it themselves).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes",
                                      int(os.environ.get("STT_JAX_NUM_PROCESSES", "0")) or None,
                                      "Number of processes (multi-process runs).")
_PROCESS_ID = flags.DEFINE_integer("process_id",
                                   int(os.environ["STT_JAX_PROCESS_ID"])
                                   if "STT_JAX_PROCESS_ID" in os.environ else None,
                                   "This process's index (multi-process runs).")


def init_distributed() -> None:
  """jax.distributed.initialize for multi-process runs; a no-op for one process."""
  import jax  # pylint: disable=g-import-not-at-top
  if _COORDINATOR.value:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=_COORDINATOR.value,
                               num_processes=_NUM_PROCESSES.value, process_id=_PROCESS_ID.value)
  elif os.environ.get("TPU_WORKER_HOSTNAMES") or os.environ.get("MEGASCALE_COORDINATOR_ADDRESS"):
    jax.distributed.initialize()


def setup():
  """Validated config and absolute workdir; saves workdir/config.json (process 0)."""
  cfg, workdir = _CONFIG.value, _WORKDIR.value
  if cfg is None:
    raise app.UsageError("--config is required, e.g. --config=configs/mgsm_th.py")
  if not workdir:
    raise app.UsageError("--workdir is required")
  run_config.validate(cfg)
  if not cfg.model.path:
    raise run_config.ConfigKeyError("config: 'model.path' is empty; set it to a local Hugging "
                                    "Face folder (e.g. --config.model.path=/models/Llama-2-7b-hf)")
  if not os.path.isfile(os.path.join(cfg.model.path, "config.json")):
    raise run_config.ConfigKeyError(
        f"config: model.path={cfg.model.path!r} is not a Hugging Face model folder (no "
        "config.json); download it first (the demo model: python -m stt_jax.models.fetch_demo)")
  init_distributed()
  import jax  # pylint: disable=g-import-not-at-top
  workdir = os.path.abspath(workdir)
  if jax.process_index() == 0:
    os.makedirs(workdir, exist_ok=True)
    save_config(cfg, workdir)
  return cfg, workdir


def save_config(cfg, workdir: str) -> None:
  """Writes config.json; a rerun with a different config keeps the old one beside it."""
  wd = Workdir(workdir)
  path = wd.config
  text = json.dumps(cfg.to_dict(), indent=2, sort_keys=True, default=str)
  if os.path.isfile(path):
    with open(path, encoding="utf-8") as f:
      old = f.read()
    if old.rstrip("\n") == text:
      return
    backup = wd.config_backup(int(time.time()))
    os.replace(path, backup)
    logging.warning("main: config differs from the one this workdir was started with (kept "
                    "as %s); finished stages are not redone", backup)
  from stt_jax import appendlog  # pylint: disable=g-import-not-at-top
  appendlog.write_atomic(path, text + "\n")


class _QuietLibraries(logging.Filter):
  """Drops the INFO chatter of orbax (a line per file per save) from the absl log."""

  def filter(self, record: logging.LogRecord) -> bool:
    return record.levelno > logging.INFO or "/orbax/" not in record.pathname


def quiet_logs() -> None:
  from absl import logging as absl_logging  # pylint: disable=g-import-not-at-top
  absl_logging.get_absl_handler().addFilter(_QuietLibraries())


def one_line_errors(fn):
  """Known input errors end as one line naming the problem and the fix, not a traceback."""

  def wrapped(argv):
    from stt_jax import preflight, sharding, train, train_data  # pylint: disable=g-import-not-at-top
    from stt_jax.checkpoint import CheckpointIOError, CheckpointMismatchError  # pylint: disable=g-import-not-at-top
    from stt_jax.decode import DecodeError  # pylint: disable=g-import-not-at-top
    from stt_jax.models import ConfigError, LoadError  # pylint: disable=g-import-not-at-top
    from stt_jax.models.attention import AttentionError  # pylint: disable=g-import-not-at-top
    from stt_jax.models.safetensors_io import SafetensorsError  # pylint: disable=g-import-not-at-top
    from stt_jax.tasks import DataNotFoundError  # pylint: disable=g-import-not-at-top
    known = (run_config.ConfigKeyError, ConfigError, LoadError, SafetensorsError,
             DataNotFoundError, train_data.DataError, sharding.ShardingError,
             train.NonFiniteLossError, preflight.PreflightError, CheckpointMismatchError,
             CheckpointIOError, DecodeError, AttentionError)
    try:
      return fn(argv)
    except known as e:
      sys.stderr.write(f"error: {e}\n")
      sys.exit(1)
    except Exception as e:  # pylint: disable=broad-exception-caught
      from stt_jax import hosts  # pylint: disable=g-import-not-at-top
      if hosts.peer_lost(e):
        import jax  # pylint: disable=g-import-not-at-top
        last_line(f"error: process {jax.process_index()} of {jax.process_count()} lost "
                  f"another process of this run ({' '.join(str(e).split())[:160]}); rerun the "
                  "same command on every host: finished work is kept")
      full = disk_full(e)
      if full is None:
        raise
      last_line(f"error: disk full while writing {full.filename or 'an output'} "
                f"({full.strerror}); free space or move --workdir, then rerun the same "
                "command: finished work is kept")

  return wrapped


def last_line(line: str) -> None:
  """Prints `line` as the process's very last output and exits with 1 at once.

  After a failed async checkpoint save, tensorstore's threads keep printing tracebacks
  ("Event loop is closed") straight to fd 2. Every other writer is pointed at /dev/null
  first, so nothing can follow or split the line; every finished output is fsync'd already.
  """
  logging.disable(logging.CRITICAL)
  sys.stdout.flush()
  sys.stderr.flush()
  err = os.dup(2)
  devnull = os.open(os.devnull, os.O_WRONLY)
  os.dup2(devnull, 1)
  os.dup2(devnull, 2)
  os.write(err, f"\n{line}\n".encode())  # On a fresh line even after a torn one.
  os._exit(1)  # pylint: disable=protected-access


_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


def disk_full(error: BaseException) -> OSError | None:
  """An OSError saying the disk (or quota, or file size limit) is full, if that is what
  `error` or anything it was raised from is. Checkpoint writes fail inside tensorstore, which
  raises ValueError("... Failed writing: "<path>" ... [os_error_code='28']"): read that too."""
  for e in errors.chain(error):
    if isinstance(e, OSError) and e.errno in _FULL:
      return e
    code = re.search(r"os_error_code='(\d+)'", str(e))
    if code and int(code.group(1)) in _FULL:
      path = re.search(r'Failed writing: "([^"]+)"', str(e))
      return OSError(int(code.group(1)), os.strerror(int(code.group(1))),
                     path.group(1) if path else None)
  return None


def parse_flags(argv: list[str]) -> list[str]:
  """absl flag parsing, with a bad `--config.x=...` override reported as one line."""
  try:
    return flags.FLAGS(argv)
  except Exception as e:  # pylint: disable=broad-exception-caught
    text = str(e)
    hint = re.search(r'Did you mean "([^"]+)" instead of "([^"]+)"', text)
    override = hint and next((a for a in argv if a.startswith("--config.") and
                              a.split("=", 1)[0].endswith("." + hint.group(2))), None)
    if override:
      key = override.split("=", 1)[0][len("--config."):]
      near = key[:-len(hint.group(2))] + hint.group(1)
      msg = f"config: unknown key '{key}' (from {override}); did you mean '{near}'?"
    else:
      leaf = text.strip("\"' ")
      override = next((a for a in argv if a.startswith("--config.") and
                       a.split("=", 1)[0].endswith("." + leaf)), None)
      if override:
        key = override.split("=", 1)[0][len("--config."):]
        msg = f"config: unknown key '{key}' (from {override}){run_config.nearest_key(key)}"
      else:
        msg = config_file_error(text) or (
            "config: " + " ".join(text.replace("\\n", " ").split())[:500])
    sys.stderr.write(msg + "\n")
    sys.exit(2)


_FRAME = re.compile(r'File "([^"]+)", line (\d+)(?:, in \S+)?\n[ \t]*(\S[^\n]*)')
_LIBRARY = ("site-packages", "dist-packages", sysconfig.get_paths()["stdlib"])


def config_file_error(text: str) -> str | None:
  """One line for an exception raised while a config file ran, or None for other flag errors.

  absl reports those with the whole traceback inside the flag error; the useful parts are the
  config file's line (which names the key) and the exception's last line.
  """
  if "Error whilst parsing config file" not in text:
    return None
  frames = [m for m in _FRAME.finditer(text) if not any(lib in m.group(1) for lib in _LIBRARY)]
  lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
  where = ""
  if frames:
    path, line, code = frames[-1].groups()
    where = f"{path}:{line}: {code}: "
  return f"config: {where}{lines[-1]}"


def run_entry_point(module: str, main) -> None:
  """`python -m <module>`: under a supervisor parent when several local processes are asked
  for (stt_jax.supervisor), else the absl app with one-line errors."""
  from stt_jax import supervisor  # pylint: disable=g-import-not-at-top
  if supervisor.multi_process(sys.argv):
    sys.exit(supervisor.run(module, sys.argv))
  app.run(one_line_errors(main), flags_parser=parse_flags)
