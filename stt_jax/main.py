"""The pipeline: translate -> train (each variant) -> eval -> report, from one config.

    python -m stt_jax.main --config=configs/mgsm_th.py --workdir=/path/to/workdir \
        [--config.train.lr=1e-4 ...]

Every stage resumes where it stopped, so rerunning the same command continues an interrupted
run, and rerunning a finished one does nothing new. Run from the repository root (config
files import `configs.base`). Multi-host (TPU pod slices): run the same command on every host;
`jax.distributed.initialize()` is called when the environment says so (see launch/).
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import sys
import time

from absl import app, flags
from ml_collections import config_flags

from stt_jax import faults, hosts

if os.getcwd() not in sys.path:  # `configs.base` resolves from the repository root.
  sys.path.insert(0, os.getcwd())

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
  from configs import base  # pylint: disable=g-import-not-at-top
  from stt_jax import config as config_lib  # pylint: disable=g-import-not-at-top
  cfg, workdir = _CONFIG.value, _WORKDIR.value
  if cfg is None:
    raise app.UsageError("--config is required, e.g. --config=configs/mgsm_th.py")
  if not workdir:
    raise app.UsageError("--workdir is required")
  config_lib.validate(cfg, base.get_config(), base.choices())
  if not cfg.model.path:
    raise config_lib.ConfigKeyError("config: 'model.path' is empty; set it to a local Hugging "
                                    "Face folder (e.g. --config.model.path=/models/Llama-2-7b-hf)")
  if not os.path.isfile(os.path.join(cfg.model.path, "config.json")):
    raise config_lib.ConfigKeyError(
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
  path = os.path.join(workdir, "config.json")
  text = json.dumps(cfg.to_dict(), indent=2, sort_keys=True, default=str)
  if os.path.isfile(path):
    with open(path, encoding="utf-8") as f:
      old = f.read()
    if old.rstrip("\n") == text:
      return
    backup = os.path.join(workdir, f"config.{int(time.time())}.json")
    os.replace(path, backup)
    logging.warning("main: config differs from the one this workdir was started with (kept "
                    "as %s); finished stages are not redone", backup)
  from stt_jax import appendlog  # pylint: disable=g-import-not-at-top
  appendlog.write_atomic(path, text + "\n")


def run_translate(cfg, workdir, tokenizer) -> None:
  from configs import base  # pylint: disable=g-import-not-at-top
  from stt_jax import evaluate, translate  # pylint: disable=g-import-not-at-top
  from stt_jax.models import load_hf  # pylint: disable=g-import-not-at-top
  if not any(v != "zero_shot" for v in cfg.variants):
    return
  mesh = evaluate.local_mesh(cfg)
  section = base.translate_section(cfg)
  model = None
  for lang in cfg.task.target_langs:
    marker = _translate_marker(workdir, cfg, lang)
    stamp = _translate_stamp(cfg, section, lang)
    if hosts.agree(_read_json(marker) == stamp):  # Process 0 decides for every host.
      logging.info("main: translations for %s are up to date; skipping", lang)
      continue
    if model is None:
      model, _ = load_hf(cfg.model.path, mesh=mesh, dtype=cfg.model.dtype,
                         param_dtype=cfg.model.param_dtype or None)
    stats = translate.translate_task(model, tokenizer, cfg.task.name, lang, section, workdir,
                                     mesh=mesh)
    logging.info("main: translated %s: kept %s of %s", lang, stats.get("kept"),
                 stats.get("items"))
    if hosts.is_main():
      faults.point("main.translated")
      _write_json(marker, stamp)
    hosts.barrier(f"translate-{lang}-marked")  # Every host sees the marker from here on.


def _translate_marker(workdir, cfg, lang) -> str:
  from stt_jax.tasks import get_task  # pylint: disable=g-import-not-at-top
  name = f"{get_task(cfg.task.name).name}_{lang}"
  return os.path.join(workdir, "translations", f"{name}.done.json")


def _translate_stamp(cfg, section, lang) -> dict:
  """What the translation files depend on: a changed setting makes the stage run again (it
  reuses every cached segment, so only new sources are decoded)."""
  return {"model": os.path.abspath(cfg.model.path), "task": cfg.task.name, "lang": lang,
          "translate": json.loads(json.dumps(section.to_dict(), sort_keys=True, default=str))}


def _translated(workdir, cfg, lang) -> bool:
  return os.path.isfile(_translate_marker(workdir, cfg, lang))


def _read_json(path: str):
  try:
    with open(path, encoding="utf-8") as f:
      return json.load(f)
  except (OSError, json.JSONDecodeError):
    return None


def _write_json(path: str, obj) -> None:
  from stt_jax import appendlog  # pylint: disable=g-import-not-at-top
  appendlog.write_atomic(path, json.dumps(obj, sort_keys=True))


def rows_by_source(cfg, workdir) -> dict[str, list[dict]]:
  """English train rows + every target language's translated and code-switched rows."""
  from stt_jax import train_data  # pylint: disable=g-import-not-at-top
  from stt_jax.tasks import get_task  # pylint: disable=g-import-not-at-top
  task = get_task(cfg.task.name)
  out = {"en": list(task.load("train", "en", limit=cfg.task.train_limit,
                              data_dir=cfg.task.data_dir, source=cfg.task.data_source,
                              sample_seed=cfg.task.train_sample_seed,
                              allow_subset=cfg.task.allow_subset)),
         "translated": [], "code_switched": []}
  for lang in cfg.task.target_langs:
    for source, suffix in (("translated", "train"), ("code_switched", "cs")):
      path = os.path.join(workdir, "translations", f"{task.name}_{lang}.{suffix}.jsonl")
      if os.path.isfile(path):
        out[source] += train_data.read_rows(path)
  return out


def run_train(cfg, workdir, tokenizer) -> None:
  import ml_collections  # pylint: disable=g-import-not-at-top
  from stt_jax import evaluate, sharding  # pylint: disable=g-import-not-at-top
  from stt_jax import train as train_lib  # pylint: disable=g-import-not-at-top
  from stt_jax import train_data  # pylint: disable=g-import-not-at-top
  mesh = sharding.make_mesh({"data": cfg.mesh.data, "fsdp": cfg.mesh.fsdp,
                             "tensor": cfg.mesh.tensor})
  rows = None
  for variant in cfg.variants:
    marker = evaluate.done_marker(workdir, variant)
    if hosts.agree(os.path.isfile(marker)):
      logging.info("main: %s already trained; skipping", variant)
      continue
    if variant != "zero_shot":
      missing = hosts.agree([l for l in cfg.task.target_langs
                             if not _translated(workdir, cfg, l)])
      if missing:
        from stt_jax import preflight  # pylint: disable=g-import-not-at-top
        raise preflight.PreflightError(
            f"main: variant {variant} needs translations for {missing}; run the 'translate' "
            "stage first (config.stages)")
    rows = rows if rows is not None else rows_by_source(cfg, workdir)
    sections = ml_collections.ConfigDict({"train": cfg.train.to_dict(),
                                          "checkpoint": cfg.checkpoint.to_dict()})
    result = train_lib.train(cfg.model.path, tokenizer, cfg.task.name,
                             train_data.rows_for_variant(variant, rows),
                             sections, evaluate.run_dir(workdir, variant), mesh)
    if result.preempted:
      logging.warning("main: %s preempted at step %d; rerun to continue", variant, result.step)
      sys.exit(143)
    if hosts.is_main():
      faults.point("main.trained")
      _write_json(marker, {"step": result.step, "metrics": result.metrics})
    hosts.barrier(f"train-{variant}-marked")
    del result


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
    from stt_jax import config as config_lib  # pylint: disable=g-import-not-at-top
    from stt_jax import preflight, sharding, train, train_data  # pylint: disable=g-import-not-at-top
    from stt_jax.checkpoint import CheckpointIOError, CheckpointMismatchError  # pylint: disable=g-import-not-at-top
    from stt_jax.decode import DecodeError  # pylint: disable=g-import-not-at-top
    from stt_jax.models import ConfigError, LoadError  # pylint: disable=g-import-not-at-top
    from stt_jax.models.safetensors_io import SafetensorsError  # pylint: disable=g-import-not-at-top
    from stt_jax.tasks import DataNotFoundError  # pylint: disable=g-import-not-at-top
    known = (config_lib.ConfigKeyError, ConfigError, LoadError, SafetensorsError,
             DataNotFoundError, train_data.DataError, sharding.ShardingError,
             train.NonFiniteLossError, preflight.PreflightError, CheckpointMismatchError,
             CheckpointIOError, DecodeError)
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
  seen = set()
  while error is not None and id(error) not in seen:
    seen.add(id(error))
    if isinstance(error, OSError) and error.errno in _FULL:
      return error
    code = re.search(r"os_error_code='(\d+)'", str(error))
    if code and int(code.group(1)) in _FULL:
      path = re.search(r'Failed writing: "([^"]+)"', str(error))
      return OSError(int(code.group(1)), os.strerror(int(code.group(1))),
                     path.group(1) if path else None)
    error = error.__cause__ or error.__context__
  return None


@one_line_errors
def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  quiet_logs()
  cfg, workdir = setup()
  from stt_jax import preflight  # pylint: disable=g-import-not-at-top
  tokenizer = preflight.load_tokenizer(cfg.model.path)
  preflight.check(cfg, workdir, tokenizer)
  stages = list(cfg.stages)
  if "translate" in stages:
    run_translate(cfg, workdir, tokenizer)
  if "train" in stages:
    run_train(cfg, workdir, tokenizer)
  if "eval" in stages:
    from stt_jax import evaluate  # pylint: disable=g-import-not-at-top
    evaluate.run(cfg, workdir, tokenizer, wait=False)
  if "report" in stages:
    if hosts.is_main():
      from stt_jax import report  # pylint: disable=g-import-not-at-top
      print(report.write_report([workdir]))
      print(f"report: {os.path.join(workdir, 'report.md')}, report.png")


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
        from configs import base  # pylint: disable=g-import-not-at-top
        from stt_jax import config as config_lib  # pylint: disable=g-import-not-at-top
        key = override.split("=", 1)[0][len("--config."):]
        near = config_lib.nearest(key, sorted(config_lib.flatten(base.get_config())))
        msg = f"config: unknown key '{key}' (from {override}){near}"
      else:
        from stt_jax import config as config_lib  # pylint: disable=g-import-not-at-top
        msg = config_lib.config_file_error(text) or (
            "config: " + " ".join(text.replace("\\n", " ").split())[:500])
    sys.stderr.write(msg + "\n")
    sys.exit(2)


if __name__ == "__main__":
  from stt_jax import supervisor  # pylint: disable=g-import-not-at-top
  if supervisor.multi_process(sys.argv):
    sys.exit(supervisor.run("stt_jax.main", sys.argv))
  app.run(main, flags_parser=parse_flags)
