"""The translate stage: the model translates the task's English training set into each target
language, host by host, resumably, and writes the training files.

  translate_task(model, tokenizer, "mgsm", "de", cfg, workdir)   # one language
  run(cfg, Workdir(workdir), tokenizer)                           # every cfg.task.target_langs

Identical segments are decoded once, greedily, one line each, with a `shots`-exemplar parallel
prompt (stt_jax.translate). Results go to an append-only, fsync'd jsonl cache (one part per
host), so a killed run resumes where it stopped. At the end process 0 rebuilds the rows
(stt_jax.translate_assemble) and writes `translations/<task>_<lang>.{train,cs}.jsonl` and
`.stats.json` (paths: stt_jax.workdir). A `.done.json` stamp of the settings makes a rerun with
the same config skip the language; a changed setting redoes it from the cache.

When config.variants has self_translate_rt, a round-trip pass follows the forward one: the
kept rows' translations are decoded back to English (reversed exemplars, the same engine), into
a cache of their own (`cache/<task>_<lang>.back.part<host>.jsonl`, as resumable), and the rows
whose back-translation passes translate.roundtrip go to `<task>_<lang>.train_rt.jsonl`
(stt_jax.translate_roundtrip).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from collections.abc import Sequence
from typing import Any

import jax

from stt_jax import appendlog, faults, hosts, run_config, sharding
from stt_jax import translate as tl
from stt_jax import translate_roundtrip as rt
from stt_jax.models import load_hf
from stt_jax.tasks import Task, get_task
from stt_jax.translate_assemble import Assembled, assemble
from stt_jax.workdir import Workdir, read_json, translate_stamp, write_marker

log = logging.getLogger(__name__)


def english_rows(cfg, task: str | Task | None = None) -> list[dict]:
  """The English train rows of a run (task section: limit, sample, data source)."""
  task = get_task(task or cfg.task.name) if not isinstance(task, Task) else task
  t = cfg.task
  return list(task.load("train", cfg.translate.src_lang, limit=t.train_limit,
                        data_dir=t.data_dir, source=t.data_source,
                        sample_seed=t.train_sample_seed, allow_subset=t.allow_subset))


ROUNDTRIP_VARIANT = "self_translate_rt"


def roundtrip_on(cfg) -> bool:
  """Whether the run needs the round-trip pass (a variant trains on its rows)."""
  return ROUNDTRIP_VARIANT in cfg.variants


def stamp(cfg, lang: str) -> dict:
  """What a language's files depend on (the translate section and the task's inputs), and
  under 'roundtrip' the round-trip settings when the run needs that pass."""
  section = cfg.translate.to_dict()
  roundtrip = section.pop("roundtrip")
  section["task_inputs"] = {k: cfg.task[k] for k in run_config.TASK_OWNED}
  out = translate_stamp(cfg.model.path, get_task(cfg.task.name).name, lang, section)
  if roundtrip_on(cfg):
    out["roundtrip"] = json.loads(json.dumps(roundtrip, sort_keys=True, default=str))
  return out


def up_to_date(have: dict | None, want: dict) -> bool:
  """Whether a language's marker (`have`) covers the stamp `want`: the same forward settings,
  and the same round-trip settings when `want` has them. A run without the round-trip
  variant is covered by a marker written with it, so rerunning a subset of the variants
  redoes nothing."""
  if have is None:
    return False
  if "roundtrip" not in want:
    have = {k: v for k, v in have.items() if k != "roundtrip"}
  return have == want


def done(cfg, wd: Workdir, lang: str) -> bool:
  return os.path.isfile(wd.translation(get_task(cfg.task.name).name, lang, "done"))


def run(cfg, wd: Workdir, tokenizer) -> None:
  """Translates every target language whose stamp is missing or stale (no-op for a run of
  zero_shot only)."""
  if not any(v != "zero_shot" for v in cfg.variants):
    return
  mesh = sharding.local_mesh(cfg.mesh)
  task = get_task(cfg.task.name)
  model = None
  for lang in cfg.task.target_langs:
    marker, want = wd.translation(task.name, lang, "done"), stamp(cfg, lang)
    if hosts.agree(up_to_date(read_json(marker), want)):  # Process 0 decides for every host.
      log.info("translate: %s is up to date; skipping", lang)
      continue
    if model is None:
      model, _ = load_hf(cfg.model.path, mesh=mesh, dtype=cfg.model.dtype,
                         param_dtype=cfg.model.param_dtype or None, layout="inference",
                         scan_layers=cfg.model.scan_layers, attention=cfg.model.attention)
    stats = translate_task(model, tokenizer, task.name, lang, cfg, wd.root, mesh=mesh)
    log.info("translate: %s: kept %s of %s", lang, stats.get("kept"), stats.get("items"))
    if hosts.is_main():
      faults.point("main.translated")
      write_marker(marker, want)
    hosts.barrier(f"translate-{lang}-marked")  # Every host sees the marker from here on.


def translate_task(model, tokenizer, task_name: str, lang: str, cfg, workdir: os.PathLike,
                   mesh=None, *, process_index: int | None = None,
                   process_count: int | None = None) -> dict[str, Any]:
  """Translates the task's English train rows into `lang`; writes the training files.

  `cfg`: a run config (its translate section; the task section says which English rows).
  Resumable: finished segments are read from the cache and not decoded again. Multi-host: each
  host decodes every process_count-th unique segment (pass a host-local `mesh`; the workdir
  must be shared); after a barrier process 0 merges all cache parts, writes the files and
  returns the full stats; other hosts return the stats of their own slice.
  """
  start, tcfg, task = time.perf_counter(), cfg.translate, get_task(task_name)
  index = jax.process_index() if process_index is None else process_index
  count = jax.process_count() if process_count is None else process_count
  wd = Workdir(os.fspath(workdir))
  name = wd.cache_name(task.name, lang)
  rows = english_rows(cfg, task)
  plan = [{f: tl.split_field(t, tcfg) for f, t in task.translatable_texts(r).items()}
          for r in rows]
  segments = _unique(s for fields in plan for parts in fields.values() for line in parts
                     for s in line)
  todo = [s for s in segments if tl.needs_decoding(s)]
  pairs, _ = tl.exemplars(tcfg.exemplars[task.name], lang, tcfg, cfg.task.data_dir)
  ident = (tl.model_id(model, tcfg), tl.prompt_id(pairs, lang, tcfg), lang)
  cache = tl.TranslationCache(wd.translation_cache, name, index)

  mine = todo[index::count]
  translator = tl.Translator(model, tokenizer, tcfg, mesh, kv_dtype=cfg.model.kv_dtype or None)
  speed = _decode_missing(translator, cache, ident, pairs, mine, tcfg, f"translate {name}")
  stats = {"task": task.name, "lang": lang, "model": ident[0], "prompt": ident[1],
           "hosts": count, "host": index,
           "segments": {"total": len(segments), "decode": len(todo),
                        "copied_no_letters": len(segments) - len(todo), "this_host": len(mine),
                        "decoded_this_run": speed.segments,
                        "cached": len(mine) - speed.segments},
           "throughput": speed.as_dict()}
  hosts.barrier(f"translate-{name}-decoded")
  back = None
  if index == 0 or roundtrip_on(cfg):  # With the round trip every host assembles (cheap)
    found = _lookup(cache, ident, todo)  # to know which rows to translate back.
    result = assemble(task, rows, plan, found, lang, tcfg)
  if roundtrip_on(cfg):
    back = _roundtrip_decode(translator, wd, task, lang, rows, plan, result, found, pairs,
                             tcfg, (index, count), stats)
    hosts.barrier(f"translate-{name}-back-decoded")
  if index == 0:
    _assemble_and_write(wd, task, lang, result, found, tcfg, stats, start)
    if back is not None:
      _roundtrip_write(wd, task, lang, back, found, tcfg, stats)
    appendlog.write_json(wd.translation(task.name, lang, "stats"), stats, indent=1,
                         point="translate.replace")
  hosts.barrier(f"translate-{name}-written")
  stats.setdefault("wall_s", round(time.perf_counter() - start, 2))
  return stats


def _assemble_and_write(wd: Workdir, task: Task, lang: str, result: Assembled, found, tcfg,
                        stats: dict, start: float) -> None:
  """Process 0: training rows from every host's segment translations, written atomically;
  `stats` gains the counts (the caller writes it, once, after the round trip's)."""
  stats["segments"]["truncated"] = sum(map(tl.is_truncated, found.values()))
  stats.update(result.stats)
  stats["segments"]["rejected"] = result.segment_rejects
  stats["rejected_samples"] = result.reject_samples
  stats["wall_s"] = round(time.perf_counter() - start, 2)
  os.makedirs(wd.translations, exist_ok=True)
  appendlog.write_atomic(wd.translation(task.name, lang, "train"), _jsonl(result.rows),
                         "translate.replace")
  appendlog.write_atomic(wd.translation(task.name, lang, "cs"), _jsonl(result.cs_rows),
                         "translate.replace")


@dataclasses.dataclass
class _Back:
  """What the round-trip pass decoded: the kept rows with their English rows and plans, the
  fields it checks, and where the back-translations are."""
  kept: list[tuple[dict, dict, dict]]  # (translated row, English row, its segment plan)
  fields: list[str]
  cache: tl.TranslationCache
  ident: tuple[str, str, str]
  sources: list[str]


def _roundtrip_decode(translator: tl.Translator, wd: Workdir, task: Task, lang: str, rows, plan,
                      result: Assembled, found, pairs, tcfg, host: tuple[int, int],
                      stats: dict) -> _Back:
  """Decodes this host's share of the kept rows' translations back into English (its own
  cache, resumable); `stats` gains the pass's segment counts and throughput."""
  index, count = host
  fields = list(tcfg.roundtrip.fields[task.name])
  by_id = {f"{r['id']}.{lang}": (r, p) for r, p in zip(rows, plan)}
  kept = [(row, *by_id[row["id"]]) for row in result.rows]
  sources = rt.back_sources([p for _, _, p in kept], fields, found)
  reverse = rt.back_pairs(pairs)
  ident = (tl.model_id(translator.model, tcfg),
           tl.prompt_id(reverse, tcfg.src_lang, tcfg, src=lang), tcfg.src_lang)
  cache = tl.TranslationCache(wd.translation_cache, wd.cache_name(task.name, lang, back=True),
                              index)
  mine = sources[index::count]
  speed = _decode_missing(translator, cache, ident, reverse, mine, tcfg,
                          f"round-trip {task.name}_{lang}", src=lang)
  stats["roundtrip"] = {"prompt": ident[1], "segments": {
      "decode": len(sources), "this_host": len(mine), "decoded_this_run": speed.segments,
      "cached": len(mine) - speed.segments}, "throughput": speed.as_dict()}
  return _Back(kept, fields, cache, ident, sources)


def _roundtrip_write(wd: Workdir, task: Task, lang: str, back: _Back, found, tcfg,
                     stats: dict) -> None:
  """Process 0: chrF of every kept row's back-translations, the rows that pass the rule
  (`train_rt`), one score row per checked row (`roundtrip`), and the counts in `stats`."""
  decoded = _lookup(back.cache, back.ident, back.sources)
  scores, texts = [], []
  for _, en_row, plan in back.kept:
    texts.append(rt.back_texts(plan, back.fields, found, decoded, tcfg))
    english = task.translatable_texts(en_row)
    scores.append(rt.field_chrf({f: english[f] for f in back.fields}, texts[-1]))
  keep = rt.keep_mask([min(s.values()) for s in scores], tcfg.roundtrip)
  stats["roundtrip"].update(rt.summary(scores, keep, back.fields, tcfg.roundtrip))
  appendlog.write_atomic(wd.translation(task.name, lang, "train_rt"),
                         _jsonl([row for (row, _, _), k in zip(back.kept, keep) if k]),
                         "translate.replace")
  appendlog.write_atomic(wd.translation(task.name, lang, "roundtrip"), _jsonl(
      [{"id": row["id"], "keep": k, "chrf": s, "back": t}
       for (row, _, _), k, s, t in zip(back.kept, keep, scores, texts)]), "translate.replace")


def _jsonl(rows: Sequence[dict]) -> str:
  return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)


def _unique(items) -> list:
  return list(dict.fromkeys(items))


def _decode_missing(translator: tl.Translator, cache: tl.TranslationCache, ident, pairs,
                    sources, cfg, desc: str, src: str | None = None) -> tl.Throughput:
  """Decodes the `sources` the cache lacks, appending each batch to this host's part; `src`:
  their language (default the English source; the round-trip pass: the target)."""
  model_name, prompt_hash, lang = ident
  have = cache.load()
  missing = [s for s in sources if (*ident, s) not in have]
  log.info("%s: %d of this host's %d segments left to decode", desc, len(missing), len(sources))
  if not missing:
    return tl.Throughput()
  append = cache.appender()
  record = lambda batch: append([{"model": model_name, "prompt": prompt_hash, "lang": lang, **r}
                                 for r in batch])
  prompts = [tl.build_prompt(pairs, s, lang, cfg, src=src) for s in missing]
  return translator.translate(prompts, missing, desc, record)[1]


def _lookup(cache: tl.TranslationCache, ident, sources) -> dict[str, dict]:
  """Every source's cache record, from all hosts' parts."""
  have = cache.load()
  missing = [s for s in sources if (*ident, s) not in have]
  if missing:
    raise RuntimeError(f"{len(missing)} segments have no translation in {cache.dir} (did a "
                       "host fail?); rerun the stage to finish them")
  return {s: have[(*ident, s)] for s in sources}
