"""Eval scoring (log-likelihood vs transformers, bootstrap CI), report table/plot, config
schema errors."""

import csv
import json
import os

import ml_collections
import numpy as np
import pytest
import torch
import transformers

from stt_jax import run_config
from stt_jax import scoring
from stt_jax.stages import report
from stt_jax.models import load_hf
from stt_jax.tasks import get_task
from tests import hf_tiny


@pytest.mark.parametrize("kind", hf_tiny.TOKENIZERS)
def test_loglik_matches_transformers_on_the_joined_text(tmp_path, kind):
  """Our loglik = torch's log-probs of the tokens of prompt + continuation after the prompt's
  tokens. On sp, encoding the continuation alone would add a '▁' after 'Label:\n' and split
  '▁entailment' across 'Label: ent' + 'ailment'."""
  folder = hf_tiny.make_tiny("qwen2", str(tmp_path / "m"), vocab_size=hf_tiny.vocab_size(kind))
  tok = hf_tiny.tokenizer(kind)
  model, _ = load_hf(folder)
  prompts = ["Premise: a\nHypothesis: b\nLabel:", "xyz", "Premise: longer text here\nLabel:",
             "Premise: a dog.\nLabel:\n", "Premise: a dog.\nLabel: ent"]
  conts = [" entailment", " neutral", " contradiction"]
  # Each prompt with several continuations (computed once), and in varying order; the last
  # prompt's continuations start inside its last token ('ailment') or after it (' x').
  prompts = prompts[:3] * 3 + prompts[3:] * 2
  conts = (conts + conts[::-1] + [" x", " yy", " entailment"]
           + ["entailment", "ailment", "42", " x"])
  got = scoring.loglik_fn(model, tok, batch_size=2)(prompts, conts)
  hf = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
  for p, c, g in zip(prompts, conts, got):
    joined, alone = tok(p + c)["input_ids"], tok(p)["input_ids"]
    n = next((i for i, (a, b) in enumerate(zip(alone, joined)) if a != b), len(alone))
    with torch.no_grad():
      logp = torch.log_softmax(hf(torch.tensor([joined])).logits[0, :-1], -1)
    ref = sum(float(logp[i - 1, joined[i]]) for i in range(n, len(joined)))
    assert abs(g - ref) < 1e-3, (p, c, g, ref)


def test_score_split_xnli_loglik_and_generate(tmp_path):
  folder = hf_tiny.make_tiny("llama_gqa", str(tmp_path / "m"))
  tok = hf_tiny.byte_tokenizer()
  model, _ = load_hf(folder)
  task = get_task("xnli")
  rows = task.load("test", "de", limit=6)
  res = scoring.score_split(model, tok, task, rows, "de", method="loglik", batch_size=4)
  acc, lo, hi = res["metrics"]["accuracy"]
  assert res["n"] == 6 and 0 <= lo <= acc <= hi <= 1
  gen = scoring.score_split(model, tok, task, rows[:2], "de", method="generate",
                            max_new_tokens=4, batch_size=2)
  assert len(gen["predictions"]) == 2
  with pytest.raises(ValueError, match="needs a task with label words"):
    scoring.score_split(model, tok, get_task("mgsm"), [], "de", method="loglik")


def test_score_split_counts_generations_cut_by_the_budget(tmp_path):
  """A model whose final norm is 0 has all-zero logits, so greedy always emits token 0: with
  eos_token_id=0 every generation stops at once, otherwise each one runs out of tokens."""
  tok = hf_tiny.byte_tokenizer()
  task = get_task("xnli")
  rows = task.load("test", "de", limit=3)
  for eos, cut in ((0, 0), (2, 3)):
    folder = hf_tiny.make_tiny("llama_gqa", str(tmp_path / f"eos{eos}"), eos_token_id=eos)
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    with torch.no_grad():
      hf.model.norm.weight.zero_()
    hf.save_pretrained(folder)
    model, _ = load_hf(folder)
    res = scoring.score_split(model, tok, task, rows, "de", method="generate",
                              max_new_tokens=3, batch_size=4)
    assert res["truncated"] == cut and res["stopped"] == [cut == 0] * 3
  loglik = scoring.score_split(model, tok, task, rows, "de", method="loglik", batch_size=4)
  assert (loglik["truncated"], loglik["stopped"]) == (0, None)


def test_bootstrap_ci():
  lo, hi = scoring.bootstrap_ci([1.0] * 30 + [0.0] * 70)
  assert lo < 0.3 < hi and hi - lo < 0.25
  assert scoring.bootstrap_ci([1.0, 1.0]) == (1.0, 1.0)


def test_paired_statistics_known_values():
  same = [1.0, 0.0, 1.0, 1.0, 0.0]
  assert scoring.paired_bootstrap(same, same) == (0.0, 0.0, 0.0)
  assert scoring.mcnemar(same, same) == (1.0, 0, 0)
  # 1 item only the variant got right, 5 only the baseline: n = 6 discordant, k = 1;
  # p = 2 * (C(6,0) + C(6,1)) / 2^6 = 14/64.
  a = [1, 0, 0, 0, 0, 0, 1, 0]
  b = [0, 1, 1, 1, 1, 1, 1, 0]
  p, better, worse = scoring.mcnemar(a, b)
  assert (better, worse) == (1, 5) and p == pytest.approx(14 / 64)
  assert scoring.mcnemar([0] * 10, [1] * 10) == (pytest.approx(2 / 1024), 0, 10)
  assert scoring.mcnemar([100.0, 0.0], [0.0, 0.0])[1:] == (1, 0)  # exact match in [0, 100]
  assert scoring.mcnemar([0.5, 1.0], [1.0, 1.0]) is None  # F1: graded, no McNemar
  big = scoring.mcnemar([1] * 3000 + [0] * 2000, [0] * 3000 + [1] * 2000)
  assert 0 < big[0] < 1e-10 and big[1:] == (3000, 2000)
  delta, lo, hi = scoring.paired_bootstrap(a, b)
  assert delta == pytest.approx(-0.5) and lo <= delta <= hi
  # Pairing: a constant +1 item shift has no spread, however varied the items are.
  base = np.random.default_rng(1).uniform(0, 50, 200)
  assert scoring.paired_bootstrap(base + 1, base) == pytest.approx((1.0, 1.0, 1.0))
  assert scoring.paired_bootstrap(a, b) == scoring.paired_bootstrap(a, b)  # fixed seed


def test_paired_items_match_by_id_or_fail_in_one_line():
  a = [{"id": "x", "accuracy": 1.0}, {"id": "y", "accuracy": 0.0}]
  b = [{"id": "y", "accuracy": 1.0}, {"id": "x", "accuracy": 1.0}]
  got = scoring.paired_items(a, b, "accuracy")
  assert [list(v) for v in got] == [[1.0, 0.0], [1.0, 1.0]]
  with pytest.raises(ValueError, match=r"^A \(2 items\) and B \(1 items\) cover different "
                     r"test items \(e.g. 'y' only in A\); score both with the same "
                     r"eval.limit") as err:
    scoring.paired_items(a, b[1:], "accuracy", names=("A", "B"))
  assert "\n" not in str(err.value)
  with pytest.raises(ValueError, match="an id appears twice"):
    scoring.paired_items(a + a[:1], b, "accuracy")


def _predictions(tmp_path, variant, step, values, lang="zh", task="mgsm", ids=None):
  path = tmp_path / "eval" / "predictions" / f"{variant}-{step}-{task}-{lang}.jsonl"
  path.parent.mkdir(parents=True, exist_ok=True)
  ids = ids or [f"mgsm-{i}" for i in range(len(values))]
  path.write_text("".join(json.dumps({"id": i, "prediction": "", "accuracy": v}) + "\n"
                          for i, v in zip(ids, values)))


def test_report_paired_table_and_csv(tmp_path):
  rows = [_row("zero_shot", "zh", 0.5), _row("self_translate", "zh", 0.75),
          _row("base", "zh", 0.25, step=0), _row("self_translate_rt", "zh", 0.5),
          _row("zero_shot", "en", 0.5), _row("self_translate", "en", 0.5)]
  (tmp_path / "eval").mkdir()
  with open(tmp_path / "eval" / "metrics.jsonl", "w") as f:
    f.write("".join(json.dumps(r) + "\n" for r in rows))
  _predictions(tmp_path, "zero_shot", 10, [1, 0, 1, 0])
  _predictions(tmp_path, "self_translate", 10, [1, 1, 1, 0])
  _predictions(tmp_path, "base", 0, [0, 0, 1, 0])
  _predictions(tmp_path, "self_translate_rt", 10, [1, 0, 1], ids=["mgsm-0", "mgsm-1", "x"])
  md = report.write_report([str(tmp_path)])
  assert "#### mgsm — Δ vs zero_shot (paired) — m" in md
  assert "predicted labels" not in md  # Open answers: no label table.
  # base: only item 0 differs (zero_shot right): Δ = -25 points, p = 1 (1 discordant item).
  assert "| base | zh | -25.0 | [-75.0, +0.0] | 1 | 4 | 0 / 1 |" in md
  assert "| self_translate | zh | +25.0 | [+0.0, +75.0] | 1 | 4 | 1 / 0 |" in md
  assert ("- self_translate_rt zh: report: eval/predictions/self_translate_rt-10-mgsm-zh.jsonl "
          "(3 items) and eval/predictions/zero_shot-10-mgsm-zh.jsonl (4 items) cover different "
          "test items (e.g. 'x' only in") in md
  table = list(csv.DictReader((tmp_path / "report.csv").read_text().splitlines()))
  paired = {(r["variant"], r["lang"]): r for r in table}
  assert paired[("self_translate", "zh")]["paired_delta"] == "0.25"
  assert paired[("self_translate", "zh")]["mcnemar_p"] == "1.0"
  assert paired[("self_translate", "zh")]["discordant_better"] == "1"
  assert paired[("self_translate", "en")]["paired_delta"] == ""  # no prediction files
  assert paired[("zero_shot", "zh")]["paired_n"] == ""


def _row(variant, lang, value, step=10, model="m", params=1e6, task="mgsm", **extra):
  return {"variant": variant, "step": step, "task": task, "lang": lang, "metric": "accuracy",
          "value": value, "ci_low": value - 0.05, "ci_high": value + 0.05, "n": 100,
          "model": model, "params": params, "seconds": 1.0, **extra}


def test_report_table_deltas_and_plot(tmp_path):
  rows = [_row("zero_shot", "zh", 0.20), _row("self_translate", "zh", 0.26, truncated=3),
          _row("self_translate", "zh", 0.10, step=5), _row("base", "zh", 0.05, step=0),
          _row("zero_shot", "en", 0.40), _row("self_translate", "en", 0.41),
          _row("zero_shot", "zh", 0.30, model="big", params=7e9),
          _row("self_translate", "zh", 0.45, model="big", params=7e9)]
  os.makedirs(tmp_path / "eval")
  with open(tmp_path / "eval" / "metrics.jsonl", "w") as f:
    for r in rows:
      f.write(json.dumps(r) + "\n")
    f.write('{"torn": ')  # An interrupted writer's last line is skipped.
  os.makedirs(tmp_path / "runs" / "self_translate" / "train")
  cut = {"translated": {"zh": {"truncated": 2, "dropped": 1, "of": 50}}}
  with open(tmp_path / "runs" / "self_translate" / "train" / "metrics.jsonl", "w") as f:
    f.write(json.dumps({"step": 1, "loss": 2.0}) + "\n")
    f.write(json.dumps({"step": 2, "loss": 1.0, "seq_len_cut": cut}) + "\n")
  md = report.write_report([str(tmp_path)])
  assert "| self_translate | 26.0 [21.0, 31.0] (+6.0) †3 | 41.0 [36.0, 46.0] (+1.0) |" in md
  assert "†k: k generations hit eval.max_new_tokens" in md
  assert "- self_translate: translated/zh: 2 truncated, 1 dropped of 50" in md
  assert "| zero_shot | 20.0 [15.0, 25.0] | 40.0 [35.0, 45.0] |" in md
  assert "| base | 5.0 [0.0, 10.0] (-15.0) | — |" in md
  assert (tmp_path / "report.png").stat().st_size > 1000
  lines = (tmp_path / "report.csv").read_text().splitlines()
  assert lines[0].startswith("model,task,metric,variant") and len(lines) == 1 + 7
  assert lines[0].startswith("model,task,metric,variant,lang,step,value,ci_low,ci_high,n,"
                             "delta_vs_zero_shot,truncated,paired_delta,")
  cut = {(r["model"], r["variant"], r["lang"]): r["truncated"]
         for r in csv.DictReader(lines)}
  assert cut[("m", "self_translate", "zh")] == "3" and cut[("m", "zero_shot", "zh")] == ""


def test_config_validation_names_nearest_key():
  schema = ml_collections.ConfigDict({"train": {"lr": 1e-4, "steps": 10, "method": "lora"},
                                      "stages": ["translate"], "opt": None})
  good = ml_collections.ConfigDict({"train": {"lr": 3e-4, "steps": 5, "method": "full"},
                                    "stages": ["train"], "opt": 3})
  run_config.check_schema(good, schema, {"train.method": ("full", "lora")})
  bad = ml_collections.ConfigDict(good.to_dict())
  bad.train.lrr = 1.0
  with pytest.raises(run_config.ConfigKeyError, match=r"unknown key 'train.lrr'; did you mean "
                     r"'train.lr'\?"):
    run_config.check_schema(bad, schema)
  wrong = ml_collections.ConfigDict({**good.to_dict(), "train": {**good.train.to_dict(),
                                                                   "steps": "ten"}})
  with pytest.raises(run_config.ConfigKeyError, match="'train.steps' must be a number"):
    run_config.check_schema(wrong, schema)
  with pytest.raises(run_config.ConfigKeyError, match=r"'stages' = 'trian' is not one of"):
    run_config.check_schema(ml_collections.ConfigDict({**good.to_dict(), "stages": ["trian"]}),
                        schema, {"stages": ("translate", "train")})


def test_report_counts_predicted_labels_for_a_classification_task(tmp_path):
  rows = [_row("zero_shot", "zh", 0.5, task="xnli"), _row("base", "zh", 0.25, step=0,
                                                            task="xnli")]
  (tmp_path / "eval").mkdir()
  (tmp_path / "eval" / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
  preds = {"zero_shot-10": ["entailment", "entailment", "neutral", "contradiction"],
           "base-0": ["neutral", "neutral", "neutral", "maybe"]}  # Generation: no label word.
  gold = ["entailment", "neutral", "neutral", "contradiction"]
  for name, labels in preds.items():
    path = tmp_path / "eval" / "predictions" / f"{name}-xnli-zh.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"id": f"x{i}", "prediction": p, "accuracy": 0.0,
                                        **({"label": g} if name == "zero_shot-10" else {})})
                            + "\n" for i, (p, g) in enumerate(zip(labels, gold))))
  shares = report.label_shares(report.latest_evals([str(tmp_path)]))
  assert shares[("m", "xnli", "zero_shot", "zh")] == {
      "n": 4, "shares": {"entailment": 0.5, "neutral": 0.25, "contradiction": 0.25,
                         "other": 0.0},
      "recall": {"entailment": 1.0, "neutral": 0.5, "contradiction": 1.0}}
  assert shares[("m", "xnli", "base", "zh")]["recall"] is None  # Rows without a gold label.
  md = report.write_report([str(tmp_path)])
  assert "| variant | lang | entailment | neutral | contradiction | other | n |" in md
  assert "| base | zh | 0.0% | 75.0% | 0.0% | 25.0% | 4 |" in md
  assert "| zero_shot | zh | 50.0% | 25.0% | 25.0% | 0.0% | 4 |" in md
  assert "#### xnli — accuracy per gold label — m" in md
  assert "| zero_shot | zh | 100.0% | 50.0% | 100.0% | 4 |" in md and "| base | zh | —" not in md
