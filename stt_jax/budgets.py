"""Token budgets against the data: are train.seq_len, eval.max_new_tokens and the translate
budgets big enough in every language, for this tokenizer?

Budgets are easy to size in English tokens and then silently cut Thai, which a byte-fallback
tokenizer (Llama-2) writes in about 3 tokens per character. This measures p50/p95/p99/max
token lengths of every field per language and says which budget is below p99, by how much:

    python -m stt_jax.budgets --config=configs/mgsm_th.py [--config.model.path=...]
        [--workdir=...]   # also measures workdir/translations/*.train.jsonl
"""

from __future__ import annotations

import dataclasses
import glob
import math
import os
from collections.abc import Iterable, Sequence
from typing import Optional

import numpy as np

from stt_jax import run_config, train_data
from stt_jax import translate as translate_lib
from stt_jax.tasks import DataNotFoundError, get_task
from stt_jax.workdir import Workdir

# Split whose rows carry a gold answer in every language (MGSM test rows have only a number).
GOLD_SPLIT = {"mgsm": "exemplars", "xquad": "test", "xnli": "test"}
# Parallel data (English <-> target, same ids) that shows how long translations get.
PARALLEL = {"mgsm": (("exemplars", ("question", "rationale")), ("test", ("question",))),
            "xquad": (("test", ("context", "question", "answer")),),
            "xnli": (("dev", ("premise", "hypothesis")),)}
QUANTILES = (50, 95, 99)


@dataclasses.dataclass
class Stat:
  """Token lengths of one kind of text in one language, and the budget it must fit."""
  what: str
  lang: str
  lengths: np.ndarray
  chars: int = 0  # Characters of the measured texts (0: not a text length, e.g. a ratio).
  budget_key: str = ""
  budget: Optional[float] = None
  fits: Optional[np.ndarray] = None  # Per item: inside its budget (None: lengths <= budget).
  note: str = ""

  def q(self, p: float) -> float:
    if not len(self.lengths):
      return float("nan")
    return float(np.percentile(self.lengths, p, method="higher"))  # An observed value.

  @property
  def tokens_per_char(self) -> float:
    return float(self.lengths.sum()) / self.chars if self.chars else float("nan")

  @property
  def cut(self) -> float:
    """Share of items over budget."""
    if self.budget is None or not len(self.lengths):
      return 0.0
    fits = self.lengths <= self.budget if self.fits is None else self.fits
    return 1.0 - float(np.mean(fits))

  @property
  def short_by(self) -> float:
    """How far the budget is below p99 (0 when it covers p99)."""
    return 0.0 if self.budget is None else max(0.0, self.q(99) - self.budget)


def _lengths(tokenizer, texts: Sequence[str], special: bool = False) -> np.ndarray:
  if not texts:
    return np.zeros(0, np.int64)
  ids = tokenizer(list(texts), add_special_tokens=special)["input_ids"]
  return np.asarray([len(i) for i in ids], np.int64)


def _stat(tokenizer, what: str, lang: str, texts: Sequence[str], **kw) -> Stat:
  return Stat(what, lang, _lengths(tokenizer, texts, kw.pop("special", False)),
              chars=sum(len(t) for t in texts), **kw)


def _sample(rows: list, max_rows: int, seed: int = 0) -> list:
  if not max_rows or len(rows) <= max_rows:
    return rows
  keep = sorted(np.random.default_rng(seed).choice(len(rows), max_rows, replace=False))
  return [rows[i] for i in keep]


def _examples(task, tokenizer, rows: Sequence[dict]) -> np.ndarray:
  """Tokens of each training example as train_data.tokenize builds it: BOS + prompt + target
  as one text, then EOS."""
  pairs = train_data.joined_tokens(tokenizer, [task.format_prompt(r) for r in rows],
                                   [task.format_target(r) for r in rows])
  return np.asarray([len(ids) + 1 for ids, _ in pairs], np.int64)


def _train_stats(task, tokenizer, rows, lang: str, seq_len: int, label: str,
                 note: str = "") -> list[Stat]:
  """Each translatable field and the whole example, against train.seq_len."""
  out = [_stat(tokenizer, f"{label} {f.name}", lang, [task.get_text(r, f.name) for r in rows],
               note=note) for f in task.translatable_fields]
  chars = sum(len(task.format_prompt(r)) + len(task.format_target(r)) for r in rows)
  # A packed row holds seq_len + 1 tokens (inputs and shifted targets).
  out.append(Stat(f"{label} prompt+target", lang, _examples(task, tokenizer, rows), chars,
                  "train.seq_len+1", seq_len + 1, note=note))
  return out


def _load(task, split: str, lang: str, cfg, limit=None, sample_seed=None, offline=None):
  """Rows from the config's source; when it has none (e.g. no hub here), the bundled copy
  stands in, even a partial one (lengths of a subset are still lengths), said in the note.
  `offline` (a list) remembers a failed source so it is not retried for every split."""
  kw = dict(limit=limit, data_dir=cfg.task.data_dir, sample_seed=sample_seed)
  if not offline:
    try:
      return task.load(split, lang, source=cfg.task.data_source,
                       allow_subset=cfg.task.allow_subset, **kw), ""
    except DataNotFoundError:
      if offline is not None:
        offline.append(cfg.task.data_source)
  rows = task.load(split, lang, source="auto", allow_subset=True, **kw)
  partial = task.partial_copy(task.splits[split], lang)
  return rows, (f"data_source={cfg.task.data_source} unavailable: bundled "
                + ("subset" if partial and rows.source == str(partial) else "copy"))


def _parallel(task, split: str, fields: Sequence[str], src: str, lang: str, cfg
              ) -> list[tuple[str, str]]:
  """(English, target) text pairs, line by line where the line counts agree."""
  pairs = []
  for a, b in task.load_parallel(split, [src, lang], data_dir=cfg.task.data_dir):
    for f in fields:
      x, y = task.get_text(a, f), task.get_text(b, f)
      xs, ys = x.split("\n"), y.split("\n")
      pairs += list(zip(xs, ys)) if len(xs) == len(ys) else [(x, y)]
  return [(x.strip(), y.strip()) for x, y in pairs if x.strip() and y.strip()]


def _translate_budget(cfg_t, src_tokens: np.ndarray) -> np.ndarray:
  """The stage's per-segment budget (translate.segment_budget) for each source length."""
  return np.asarray([translate_lib.segment_budget(cfg_t, int(n)) for n in src_tokens],
                    np.int64)


def measure(cfg, tokenizer, workdir: Optional[str] = None, max_rows: int = 5000,
            context: Optional[int] = None) -> list[Stat]:
  """Every length the config's budgets must cover, per language.

  cfg: a run config (stt_jax.run_config); tokenizer: a Hugging Face tokenizer; max_rows: a
  seeded sample of each split (0 = all); context: the model's max positions, if known (test
  prompt + eval.max_new_tokens must fit it).
  """
  task = get_task(cfg.task.name)
  offline: list[str] = []  # A data source found unavailable, not retried for every split.
  stats = _english_stats(cfg, task, tokenizer, max_rows, offline)
  seg, en_examples = stats[-1], stats[-2].lengths
  for lang in cfg.task.target_langs:
    stats += _translation_stats(cfg, task, tokenizer, lang, seg, en_examples)
  stats += _eval_stats(cfg, task, tokenizer, context, offline)
  if workdir:  # The translate stage's output, once it exists.
    pattern = Workdir(workdir).translation(task.name, "*", "train")
    for path in sorted(glob.glob(pattern)):
      lang = os.path.basename(path)[len(task.name) + 1:-len(".train.jsonl")]
      translated = _sample(train_data.read_rows(path), max_rows)
      stats += _train_stats(task, tokenizer, translated, lang, cfg.train.seq_len, "translated",
                            os.path.basename(path))
  return stats


def _english_stats(cfg, task, tokenizer, max_rows: int, offline: list) -> list[Stat]:
  """English training rows (fields and whole examples), then the translate segments they
  make (last)."""
  src = cfg.translate.src_lang
  rows, note = _load(task, "train", src, cfg, cfg.task.train_limit, cfg.task.train_sample_seed,
                     offline)
  rows = _sample(list(rows), max_rows)
  stats = _train_stats(task, tokenizer, rows, src, cfg.train.seq_len, "train", note)
  segments = [s for r in rows for text in task.translatable_texts(r).values()
              for line in translate_lib.split_field(text, cfg.translate) for s in line]
  return stats + [_stat(tokenizer, "translate source segment", src, segments, note=note)]


def _translation_stats(cfg, task, tokenizer, lang: str, seg: Stat,
                       en_examples: np.ndarray) -> list[Stat]:
  """How long a translation into `lang` gets, from parallel text (per pair target/source
  tokens), and the train segments and examples once in `lang`, estimated with the median
  ratio."""
  t, src = cfg.translate, cfg.translate.src_lang
  pairs = [p for split, fields in PARALLEL[task.name]
           for p in _parallel(task, split, fields, src, lang, cfg)]
  src_len = _lengths(tokenizer, [x for x, _ in pairs])
  splits = "+".join(split for split, _ in PARALLEL[task.name])
  tgt = _stat(tokenizer, f"translation ({splits}, parallel)", lang, [y for _, y in pairs],
              budget_key="translate.max_new_tokens/ratio")
  tgt.fits = tgt.lengths <= _translate_budget(t, src_len)
  tgt.budget = float(t.max_new_tokens)
  ratio = tgt.lengths / np.maximum(src_len, 1)
  r50 = float(np.median(ratio)) if len(ratio) else float("nan")
  est = np.ceil(seg.lengths * r50).astype(np.int64)
  return [tgt,
          Stat("translation/source tokens", lang, ratio, budget_key="translate.max_new_ratio",
               budget=t.max_new_ratio if t.max_new_ratio > 0 else None),
          Stat("translate output (est.)", lang, est, budget_key="translate.max_new_tokens/ratio",
               budget=float(t.max_new_tokens), fits=est <= _translate_budget(t, seg.lengths),
               note=f"x{r50:.2f} median"),
          Stat("train prompt+target (est.)", lang, np.ceil(en_examples * r50).astype(np.int64),
               budget_key="train.seq_len+1", budget=cfg.train.seq_len + 1,
               note=f"x{r50:.2f} median")]


def _eval_stats(cfg, task, tokenizer, context: Optional[int], offline: list) -> list[Stat]:
  """Gold answers in every test language (what the model must generate), then the test
  prompts (with the special prefix, as evaluation encodes them)."""
  stats, generates = [], cfg.eval.method == "generate"
  for lang in cfg.eval.langs:
    try:
      gold = task.load(GOLD_SPLIT[task.name], lang, data_dir=cfg.task.data_dir)
    except DataNotFoundError:
      continue
    stats.append(_stat(tokenizer, f"gold target ({GOLD_SPLIT[task.name]})", lang,
                       [task.format_target(r) for r in gold],
                       budget_key="eval.max_new_tokens" if generates else "",
                       budget=cfg.eval.max_new_tokens if generates else None,
                       note="" if generates else "loglik: not generated"))
  for lang in cfg.eval.langs:
    test, note = _load(task, "test", lang, cfg, cfg.eval.limit, offline=offline)
    prompt = _stat(tokenizer, "test prompt", lang, [task.format_prompt(r) for r in test],
                   special=True, note=note)
    if context:
      prompt.budget_key = "context-eval.max_new_tokens"
      prompt.budget = context - (cfg.eval.max_new_tokens if generates else 8)
    stats.append(prompt)
  return stats


def tokens_per_char(stats: Iterable[Stat]) -> dict[str, float]:
  """Tokens per character of every measured text, per language."""
  tokens: dict[str, float] = {}
  chars: dict[str, int] = {}
  for s in stats:
    if s.chars and "prompt+target" not in s.what and "prompt" not in s.what:
      tokens[s.lang] = tokens.get(s.lang, 0) + float(s.lengths.sum())
      chars[s.lang] = chars.get(s.lang, 0) + s.chars
  return {lang: tokens[lang] / chars[lang] for lang in tokens}


def short(stats: Iterable[Stat]) -> list[Stat]:
  """The stats whose budget is below their p99."""
  return [s for s in stats if s.short_by > 0]


def _num(x: float) -> str:
  if math.isnan(x):
    return "-"
  return f"{x:.0f}" if float(x).is_integer() else f"{x:.2f}"


def table(stats: Sequence[Stat]) -> str:
  """A markdown table: one row per stat, the budget and whether it covers p99."""
  head = ("| what | lang | n | p50 | p95 | p99 | max | tok/char | budget | cut | verdict | note |\n"
          "|---|---|---|---|---|---|---|---|---|---|---|---|")
  lines = [head]
  for s in stats:
    budget = f"{s.budget_key}={_num(s.budget)}" if s.budget is not None else ""
    if s.budget is None:
      verdict = ""
    elif s.short_by > 0:
      verdict = f"**below p99 by {_num(s.short_by)} ({s.short_by / s.q(99):.0%})**"
    else:
      verdict = "ok"
    lines.append(
        f"| {s.what} | {s.lang} | {len(s.lengths)} | " + " | ".join(_num(s.q(p)) for p in
                                                                    QUANTILES)
        + f" | {_num(float(s.lengths.max())) if len(s.lengths) else '-'} | "
        f"{_num(s.tokens_per_char)} | {budget} | {s.cut:.1%} | {verdict} | {s.note} |")
  return "\n".join(lines)


def report(stats: Sequence[Stat]) -> str:
  """The table, tokens per character per language, and one line per budget below p99."""
  per_char = tokens_per_char(stats)
  out = [table(stats), "", "tokens per character: " +
         ", ".join(f"{lang} {v:.2f}" for lang, v in per_char.items())]
  below = short(stats)
  out += [f"below p99: {s.budget_key}={_num(s.budget)} for {s.what} [{s.lang}] (p99 "
          f"{_num(s.q(99))}, short by {_num(s.short_by)}; {s.cut:.1%} over budget)"
          for s in below] or ["every budget covers p99"]
  return "\n".join(out)


def load_tokenizer(path: str):
  """A model folder's tokenizer (checked as preflight does), or a tokenizer-only folder's."""
  from stt_jax import preflight  # pylint: disable=g-import-not-at-top
  if os.path.isfile(os.path.join(path, "config.json")):
    return preflight.load_tokenizer(path)
  if not os.path.isdir(path):
    raise preflight.PreflightError(f"model.path={path!r}: folder not found; pass a model or "
                                   "tokenizer folder with --config.model.path")
  from transformers import AutoTokenizer  # pylint: disable=g-import-not-at-top
  return AutoTokenizer.from_pretrained(path, trust_remote_code=False)


def _context(path: str) -> Optional[int]:
  from stt_jax.models import ModelConfig  # pylint: disable=g-import-not-at-top
  if not os.path.isfile(os.path.join(path, "config.json")):
    return None
  return ModelConfig.from_hf(path).max_position_embeddings


def main(argv: Sequence[str]) -> None:
  from absl import app, flags  # pylint: disable=g-import-not-at-top
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  cfg = flags.FLAGS.config
  if cfg is None:
    raise app.UsageError("--config is required, e.g. --config=configs/mgsm_th.py")
  run_config.validate(cfg)
  tokenizer = load_tokenizer(cfg.model.path)
  stats = measure(cfg, tokenizer, flags.FLAGS.workdir, flags.FLAGS.max_rows,
                  _context(cfg.model.path))
  print(f"# budgets: {cfg.name}, tokenizer {cfg.model.path}\n")
  print(report(stats))


def run() -> None:
  """The CLI, with the pipeline's --config/--workdir flags and its one-line errors."""
  from absl import app, flags  # pylint: disable=g-import-not-at-top
  from stt_jax import cli  # pylint: disable=g-import-not-at-top  # Defines the flags.
  flags.DEFINE_integer("max_rows", 5000, "Seeded sample of each split measured (0 = all).")
  app.run(cli.one_line_errors(main), flags_parser=cli.parse_flags)


if __name__ == "__main__":
  run()
