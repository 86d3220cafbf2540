"""Self-translation, the library part: few-shot prompts, segments, the decode cache, and the
Translator that decodes segments greedily, one line each.

  pairs, _ = exemplars("mgsm", "de", cfg.translate)
  prompt = build_prompt(pairs, "How many apples?", "de", cfg.translate)
  records, speed = Translator(model, tokenizer, cfg.translate).translate([prompt], [src], "de")

`cfg` is the run config's `translate` section (stt_jax.run_config). Every translatable field
of a row is cut into segments (lines; long lines into sentences) so that identical segments
are decoded once. The stage that runs this over a task, host by host, with a resumable cache
and the assembly of training rows is stt_jax.stages.translate; rebuilding rows from segment
translations is stt_jax.translate_assemble; chrF/BLEU against human translations is
stt_jax.translate_quality.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import pathlib
import random
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

from stt_jax import appendlog
from stt_jax import decode, generation
from stt_jax.engine import Engine
from stt_jax import translate_filters as tf
from stt_jax.tasks import get_task

log = logging.getLogger(__name__)


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


def parallel_pool(source: str, lang: str, cfg, data_dir: str | None = None) -> list[Pair]:
  """(English, target) sentence pairs that exemplars are drawn from, in a fixed order;
  `data_dir`: the task data folder (None: bundled data/)."""
  kwargs = dict(data_dir=data_dir)
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


def exemplars(source: str, lang: str, cfg, data_dir: str | None = None
              ) -> tuple[list[Pair], list[Pair]]:
  """(the `shots` prompt exemplars, the held-out rest). MGSM: the first `shots` in order (there
  are 8). XNLI: a seeded sample; the held-out rest is in a seeded order too."""
  pool = parallel_pool(source, lang, cfg, data_dir)
  if cfg.shots > len(pool):
    raise ValueError(f"shots={cfg.shots} but the {source} pool for {lang} has {len(pool)} pairs")
  if source == "mgsm":
    return pool[:cfg.shots], pool[cfg.shots:]
  order = list(range(len(pool)))
  random.Random(cfg.exemplar_seed).shuffle(order)
  chosen = sorted(order[:cfg.shots])
  return [pool[i] for i in chosen], [pool[i] for i in order[cfg.shots:]]


def build_prompt(pairs: Sequence[Pair], text: str, lang: str, cfg,
                 src: str | None = None) -> str:
  """The few-shot prompt: each exemplar in `example_template`, then `query_template`. `src`:
  the language of `text` and of each pair's first side (default cfg.src_lang; the round-trip
  pass translates back with src=<target>, lang=<cfg.src_lang> and reversed pairs)."""
  names = dict(src_name=cfg.lang_names[src or cfg.src_lang], tgt_name=cfg.lang_names[lang])
  shots = "".join(cfg.example_template.format(text=en, translation=tgt, **names)
                  for en, tgt in pairs)
  return shots + cfg.query_template.format(text=text, **names)


def prompt_id(pairs: Sequence[Pair], lang: str, cfg, src: str | None = None) -> str:
  """Hash of everything besides the source text that changes a translation (`src` as in
  build_prompt)."""
  src = src or cfg.src_lang
  settings = [list(pairs), lang, src, cfg.lang_names[src], cfg.lang_names[lang],
              cfg.example_template, cfg.query_template, cfg.max_new_tokens, cfg.max_new_ratio,
              cfg.max_new_slack, cfg.truncate, "budget=per-row"]
  return hashlib.sha256(json.dumps(settings, ensure_ascii=False).encode()).hexdigest()[:16]


def model_id(model, cfg) -> str:
  """The model's name in the cache key: translate.model_id, else the model folder's name."""
  source = getattr(model.config, "source_dir", None)
  return cfg.model_id or (os.path.basename(os.path.normpath(source)) if source else "model")


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
  slot_use: float = 0.0  # useful tokens / (slots x device decode steps)

  def as_dict(self) -> dict[str, float]:
    s = max(self.seconds, 1e-9)
    return {"decoded_segments": self.segments, "decoded_tokens": self.tokens,
            "decode_s": round(self.seconds, 2), "segments_per_s": round(self.segments / s, 3),
            "tokens_per_s": round(self.tokens / s, 2), "slot_use": round(self.slot_use, 3)}


class Translator:
  """Greedy one-line translation of prompts with a shared continuous-batching Engine (its
  compiled programs persist across calls).

  Each segment gets its own token budget, growing with its source length (see max_new_ratio):
  a runaway row stops at its own budget, and its slot is refilled at once.
  """

  def __init__(self, model, tokenizer, cfg, mesh=None, kv_dtype=None):
    """cfg: the translate section; kv_dtype: the engine's KV cache (run config model.kv_dtype;
    default the model's compute dtype)."""
    self.model, self.tokenizer, self.cfg = model, tokenizer, cfg
    self.engine = Engine(model, slots=cfg.batch_size, mesh=mesh,
                         steps_per_call=cfg.steps_per_call, prefill_chunk=cfg.prefill_chunk,
                         kv_dtype=kv_dtype)

  def budget(self, source: str) -> int:
    return segment_budget(self.cfg,
                          len(self.tokenizer.encode(source, add_special_tokens=False)))

  def run(self, prompts: Sequence[str], sources: Sequence[str]
          ) -> Iterator[list[tuple[int, str, int, int, bool]]]:
    """Yields finished segments in groups of up to `batch_size`, as
    [(index, translation, generated tokens, budget, stopped)]; stopped is False when the row
    used its whole budget without a newline or EOS."""
    budgets = [self.budget(s) for s in sources]
    group = []
    for i, done in generation.generate_stream(
        self.model, self.tokenizer, prompts, max_new_tokens=budgets, stop=("\n",),
        engine=self.engine, truncate=self.cfg.truncate, progress=False, details=True):
      group.append((i, done.text.strip(), done.num_tokens, budgets[i], done.stopped))
      if len(group) >= self.cfg.batch_size:
        yield group
        group = []
    if group:
      yield group

  def translate(self, prompts: Sequence[str], sources: Sequence[str], desc: str,
                on_batch: Callable[[list[dict]], None] | None = None
                ) -> tuple[list[dict], Throughput]:
    """Records {src, out, ntok, budget, stopped} in order (ntok: generated tokens, the stop
    token included); `on_batch` sees each group as it finishes."""
    results: list[dict] = [{} for _ in sources]
    with decode.RateBar(len(sources), desc, unit="seg", disable=not self.cfg.progress) as bar:
      for batch in self.run(prompts, sources):
        records = [{"src": sources[i], "out": out, "ntok": ntok, "budget": budget,
                    "stopped": stopped} for i, out, ntok, budget, stopped in batch]
        for (i, *_), record in zip(batch, records):
          results[i] = record
        if on_batch:
          on_batch(records)
        bar.update(len(records), sum(r["ntok"] for r in records),
                   slot_use=self.engine.stats.slot_use(self.engine.slots))
    speed = Throughput(bar.items, bar.tokens, bar.seconds,
                       slot_use=self.engine.stats.slot_use(self.engine.slots))
    return results, speed


def segment_budget(cfg, source_tokens: int) -> int:
  """Generated-token budget of a segment of `source_tokens` English tokens:
  min(max_new_tokens, max_new_ratio * source_tokens + max_new_slack), or always
  max_new_tokens when the ratio is 0. Exact per row: the engine compiles nothing per budget."""
  if cfg.max_new_ratio <= 0:
    return cfg.max_new_tokens
  return min(cfg.max_new_tokens, int(cfg.max_new_ratio * source_tokens) + cfg.max_new_slack)


def is_truncated(record: Mapping[str, Any]) -> bool:
  """The decoder used the whole token budget without a stop (newline or EOS). Records of
  caches written before `stopped` existed: re-encoded length >= budget, as then."""
  if "stopped" in record:
    return not record["stopped"]
  return record.get("ntok", 0) >= record.get("budget", float("inf"))
