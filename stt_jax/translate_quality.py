"""How good is self-translation: chrF/BLEU against human translations (the paper's Table 6).

  report = quality_report(model, tokenizer, ["de", "zh"], cfg.translate)

Two held-out sets, never the prompt exemplars: XNLI dev sentences (prompted like QA/NLI
training data) and each MGSM exemplar question prompted with the other exemplars.
"""

from __future__ import annotations

import collections
from collections.abc import Sequence
from typing import Any

from stt_jax import translate_filters as tf
from stt_jax.translate import (Throughput, Translator, build_prompt, exemplars, filter_config,
                               is_truncated, parallel_pool)

# sacrebleu BLEU tokenisation per language; chrF is character-based everywhere.
BLEU_TOKENIZE = {"zh": "zh", "th": "char", "ja": "char"}


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
                   n: int | None = None, data_dir: str | None = None) -> dict[str, Any]:
  """chrF/BLEU of self-translation against human translations, per language, on (a) `n`
  held-out XNLI dev sentences (never exemplars), prompted like QA/NLI training data, and (b)
  each MGSM exemplar question prompted with the other exemplars (leave-one-out)."""
  cfg = config
  n = cfg.quality.n if n is None else n
  translator = Translator(model, tokenizer, cfg, mesh)
  report, total = {}, Throughput()
  for lang in langs:
    report[lang] = {}
    pairs, heldout = exemplars("xnli", lang, cfg, data_dir)
    sample = heldout[:n]
    prompts = [build_prompt(pairs, en, lang, cfg) for en, _ in sample]
    report[lang]["xnli_dev"], speed = _score_set(translator, prompts, sample, lang, cfg,
                                                 f"quality xnli {lang}")
    total = _add(total, speed)
    if cfg.quality.mgsm_leave_one_out:
      pool = parallel_pool("mgsm", lang, cfg, data_dir)
      k = min(cfg.shots, len(pool) - 1)
      prompts = [build_prompt((pool[:i] + pool[i + 1:])[:k], en, lang, cfg)
                 for i, (en, _) in enumerate(pool)]
      report[lang]["mgsm_loo"], speed = _score_set(translator, prompts, pool, lang, cfg,
                                                   f"quality mgsm {lang}")
      total = _add(total, speed)
  return {"langs": report, "throughput": total.as_dict(), "shots": cfg.shots}


def _add(a: Throughput, b: Throughput) -> Throughput:
  return Throughput(a.segments + b.segments, a.tokens + b.tokens, a.seconds + b.seconds)
