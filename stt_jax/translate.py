"""Self-translation stage: the model translates an English training set with few-shot prompts.

  stats = translate_task(model, tokenizer, "mgsm", "de", default_translate_config(), workdir)
  report = quality_report(model, tokenizer, ["de", "zh"], default_translate_config())

Every translatable field of every English train row is cut into segments (lines; long lines
into sentences), identical segments are decoded once, greedily, one line each, with a
`shots`-exemplar parallel prompt. Results go to an append-only, fsync'd jsonl cache (one part
per host), so a killed run resumes where it stopped. At the end, process 0 rebuilds the rows
in the task's own schema, drops degenerate translations (counted by reason), re-aligns SQuAD
answers, builds code-switched rows and writes under `<workdir>/translations/`:

  <task>_<lang>.train.jsonl   translated rows, id '<english id>.<lang>'
  <task>_<lang>.cs.jsonl      code-switched rows, id '<english id>.<lang>.cs-<fields>'
  <task>_<lang>.stats.json    counts, drops by reason, throughput
  cache/<task>_<lang>.part<host>.jsonl   the resumable decode cache
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import json
import logging
import os
import pathlib
import random
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import jax
import ml_collections
from ml_collections import config_dict
from tqdm.auto import tqdm

from stt_jax import appendlog
from stt_jax import codeswitch
from stt_jax import decode
from stt_jax import hosts
from stt_jax import translate_filters as tf
from stt_jax.tasks import get_task

log = logging.getLogger(__name__)

LANG_NAMES = {"en": "English", "de": "German", "ru": "Russian", "th": "Thai", "zh": "Chinese"}
# Length of a human translation / length of the English, in characters, bounds that hold
# for >99.5% of XNLI dev sentence pairs (measured: zh median 0.31, th 0.90, ru 1.03, de 1.13).
LENGTH_RATIO = {"default": (0.3, 3.0), "de": (0.5, 2.5), "ru": (0.4, 2.5), "th": (0.3, 2.2),
                "zh": (0.1, 1.0)}
# sacrebleu BLEU tokenisation per language; chrF is character-based everywhere.
BLEU_TOKENIZE = {"zh": "zh", "th": "char", "ja": "char"}


def default_translate_config() -> ml_collections.ConfigDict:
  """Every setting of the stage, with its default (override any, e.g. `cfg.shots = 4`)."""
  c = ml_collections.ConfigDict()
  # --- prompt
  c.shots = 8                     # parallel exemplars per prompt (the paper uses 8)
  c.src_lang = "en"               # language of the training data
  c.lang_names = dict(LANG_NAMES)  # code -> the name written in the prompt
  c.example_template = "{src_name}: {text}\n{tgt_name}: {translation}\n\n"  # one exemplar
  c.query_template = "{src_name}: {text}\n{tgt_name}:"   # the text to translate
  # task -> exemplar source: 'mgsm' (the 8 MGSM exemplars, parallel in every language) or
  # 'xnli' (parallel sentences of the XNLI dev split). Never test data.
  c.exemplars = {"mgsm": "mgsm", "xquad": "xnli", "xnli": "xnli"}
  c.mgsm_exemplar_fields = ("question",)  # MGSM fields in the pool, per exemplar: with
                                           # ("question", "rationale") 8 shots = 4 questions and
                                           # their 4 answers, which end 'The answer is N.'
  c.xnli_min_chars = 30           # XNLI exemplar sentences: English length bounds ...
  c.xnli_max_chars = 200
  c.exemplar_seed = 0             # ... sampled with this seed (held-out = the rest)
  # --- decoding (greedy, stop at the first newline)
  c.batch_size = 8
  c.max_new_tokens = 256          # cap on generated tokens per segment
  c.max_new_ratio = 4.0           # budget = min(cap, next pow2(ratio * source tokens + slack));
  c.max_new_slack = 16            # 0 ratio = always the cap. Few budgets -> few compilations.
  c.truncate = "left"             # prompt longer than the context: keep its end ('error' raises)
  c.progress = True               # tqdm bar: segments/s, tokens/s, ETA
  c.model_id = ""                 # cache key; default: the model folder's name
  # --- input
  c.limit = config_dict.placeholder(int)        # N English train rows (None = all) ...
  c.sample_seed = config_dict.placeholder(int)  # ... a seeded random N (None = the first N)
  c.data_dir = config_dict.placeholder(str)     # task data folder (see docs/tasks.md)
  c.data_source = "auto"                        # auto | local | hf | tfds
  c.allow_subset = config_dict.placeholder(bool)  # partial bundled copy: None warns, False
                                                  # refuses, True accepts (tasks.base.Task.load)
  c.split_sentences_over = 300    # lines longer than this (chars) are split into sentences;
                                  # 0 = always, -1 = never
  c.sentence_splitter = "auto"    # pysbd if installed, else the regex in translate_filters
  c.joiner = {"default": " ", "zh": "", "ja": ""}  # how translated sentences are re-joined
  # --- filters (translate_filters.check); a failing segment drops its example
  c.filters = ml_collections.ConfigDict()
  c.filters.enabled = tf.REASONS  # empty truncated repetition copy script length_ratio numbers
  c.filters.min_chars = 20        # shorter sources skip copy/script/length checks (names, numbers)
  c.filters.light_fields = ("answer",)  # only empty/truncated/repetition checks: a SQuAD answer
                                        # is judged by finding it in the translated context
  c.filters.repeat_min_count = 4  # a unit repeated this many times in a row ...
  c.filters.repeat_min_chars = 16  # ... over at least this many chars is a loop
  c.filters.script_min_fraction = 0.5  # th/zh/ru: share of letters in the target script ...
  c.filters.script_ignore_copied = True  # ... not counting names/units copied from the source
  c.filters.numbers_tasks = ("mgsm",)  # tasks whose translations keep every source number
  c.filters.length_ratio = dict(LENGTH_RATIO)  # lang -> (min, max) translated/source chars
  c.filters.fuzzy_min_score = 80.0  # SQuAD answers: rapidfuzz partial_ratio to accept a span
  # --- code-switched examples (codeswitch.py)
  c.codeswitch = ml_collections.ConfigDict()
  c.codeswitch.enabled = True
  c.codeswitch.patterns = dict(codeswitch.DEFAULT_PATTERNS)  # task -> ('field=tgt,...', ...)
  # --- quality_report
  c.quality = ml_collections.ConfigDict()
  c.quality.n = 100               # held-out XNLI dev sentences per language
  c.quality.mgsm_leave_one_out = True  # also each MGSM exemplar question, prompted with the rest
  return c


def filter_config(cfg, task: str | None = None) -> tf.FilterConfig:
  """The checks' bounds; the numbers check is on when `task` is in filters.numbers_tasks."""
  f = cfg.filters
  return tf.FilterConfig(tuple(f.enabled), f.min_chars, f.repeat_min_count, f.repeat_min_chars,
                         f.script_min_fraction, {k: tuple(v) for k, v in f.length_ratio.items()},
                         f.script_ignore_copied, task is not None and task in f.numbers_tasks)


# ------------------------------------------------------------------------------ prompts

Pair = tuple[str, str]


def _one_line(text: str) -> str:
  return " ".join(text.split())


def _clean(sentence: str) -> bool:
  """A well-formed written sentence: capitalised, ends in . ! or ?, no 'uh'/'um' (XNLI has
  transcribed speech, whose translations make poor exemplars)."""
  words = set(sentence.lower().replace(",", " ").split())
  return sentence[:1].isupper() and sentence[-1:] in ".!?" and not words & {"uh", "um"}


def parallel_pool(source: str, lang: str, cfg) -> list[Pair]:
  """(English, target) sentence pairs that exemplars are drawn from, in a fixed order."""
  kwargs = dict(data_dir=cfg.data_dir)
  if source == "mgsm":
    rows = get_task("mgsm").load_parallel("exemplars", [cfg.src_lang, lang], **kwargs)
    return [(_one_line(a[f]), _one_line(b[f])) for a, b in rows
            for f in cfg.mgsm_exemplar_fields]
  if source == "xnli":
    rows = get_task("xnli").load_parallel("dev", [cfg.src_lang, lang], **kwargs)
    pool, seen = [], set()
    for a, b in rows:
      for f in ("premise", "hypothesis"):
        en, tgt = _one_line(a[f]), _one_line(b[f])
        if en not in seen and _clean(en) and (
            cfg.xnli_min_chars <= len(en) <= cfg.xnli_max_chars):
          seen.add(en)
          pool.append((en, tgt))
    return pool
  raise ValueError(f"exemplar source {source!r}; use 'mgsm' or 'xnli'")


def exemplars(source: str, lang: str, cfg) -> tuple[list[Pair], list[Pair]]:
  """(the `shots` prompt exemplars, the held-out rest). MGSM: the first `shots` in order (there
  are 8). XNLI: a seeded sample; the held-out rest is in a seeded order too."""
  pool = parallel_pool(source, lang, cfg)
  if cfg.shots > len(pool):
    raise ValueError(f"shots={cfg.shots} but the {source} pool for {lang} has {len(pool)} pairs")
  if source == "mgsm":
    return pool[:cfg.shots], pool[cfg.shots:]
  order = list(range(len(pool)))
  random.Random(cfg.exemplar_seed).shuffle(order)
  chosen = sorted(order[:cfg.shots])
  return [pool[i] for i in chosen], [pool[i] for i in order[cfg.shots:]]


def build_prompt(pairs: Sequence[Pair], text: str, lang: str, cfg) -> str:
  """The few-shot prompt: each exemplar in `example_template`, then `query_template`."""
  names = dict(src_name=cfg.lang_names[cfg.src_lang], tgt_name=cfg.lang_names[lang])
  shots = "".join(cfg.example_template.format(text=en, translation=tgt, **names)
                  for en, tgt in pairs)
  return shots + cfg.query_template.format(text=text, **names)


def prompt_id(pairs: Sequence[Pair], lang: str, cfg) -> str:
  """Hash of everything besides the source text that changes a translation."""
  settings = [list(pairs), lang, cfg.src_lang, cfg.lang_names[cfg.src_lang], cfg.lang_names[lang],
              cfg.example_template, cfg.query_template, cfg.max_new_tokens, cfg.max_new_ratio,
              cfg.max_new_slack, cfg.truncate]
  return hashlib.sha256(json.dumps(settings, ensure_ascii=False).encode()).hexdigest()[:16]


# ------------------------------------------------------------------------------ segments

Parts = list[list[str]]  # a field: its lines, each a list of sentences


def split_field(text: str, cfg) -> Parts:
  """A field's lines (always: the prompt is one line), long lines cut into sentences."""
  parts = []
  for line in text.split("\n"):
    line = line.strip()
    limit = cfg.split_sentences_over
    long_line = limit >= 0 and len(line) > limit
    parts.append(tf.split_sentences(line, cfg.sentence_splitter) if long_line else
                 ([line] if line else []))
  return parts


def join_field(parts: Parts, lang: str, cfg) -> str:
  joiner = cfg.joiner.get(lang, cfg.joiner["default"])
  return "\n".join(joiner.join(sentences) for sentences in parts)


def needs_decoding(segment: str) -> bool:
  """Segments without letters ('5 + 6 = 11.', '1945') are copied, not translated."""
  return tf.has_letters(segment)


# ------------------------------------------------------------------------------ cache

CacheKey = tuple[str, str, str, str]  # (model id, prompt id, target lang, source text)


def _key(record: Mapping[str, Any]) -> CacheKey:
  return record["model"], record["prompt"], record["lang"], record["src"]


class TranslationCache:
  """Append-only jsonl parts `<dir>/<name>.part<host>.jsonl`; each host appends only to its own
  part, everyone reads all parts. A torn last line (kill -9 mid-write) is skipped when read and
  cut off before the owner appends again."""

  def __init__(self, directory: os.PathLike, name: str, part: int = 0):
    self.dir = pathlib.Path(directory)
    self.name = name
    self.path = self.dir / f"{name}.part{part:03d}.jsonl"

  def parts(self) -> list[pathlib.Path]:
    return sorted(self.dir.glob(f"{self.name}.part*.jsonl"))

  def load(self) -> dict[CacheKey, dict]:
    """All complete records of all parts (later parts win on a duplicate key)."""
    records = {}
    for path in self.parts():
      for record in appendlog.records(path):
        try:
          records[_key(record)] = record
        except (KeyError, TypeError):
          continue
    return records

  def appender(self) -> Callable[[Sequence[dict]], None]:
    """A function that appends records and makes them durable (flush + fsync) per call."""
    self.dir.mkdir(parents=True, exist_ok=True)
    appendlog.cut_torn_tail(self.path)
    return lambda records: appendlog.append(self.path, records, "translate.append")


# ------------------------------------------------------------------------------ decoding


@dataclasses.dataclass
class Throughput:
  segments: int = 0
  tokens: int = 0
  seconds: float = 0.0

  def as_dict(self) -> dict[str, float]:
    s = max(self.seconds, 1e-9)
    return {"decoded_segments": self.segments, "decoded_tokens": self.tokens,
            "decode_s": round(self.seconds, 2), "segments_per_s": round(self.segments / s, 3),
            "tokens_per_s": round(self.tokens / s, 2)}


class Translator:
  """Greedy one-line translation of prompts with a shared Decoder (compiled buckets persist).

  Each segment gets a token budget that grows with its source length (see max_new_ratio).
  Segments are sorted by (budget, prompt length) and cut into full batches, each decoded with
  its largest budget: a runaway row holds its batch only for that budget, and only the very
  last batch is partly empty.
  """

  def __init__(self, model, tokenizer, cfg, mesh=None):
    self.model, self.tokenizer, self.cfg = model, tokenizer, cfg
    self.decoder = decode.Decoder(model, batch_size=cfg.batch_size, mesh=mesh)

  def budget(self, source: str) -> int:
    return segment_budget(self.cfg,
                          len(self.tokenizer.encode(source, add_special_tokens=False)))

  def run(self, prompts: Sequence[str], sources: Sequence[str]
          ) -> Iterator[list[tuple[int, str, int, int, bool]]]:
    """Yields each decoded batch as [(index, translation, generated tokens, budget, stopped)];
    stopped is False when the row used its whole budget without a newline or EOS."""
    budgets = [self.budget(s) for s in sources]
    order = sorted(range(len(prompts)), key=lambda i: (budgets[i], len(prompts[i])))
    size = self.decoder.batch_size
    for k in range(0, len(order), size):
      chunk = order[k:k + size]
      budget = max(budgets[i] for i in chunk)
      batch = []
      for j, done in decode.generate_stream(
          self.model, self.tokenizer, [prompts[i] for i in chunk], max_new_tokens=budget,
          stop=("\n",), decoder=self.decoder, truncate=self.cfg.truncate, progress=False,
          details=True):
        batch.append((chunk[j], done.text.strip(), done.num_tokens, budget, done.stopped))
      yield batch

  def translate(self, prompts: Sequence[str], sources: Sequence[str], desc: str,
                on_batch: Callable[[list[dict]], None] | None = None
                ) -> tuple[list[dict], Throughput]:
    """Records {src, out, ntok, budget, stopped} in order (ntok: generated tokens, the stop
    token included); `on_batch` sees each batch as it finishes."""
    results: list[dict] = [{} for _ in sources]
    speed, start = Throughput(), time.perf_counter()
    bar = tqdm(total=len(sources), desc=desc, unit="seg", disable=not self.cfg.progress,
               dynamic_ncols=True)
    with bar:
      for batch in self.run(prompts, sources):
        records = [{"src": sources[i], "out": out, "ntok": ntok, "budget": budget,
                    "stopped": stopped} for i, out, ntok, budget, stopped in batch]
        for (i, *_), record in zip(batch, records):
          results[i] = record
        if on_batch:
          on_batch(records)
        speed.segments += len(records)
        speed.tokens += sum(r["ntok"] for r in records)
        speed.seconds = time.perf_counter() - start
        bar.update(len(records))
        bar.set_postfix(tok_s=f"{speed.tokens / max(speed.seconds, 1e-9):.1f}")
    return results, speed


def segment_budget(cfg, source_tokens: int) -> int:
  """Generated-token budget of a segment of `source_tokens` English tokens:
  min(max_new_tokens, next pow2(max_new_ratio * source_tokens + max_new_slack)), or always
  max_new_tokens when the ratio is 0."""
  if cfg.max_new_ratio <= 0:
    return cfg.max_new_tokens
  need = int(cfg.max_new_ratio * source_tokens) + cfg.max_new_slack
  return min(cfg.max_new_tokens, _next_pow2(need))


def _next_pow2(n: int, minimum: int = 16) -> int:
  return max(minimum, 1 << max(0, n - 1).bit_length())


def is_truncated(record: Mapping[str, Any]) -> bool:
  """The decoder used the whole token budget without a stop (newline or EOS). Records of
  caches written before `stopped` existed: re-encoded length >= budget, as then."""
  if "stopped" in record:
    return not record["stopped"]
  return record.get("ntok", 0) >= record.get("budget", float("inf"))


# ------------------------------------------------------------------------------ the stage


def _jsonl(rows: Sequence[dict]) -> str:
  return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)


def model_id(model, cfg) -> str:
  source = getattr(model.config, "source_dir", None)
  return cfg.model_id or (os.path.basename(os.path.normpath(source)) if source else "model")


def _unique(items) -> list:
  return list(dict.fromkeys(items))


def translate_task(model, tokenizer, task_name: str, lang: str, config, workdir: os.PathLike,
                   mesh=None, *, process_index: int | None = None,
                   process_count: int | None = None) -> dict[str, Any]:
  """Translates the task's English train rows into `lang`; writes the training files.

  Resumable: finished segments are read from the cache and not decoded again. Multi-host: each
  host decodes every process_count-th unique segment (pass a host-local `mesh`; the workdir
  must be shared); after a barrier process 0 merges all cache parts, writes the files and
  returns the full stats; other hosts return the stats of their own slice.
  """
  start, cfg, task = time.perf_counter(), config, get_task(task_name)
  index = jax.process_index() if process_index is None else process_index
  count = jax.process_count() if process_count is None else process_count
  out_dir = pathlib.Path(workdir) / "translations"
  name = f"{task.name}_{lang}"
  rows = task.load("train", cfg.src_lang, limit=cfg.limit, data_dir=cfg.data_dir,
                   source=cfg.data_source, sample_seed=cfg.sample_seed,
                   allow_subset=cfg.allow_subset)
  plan = [{f: split_field(t, cfg) for f, t in task.translatable_texts(r).items()} for r in rows]
  segments = _unique(s for fields in plan for parts in fields.values() for line in parts
                     for s in line)
  todo = [s for s in segments if needs_decoding(s)]
  pairs, _ = exemplars(cfg.exemplars[task.name], lang, cfg)
  ident = (model_id(model, cfg), prompt_id(pairs, lang, cfg), lang)
  cache = TranslationCache(out_dir / "cache", name, index)

  mine = todo[index::count]
  speed = _decode_missing(Translator(model, tokenizer, cfg, mesh), cache, ident, pairs, mine,
                          cfg, f"translate {name}")
  stats = {"task": task.name, "lang": lang, "model": ident[0], "prompt": ident[1],
           "hosts": count, "host": index,
           "segments": {"total": len(segments), "decode": len(todo),
                        "copied_no_letters": len(segments) - len(todo), "this_host": len(mine),
                        "decoded_this_run": speed.segments,
                        "cached": len(mine) - speed.segments},
           "throughput": speed.as_dict()}
  hosts.barrier(f"translate-{name}-decoded")
  if index == 0:
    found = _lookup(cache, ident, todo)
    stats["segments"]["truncated"] = sum(map(is_truncated, found.values()))
    result = assemble(task, rows, plan, found, lang, cfg)
    stats.update(result.stats)
    stats["segments"]["rejected"] = result.segment_rejects
    stats["rejected_samples"] = result.reject_samples
    stats["wall_s"] = round(time.perf_counter() - start, 2)
    out_dir.mkdir(parents=True, exist_ok=True)
    appendlog.write_atomic(out_dir / f"{name}.train.jsonl", _jsonl(result.rows),
                           "translate.replace")
    appendlog.write_atomic(out_dir / f"{name}.cs.jsonl", _jsonl(result.cs_rows),
                           "translate.replace")
    appendlog.write_atomic(out_dir / f"{name}.stats.json",
                           json.dumps(stats, indent=1, ensure_ascii=False), "translate.replace")
  hosts.barrier(f"translate-{name}-written")
  stats.setdefault("wall_s", round(time.perf_counter() - start, 2))
  return stats


def _decode_missing(translator: Translator, cache: TranslationCache, ident, pairs, sources,
                    cfg, desc: str) -> Throughput:
  """Decodes the `sources` the cache lacks, appending each batch to this host's part."""
  model_name, prompt_hash, lang = ident
  done = cache.load()
  missing = [s for s in sources if (*ident, s) not in done]
  log.info("%s: %d of this host's %d segments left to decode", desc, len(missing), len(sources))
  if not missing:
    return Throughput()
  append = cache.appender()
  stamp = lambda batch: append([{"model": model_name, "prompt": prompt_hash, "lang": lang, **r}
                                for r in batch])
  prompts = [build_prompt(pairs, s, lang, cfg) for s in missing]
  return translator.translate(prompts, missing, desc, stamp)[1]


def _lookup(cache: TranslationCache, ident, sources) -> dict[str, dict]:
  """Every source's cache record, from all hosts' parts."""
  done = cache.load()
  missing = [s for s in sources if (*ident, s) not in done]
  if missing:
    raise RuntimeError(f"{len(missing)} segments have no translation in {cache.dir} (did a "
                       "host fail?); rerun the stage to finish them")
  return {s: done[(*ident, s)] for s in sources}


# ------------------------------------------------------------------------------ assembly


@dataclasses.dataclass
class Assembled:
  rows: list[dict]
  cs_rows: list[dict]
  stats: dict[str, Any]
  segment_rejects: dict[str, int]
  reject_samples: dict[str, list[dict]]  # a few {src, out} per reason, to tune the filters


def _field_results(parts_by_field, found, lang, cfg, fcfg, rejects) -> tuple[dict, dict]:
  """Translated text and first drop reason (or None) of each field of one row."""
  texts, reasons = {}, {}
  for field, parts in parts_by_field.items():
    out_parts, reason = [], None
    for line in parts:
      outs = []
      for seg in line:
        record = found.get(seg)
        out = record["out"] if record else seg
        why = tf.check(seg, out, lang, fcfg, is_truncated(record),
                       light=field in cfg.filters.light_fields) if record else None
        rejects[seg] = (why, out)
        reason = reason or why
        outs.append(out)
      out_parts.append(outs)
    texts[field], reasons[field] = join_field(out_parts, lang, cfg), reason
  return texts, reasons


def _align_answers(en_row: dict, row: dict, lang: str, cfg) -> str | None:
  """Points the (translated) answer at a span of the (translated) context; the method used,
  or None when it cannot be found (the row is then dropped)."""
  answer, context = row["answers"][0]["text"], row["context"]
  en_start = en_row["answers"][0].get("answer_start", -1)
  expect = en_start / max(len(en_row["context"]), 1) * len(context) if en_start >= 0 else None
  span = tf.locate_answer(answer, context, row["lang"] if context != en_row["context"] else "en",
                          expect, cfg.filters.fuzzy_min_score)
  if span is None:
    return None
  row["answers"] = [{"text": context[span.start:span.end], "answer_start": span.start}]
  return span.method


def finalize(task, en_row: dict, texts: Mapping[str, str], lang: str, cfg,
             row_id: str) -> tuple[dict | None, str | None]:
  """(the row in the task's schema with `texts` in `lang`, or None; alignment method)."""
  row = task.with_translations(en_row, texts, lang)
  row["id"] = row_id
  method = None
  if "answers" in row and {"context", "answer"} & set(texts):
    method = _align_answers(en_row, row, lang, cfg)
    if method is None:
      return None, None
  return row, method


def _codeswitched(task, en_row, texts, reasons, lang, cfg, counts) -> list[dict]:
  rows = []
  fields = [f.name for f in task.translatable_fields]
  for spec in cfg.codeswitch.patterns.get(task.name, ()):
    sides = codeswitch.parse_pattern(spec, fields)
    tgt = codeswitch.target_fields(sides)
    slug = codeswitch.pattern_slug(sides, lang)
    if any(reasons[f] for f in tgt):
      counts[f"{slug}:dropped_filter"] += 1
      continue
    row, _ = finalize(task, en_row, {f: texts[f] for f in tgt}, lang, cfg,
                      f"{en_row['id']}.{lang}.{slug}")
    counts[f"{slug}:{'kept' if row else 'dropped_unaligned'}"] += 1
    rows += [row] if row else []
  return rows


def assemble(task, rows, plan, found, lang, cfg) -> Assembled:
  """Rebuilds translated and code-switched rows from the segment translations; counts."""
  fcfg = filter_config(cfg, task.name)
  seg_reject: dict[str, tuple[str | None, str]] = {}
  kept, cs_rows = [], []
  dropped, aligned, cs_counts = (collections.Counter() for _ in range(3))
  for en_row, parts_by_field in zip(rows, plan):
    texts, reasons = _field_results(parts_by_field, found, lang, cfg, fcfg, seg_reject)
    if cfg.codeswitch.enabled:
      cs_rows += _codeswitched(task, en_row, texts, reasons, lang, cfg, cs_counts)
    reason = next((r for r in reasons.values() if r), None)
    if reason:
      dropped[reason] += 1
      continue
    row, method = finalize(task, en_row, texts, lang, cfg, f"{en_row['id']}.{lang}")
    if row is None:
      dropped["unaligned"] += 1
      continue
    if method:
      aligned[method] += 1
    kept.append(row)
  stats = {"items": len(rows), "kept": len(kept), "dropped": dict(sorted(dropped.items())),
           "codeswitched": len(cs_rows), "codeswitch": dict(sorted(cs_counts.items()))}
  if aligned or dropped["unaligned"]:
    stats["answer_alignment"] = {**dict(aligned), "failed": dropped["unaligned"]}
  return Assembled(kept, cs_rows, stats, *_reject_summary(seg_reject))


def _reject_summary(seg_reject, samples: int = 3) -> tuple[dict, dict]:
  """Rejected unique segments per reason, and the first few (source, output) of each."""
  counts, examples = collections.Counter(), collections.defaultdict(list)
  for src, (reason, out) in seg_reject.items():
    if reason:
      counts[reason] += 1
      if len(examples[reason]) < samples:
        examples[reason].append({"src": src, "out": out})
  return dict(sorted(counts.items())), dict(sorted(examples.items()))


# ------------------------------------------------------------------------------ quality


def translation_scores(hyps: Sequence[str], refs: Sequence[str], lang: str) -> dict[str, Any]:
  """Corpus chrF (character 6-grams, sacrebleu default) and BLEU (tokenize zh for Chinese,
  char for Thai, 13a otherwise) against human translations."""
  import sacrebleu  # pylint: disable=g-import-not-at-top
  tokenize = BLEU_TOKENIZE.get(lang, "13a")
  return {"n": len(hyps), "chrf": round(sacrebleu.corpus_chrf(hyps, [refs]).score, 2),
          "bleu": round(sacrebleu.corpus_bleu(hyps, [refs], tokenize=tokenize).score, 2),
          "bleu_tokenize": tokenize}


def _score_set(translator, prompts, pairs, lang, cfg, desc) -> tuple[dict, Throughput]:
  sources, refs = [en for en, _ in pairs], [tgt for _, tgt in pairs]
  records, speed = translator.translate(prompts, sources, desc)
  hyps = [r["out"] for r in records]
  fcfg = filter_config(cfg)
  reasons = [tf.check(s, r["out"], lang, fcfg, is_truncated(r))
             for s, r in zip(sources, records)]
  scores = translation_scores(hyps, refs, lang)
  scores["filter_pass_rate"] = round(reasons.count(None) / max(len(reasons), 1), 3)
  scores["filter_rejects"] = dict(collections.Counter(r for r in reasons if r))
  scores["items"] = [{"en": s, "ref": r, "hyp": h, "filter": why}
                     for s, r, h, why in zip(sources, refs, hyps, reasons)]
  return scores, speed


def quality_report(model, tokenizer, langs: Sequence[str], config, mesh=None,
                   n: int | None = None) -> dict[str, Any]:
  """chrF/BLEU of self-translation against human translations, per language, on (a) `n`
  held-out XNLI dev sentences (never exemplars), prompted like QA/NLI training data, and (b)
  each MGSM exemplar question prompted with the other exemplars (leave-one-out)."""
  cfg = config
  n = cfg.quality.n if n is None else n
  translator = Translator(model, tokenizer, cfg, mesh)
  report, total = {}, Throughput()
  for lang in langs:
    report[lang] = {}
    pairs, heldout = exemplars("xnli", lang, cfg)
    sample = heldout[:n]
    prompts = [build_prompt(pairs, en, lang, cfg) for en, _ in sample]
    report[lang]["xnli_dev"], speed = _score_set(translator, prompts, sample, lang, cfg,
                                                 f"quality xnli {lang}")
    total = _add(total, speed)
    if cfg.quality.mgsm_leave_one_out:
      pool = parallel_pool("mgsm", lang, cfg)
      k = min(cfg.shots, len(pool) - 1)
      prompts = [build_prompt((pool[:i] + pool[i + 1:])[:k], en, lang, cfg)
                 for i, (en, _) in enumerate(pool)]
      report[lang]["mgsm_loo"], speed = _score_set(translator, prompts, pool, lang, cfg,
                                                   f"quality mgsm {lang}")
      total = _add(total, speed)
  return {"langs": report, "throughput": total.as_dict(), "shots": cfg.shots}


def _add(a: Throughput, b: Throughput) -> Throughput:
  return Throughput(a.segments + b.segments, a.tokens + b.tokens, a.seconds + b.seconds)
