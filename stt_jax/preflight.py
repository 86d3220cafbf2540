"""Cheap checks before any stage runs, so bad input fails in seconds with one line naming the
problem and the fix, not an hour into a run or deep inside XLA.

Order: the config alone (names that become paths, mesh, batch), then the model folder and
tokenizer, then the task data each requested stage reads. Nothing here compiles or loads
weights; the data checks read exactly the rows the stages will read (the run's own limits).
"""

from __future__ import annotations

import glob
import json
import logging
import os
import re
from collections.abc import Sequence

# Config values that become part of an output path must be plain names: no separators, no
# '..', so nothing a config says can write outside the workdir.
_PLAIN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
# Files that make a folder's tokenizer complete without running code (data, not Python).
_TOKENIZER_FILES = (("tokenizer.json",), ("tokenizer.model",), ("vocab.json", "merges.txt"),
                    ("vocab.txt",))
# Task.load records a line that is not JSON with one of these reasons (tasks/base.read_jsonl).
_BROKEN_LINE = (": broken JSON", ": line is not a JSON object")


class PreflightError(ValueError):
  """Input that cannot work: the message names the file or key and the fix."""


# ------------------------------------------------------------------------------ model folder


def load_tokenizer(model_path: str):
  """The model folder's tokenizer, never executing code shipped in the folder.

  The folder's config.json and weight headers are checked first, so a broken model fails with
  its own message instead of as a tokenizer error. A tokenizer_config.json `auto_map` (custom
  tokenizer code) is ignored: with trust_remote_code=False transformers loads the plain
  tokenizer from tokenizer.json, which is data; a folder without such files is an error.
  """
  from stt_jax.models import ModelConfig  # pylint: disable=g-import-not-at-top
  from stt_jax.models import hf_io  # pylint: disable=g-import-not-at-top
  if not os.path.isdir(model_path):
    raise PreflightError(f"model.path={model_path!r}: folder not found; pass a local Hugging "
                         "Face model folder")
  ModelConfig.from_hf(model_path)
  hf_io.check_weights(model_path)
  if not any(all(os.path.isfile(os.path.join(model_path, f)) for f in files)
             for files in _TOKENIZER_FILES):
    raise PreflightError(
        f"model.path={model_path!r}: no tokenizer files (tokenizer.json, tokenizer.model or "
        "vocab.json + merges.txt); copy them from the model's original folder")
  custom = _auto_map(model_path)
  if custom:
    logging.warning("preflight: %s asks for custom tokenizer code (auto_map %s); it is never "
                    "run, the plain tokenizer files are used", model_path, custom)
  from transformers import AutoTokenizer  # pylint: disable=g-import-not-at-top
  try:
    return AutoTokenizer.from_pretrained(model_path, trust_remote_code=False)
  except Exception as e:  # pylint: disable=broad-exception-caught
    first = (str(e).strip().splitlines() or [""])[0][:200]
    raise PreflightError(f"model.path={model_path!r}: the tokenizer cannot be loaded "
                         f"({type(e).__name__}: {first}); re-download its tokenizer files"
                         ) from None


def _auto_map(model_path: str):
  try:
    with open(os.path.join(model_path, "tokenizer_config.json"), encoding="utf-8") as f:
      return json.load(f).get("auto_map")
  except (OSError, ValueError, AttributeError):
    return None


def check_vocab(model_path: str, tokenizer) -> None:
  """The tokenizer's ids must index the model's embedding, and belong to this model."""
  from stt_jax.models import ModelConfig  # pylint: disable=g-import-not-at-top
  vocab = ModelConfig.from_hf(model_path).vocab_size
  base = int(tokenizer.vocab_size)
  used = {name: getattr(tokenizer, f"{name}_token_id", None) for name in ("pad", "bos", "eos")}
  beyond = {n: i for n, i in used.items() if i is not None and i >= vocab}
  where = f"model.path={model_path!r}"
  if base > vocab or beyond:
    what = (f"{base} tokens" if base > vocab else
            ", ".join(f"{n}_token_id={i}" for n, i in beyond.items()))
    raise PreflightError(f"{where}: the tokenizer has {what} but config.json says vocab_size="
                         f"{vocab}; the tokenizer files belong to another model")
  if 2 * base < vocab:
    raise PreflightError(f"{where}: the tokenizer has only {base} tokens but config.json says "
                         f"vocab_size={vocab}; the tokenizer files belong to another model")
  extra = sorted(i for i in tokenizer.get_added_vocab().values() if i >= vocab)
  if extra:
    logging.warning("preflight: %s: %d added token(s) (ids %s) lie beyond vocab_size=%d; text "
                    "containing them cannot be encoded", model_path, len(extra), extra[:5], vocab)


# ------------------------------------------------------------------------------ config


def check_names(cfg) -> None:
  """Every config value that becomes part of an output path is a plain name."""
  values = [("task.name", cfg.task.name), ("translate.src_lang", cfg.translate.src_lang)]
  values += [("task.target_langs", v) for v in cfg.task.target_langs]
  values += [("eval.langs", v) for v in cfg.eval.langs]
  values += [("variants", v) for v in cfg.variants]
  for key, value in values:
    if not isinstance(value, str) or not _PLAIN_NAME.fullmatch(value) or ".." in value:
      raise PreflightError(f"config: {key} has {value!r}, which is not a plain name (letters, "
                           "digits, '_', '-', '.'; no '/' or '..'); values become file names "
                           "inside the workdir")


def check_mesh(cfg, num_devices: int | None = None):
  """The training mesh on this run's devices; returns {axis: size} (sharding.mesh_sizes, the
  rule make_mesh applies, so a config that passes here builds its mesh)."""
  import jax  # pylint: disable=g-import-not-at-top
  from stt_jax import sharding  # pylint: disable=g-import-not-at-top
  n = jax.device_count() if num_devices is None else num_devices
  shape = {"data": cfg.mesh.data, "fsdp": cfg.mesh.fsdp, "tensor": cfg.mesh.tensor}
  setting = ", ".join(f"mesh.{k}={v}" for k, v in shape.items())
  try:
    return sharding.mesh_sizes(shape, n)
  except sharding.ShardingError as e:
    raise PreflightError(f"config: {setting}: {e}") from None


def check_batch(cfg, mesh_shape) -> None:
  """Each micro-batch splits evenly over the data-parallel devices (data x fsdp).

  Rows of a batch that does not divide would be replicated instead (sharding.logical_to_spec),
  so every device would compute every row: silently N times the work.
  """
  t = cfg.train
  dp = mesh_shape["data"] * mesh_shape["fsdp"]
  if t.batch_size <= 0 or t.grad_accum <= 0 or t.batch_size % t.grad_accum:
    raise PreflightError(f"config: train.batch_size={t.batch_size} must be a positive multiple "
                         f"of train.grad_accum={t.grad_accum}")
  micro = t.batch_size // t.grad_accum
  if micro % dp:
    raise PreflightError(
        f"config: train.batch_size={t.batch_size} (micro-batch {micro} with train.grad_accum="
        f"{t.grad_accum}) must split evenly over the data-parallel size {dp} (mesh.data="
        f"{mesh_shape['data']} x mesh.fsdp={mesh_shape['fsdp']}); use a train.batch_size "
        f"that is a multiple of {dp * t.grad_accum}")


def inference_plan(cfg, mesh=None) -> dict:
  """Per-device bytes of decoding (translate, eval) in the inference layout: the weights'
  shards (over mesh.tensor only) and a KV cache of the larger decode batch at full context,
  each placed as the loader and the decoder place them (sharding.named_sharding); the cache
  in model.kv_dtype ('' = model.dtype)."""
  import math  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from stt_jax import sharding  # pylint: disable=g-import-not-at-top
  from stt_jax.models import ModelConfig, hf_io  # pylint: disable=g-import-not-at-top
  from stt_jax.models.decoder import KV_CACHE_AXES  # pylint: disable=g-import-not-at-top
  mesh = mesh if mesh is not None else sharding.local_mesh(cfg.mesh)

  def shard(shape, logical):
    return sharding.named_sharding(mesh, logical, shape, "inference").shard_shape(shape)

  config = ModelConfig.from_hf(cfg.model.path)
  model = hf_io.abstract_model(config, cfg.model.dtype, cfg.model.param_dtype or None,
                               scan_layers=cfg.model.scan_layers)
  weights = sum(math.prod(shard(v.get_value().shape, v.get_metadata()["logical_axes"]))
                * v.get_value().dtype.itemsize
                for _, v in nnx.to_flat_state(nnx.state(model, nnx.Param)))
  kv_shape = (config.num_hidden_layers, max(cfg.translate.batch_size, cfg.eval.batch_size),
              config.num_key_value_heads, config.max_position_embeddings, config.head_dim)
  kv_shard = shard(kv_shape, KV_CACHE_AXES)  # Keys and values alike.
  kv_dtype = jnp.dtype(cfg.model.kv_dtype or cfg.model.dtype)
  kv = 2 * math.prod(kv_shard) * kv_dtype.itemsize
  return {"weights": int(weights), "kv_cache": int(kv), "rows": int(kv_shard[1]),
          "positions": config.max_position_embeddings, "mesh": dict(mesh.shape),
          "kv_dtype": kv_dtype.name}


def check_inference_memory(cfg, device_memory: int | None = None, mesh=None) -> dict:
  """Logs the inference plan; refuses, in one line, a layout whose weights + KV cache exceed
  the device's memory when that is known (TPU/GPU report it; CPU does not)."""
  import jax  # pylint: disable=g-import-not-at-top
  plan = inference_plan(cfg, mesh)
  if device_memory is None:
    stats = jax.local_devices()[0].memory_stats() or {}
    device_memory = stats.get("bytes_limit")
  gib = lambda n: f"{n / 2**30:.2f} GiB"
  need = plan["weights"] + plan["kv_cache"]
  logging.info("preflight: decoding per device (inference layout, mesh %s): %s weights + %s "
               "%s KV cache (%d rows x %d positions)%s", plan["mesh"], gib(plan["weights"]),
               gib(plan["kv_cache"]), plan["kv_dtype"], plan["rows"], plan["positions"],
               f" of {gib(device_memory)}" if device_memory else "")
  if device_memory and need > device_memory:
    m = cfg.mesh
    setting = f"mesh.data={m.data}, mesh.fsdp={m.fsdp}, mesh.tensor={m.tensor}"
    raise PreflightError(
        f"config: {setting}: decoding needs {gib(plan['weights'])} of weights + "
        f"{gib(plan['kv_cache'])} of KV cache per device (weights split over mesh.tensor="
        f"{plan['mesh']['tensor']} only), more than the {gib(device_memory)} a device has; "
        "raise mesh.tensor (e.g. --config.mesh.tensor=4), lower translate.batch_size and "
        "eval.batch_size, or store the cache narrower (--config.model.kv_dtype=bfloat16)")
  return plan


# ------------------------------------------------------------------------------ data


def local_langs(task, split: str, data_dir: str | None) -> list[str]:
  """Languages with a local file for `split` (data_dir or the bundled data/)."""
  from stt_jax.tasks import DATA_DIR  # pylint: disable=g-import-not-at-top
  spec = task.splits[split]
  if spec.langs is not None:
    return sorted(spec.langs)
  if "{lang}" not in spec.path:
    return []
  prefix, suffix = spec.path.split("{lang}", 1)
  found = set()
  for root in [data_dir, str(DATA_DIR)] if data_dir else [str(DATA_DIR)]:
    for path in glob.glob(os.path.join(glob.escape(root), glob.escape(prefix) + "*" +
                                       glob.escape(suffix))):
      found.add(os.path.relpath(path, root)[len(prefix):-len(suffix) or None])
  return sorted(found)


def check_subset(task, split: str, lang: str, cfg) -> None:
  """A run must not read a partial bundled copy unless task.allow_subset says it may.

  The stages load with task.data_source alone, and `auto`/`local` prefer the bundled copy; so
  without the opt-in the full set must come from task.data_dir or data_source=hf|tfds.
  """
  spec = task.splits[split]
  if cfg.task.allow_subset or cfg.task.data_source in ("hf", "tfds"):
    return
  rel = spec.path.format(lang=lang)
  if cfg.task.data_dir and os.path.isfile(os.path.join(cfg.task.data_dir, rel)):
    return
  if task.partial_copy(spec, lang):
    raise PreflightError(
        f"config: task.allow_subset=False but task.data_source={cfg.task.data_source!r} reads "
        f"the bundled data/{rel}, {spec.bundled_note.split('; use ')[0]}; train on the full set "
        "with --config.task.data_source=hf (or tfds, or task.data_dir holding "
        f"{rel}), or accept the subset with --config.task.allow_subset=True")


def _rows(task, split: str, lang: str, key: str, cfg, **kwargs):
  """task.load with each kind of failure turned into one line naming `key`."""
  from stt_jax.tasks import DataNotFoundError  # pylint: disable=g-import-not-at-top
  where = f"{task.name} {split!r} [{lang}]"
  langs = local_langs(task, split, cfg.task.data_dir)
  have = f"languages with {task.name} {split!r} data: {', '.join(langs) or 'none'}"
  check_subset(task, split, lang, cfg)
  try:
    rows = task.load(split, lang, data_dir=cfg.task.data_dir,
                     allow_subset=cfg.task.allow_subset, **kwargs)
  except DataNotFoundError as e:
    raise PreflightError(f"config: {key} has {lang!r} but there is no {where} data ({have}); "
                         "fix the language or supply the file in task.data_dir"
                         + (f" ({e})" if cfg.task.data_source in ("hf", "tfds") else "")
                         ) from None
  except ValueError as e:  # A split that exists only in some languages.
    raise PreflightError(f"config: {key} has {lang!r}: {e}") from None
  broken = [m for m in rows.malformed if any(b in m for b in _BROKEN_LINE)]
  if broken:
    raise PreflightError(f"data: {broken[0]} ({len(broken)} such line(s)); fix or delete the "
                         "line (each line of a .jsonl file must be one JSON object)")
  if not rows:
    why = (f"all {rows.num_malformed} rows are malformed, e.g. {rows.malformed[0]}"
           if rows.malformed else "the file has no rows")
    raise PreflightError(f"config: {key} has {lang!r} but {where} is empty ({rows.source}: "
                         f"{why}); fix the file or the language ({have})")
  return rows


def check_data(cfg, stages: Sequence[str], tokenizer=None) -> None:
  """Every split the requested stages read exists and has rows, for every language."""
  from stt_jax import translate  # pylint: disable=g-import-not-at-top
  from stt_jax.tasks import get_task  # pylint: disable=g-import-not-at-top
  task = get_task(cfg.task.name)
  translates = "translate" in stages and any(v != "zero_shot" for v in cfg.variants)
  if translates or "train" in stages:
    _rows(task, "train", cfg.translate.src_lang, "translate.src_lang", cfg,
          limit=cfg.task.train_limit, source=cfg.task.data_source,
          sample_seed=cfg.task.train_sample_seed)
  if translates:
    section = cfg.translate
    pool_source = section.exemplars.get(task.name)
    if pool_source is None:
      raise PreflightError(f"config: translate.exemplars has no entry for task {task.name!r}")
    for lang in cfg.task.target_langs:
      pool_task = get_task(pool_source)
      split = "exemplars" if pool_task.name == "mgsm" else "dev"
      for code in (cfg.translate.src_lang, lang):
        _rows(pool_task, split, code, "task.target_langs", cfg)
        if code not in section.lang_names:
          raise PreflightError(f"config: translate.lang_names has no name for {code!r} (from "
                               "task.target_langs); add it in the config file")
      pool = translate.parallel_pool(pool_source, lang, section, cfg.task.data_dir)
      if len(pool) < section.shots:
        raise PreflightError(
            f"config: translate.shots={section.shots} but the {pool_source} exemplar pool for "
            f"{lang!r} has {len(pool)} parallel pairs; lower translate.shots or fix the "
            f"{pool_task.name} {split!r} files")
  if "eval" in stages:
    for lang in cfg.eval.langs:
      rows = _rows(task, "test", lang, "eval.langs", cfg, limit=cfg.eval.limit,
                   source=cfg.task.data_source)
      if tokenizer is not None:
        check_eval_prompts(cfg, task, lang, rows, tokenizer)
      if cfg.eval.lm_eval_compat:
        check_compat(task, rows[0])


def check_compat(task, row) -> None:
  """The published-table rules (eval.lm_eval_compat) know the row's language: found here,
  not after training, when the eval stage first scores it."""
  try:
    choices = task.compat_choices(row)
    task.compat_scores("", row, None if choices is None else 0)
  except ValueError as e:
    raise PreflightError(f"config: {e}") from None


def check_eval_prompts(cfg, task, lang: str, rows, tokenizer) -> None:
  """Every test prompt plus its answer budget fits the model's positions: found here, not
  hours later when the eval stage reaches the longest prompt (Thai XQuAD contexts run to
  thousands of tokens on a byte-fallback tokenizer)."""
  with open(os.path.join(cfg.model.path, "config.json"), encoding="utf-8") as f:
    context = json.load(f).get("max_position_embeddings")
  if not context:
    return
  answer = cfg.eval.max_new_tokens if cfg.eval.method == "generate" else 0
  lengths = [len(tokenizer.encode(task.format_prompt(r))) for r in rows]
  over = [n for n in lengths if n + answer > context]
  if over:
    raise PreflightError(
        f"config: {len(over)} of {len(rows)} {task.name} test prompts in {lang!r} do not fit "
        f"the model's {context} positions with eval.max_new_tokens={answer} (longest "
        f"{max(over)} tokens); lower eval.max_new_tokens, set eval.limit, or drop {lang!r} "
        "from eval.langs")


# ------------------------------------------------------------------------------ entry point


def check_attention(cfg, stages: Sequence[str], platform: str | None = None) -> None:
  """model.attention runs here with each stage's compute dtype (train.dtype for training,
  model.dtype for translation and evaluation); else the kernel's one-line AttentionError."""
  from stt_jax.models import ModelConfig, attention  # pylint: disable=g-import-not-at-top
  config = ModelConfig.from_hf(cfg.model.path)
  dtypes = ({cfg.train.dtype} if "train" in stages else set()) | (
      {cfg.model.dtype} if {"translate", "eval"} & set(stages) else set())
  for dtype in sorted(dtypes):
    attention.resolve(cfg.model.attention, dtype, config.head_dim, platform,
                      soft_cap=config.attn_logit_softcapping)


def check(cfg, workdir: str, tokenizer, stages: Sequence[str] | None = None) -> None:
  """Raises PreflightError for a config that cannot run with this model and tokenizer.

  stages: the stages this process runs (default cfg.stages); the separate eval loop passes
  ('eval',), since it neither trains (so the training mesh is not its concern) nor translates.
  """
  del workdir  # Outputs are named from config values, which check_names keeps inside it.
  stages = tuple(cfg.stages if stages is None else stages)
  check_names(cfg)
  if "train" in stages:
    check_batch(cfg, check_mesh(cfg))
  check_vocab(cfg.model.path, tokenizer)
  check_attention(cfg, stages)
  check_data(cfg, stages, tokenizer)
  if {"translate", "eval"} & set(stages):
    check_inference_memory(cfg)
