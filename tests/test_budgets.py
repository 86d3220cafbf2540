"""stt_jax.budgets: token lengths per field and language against the config's budgets."""

import json
import os
import subprocess
import sys

import pytest

from configs import tiny
from stt_jax import budgets, train_data
from stt_jax.tasks import get_task
from tests import hf_tiny

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _cfg(task="mgsm", seq_len=128):
  c = tiny.get_config()
  c.task.name, c.task.target_langs, c.eval.langs = task, ("th",), ("th", "en")
  c.task.train_limit, c.eval.limit, c.train.seq_len = 40, 20, seq_len
  c.eval.method, c.eval.max_new_tokens = "generate", 64
  return c


def _by(stats, what, lang):
  return next(s for s in stats if s.what == what and s.lang == lang)


@pytest.mark.parametrize("kind", hf_tiny.TOKENIZERS)
def test_thai_costs_about_three_tokens_per_char(kind):
  stats = budgets.measure(_cfg(), hf_tiny.tokenizer(kind), max_rows=0)
  per_char = budgets.tokens_per_char(stats)
  assert per_char["th"] > 2.5  # UTF-8 bytes (byte tokenizer) or byte fallback (sp).
  assert per_char["en"] < (1.01 if kind == "byte" else 0.8)
  assert _by(stats, "gold target (exemplars)", "th").q(99) > 2 * _by(
      stats, "gold target (exemplars)", "en").q(99)


def test_cut_share_matches_what_training_truncates():
  tok, cfg = hf_tiny.tokenizer("byte"), _cfg(seq_len=500)
  stat = _by(budgets.measure(cfg, tok, max_rows=0), "train prompt+target", "en")
  rows = get_task("mgsm").load("train", "en", limit=40, sample_seed=0)
  examples = train_data.tokenize(get_task("mgsm"), {"en": rows}, tok, 500)
  assert 0 < examples.truncated + examples.dropped < 40
  assert round(stat.cut * 40) == examples.truncated + examples.dropped
  assert stat.short_by == stat.q(99) - 501 > 0 and stat in budgets.short([stat])


def test_report_names_each_budget_below_p99():
  stats = budgets.measure(_cfg(), hf_tiny.tokenizer("byte"), max_rows=0)
  text = budgets.report(stats)
  assert "| train prompt+target | en | 40 |" in text
  assert "below p99: train.seq_len+1=129 for train prompt+target [en]" in text
  assert "eval.max_new_tokens=64 for gold target (exemplars) [th]" in text
  assert "tokens per character: en 1" in text
  roomy = _cfg(seq_len=4096)
  roomy.eval.max_new_tokens = 4096
  roomy.translate.max_new_tokens, roomy.translate.max_new_ratio = 8192, 16.0
  assert budgets.report(budgets.measure(roomy, hf_tiny.tokenizer("byte"), max_rows=0)
                        ).endswith("every budget covers p99")


def test_translations_in_the_workdir_are_measured(tmp_path):
  rows = get_task("xnli").load("dev", "zh", limit=5)
  path = tmp_path / "translations" / "xnli_zh.train.jsonl"
  path.parent.mkdir()
  path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), "utf-8")
  cfg = _cfg("xnli")
  cfg.eval.method = "loglik"
  stats = budgets.measure(cfg, hf_tiny.tokenizer("byte"), workdir=str(tmp_path))
  example = _by(stats, "translated prompt+target", "zh")
  assert len(example.lengths) == 5 and example.budget == cfg.train.seq_len + 1
  assert _by(stats, "gold target (test)", "th").budget is None  # loglik: nothing generated.


def test_cli_prints_the_table_and_bad_keys_are_one_line(tmp_path):
  hf_tiny.tokenizer("byte", str(tmp_path))
  cmd = [sys.executable, "-m", "stt_jax.budgets", "--config=configs/tiny.py",
         f"--config.model.path={tmp_path}", "--max_rows=20", "--config.eval.limit=5"]
  out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, check=True)
  assert "| test prompt | zh | 5 |" in out.stdout and "tokens per character:" in out.stdout
  bad = subprocess.run(cmd + ["--config.train.seq_lne=9"], cwd=ROOT, capture_output=True,
                       text=True, timeout=300)
  assert bad.returncode == 2 and bad.stderr.strip().count("\n") == 0
  assert "did you mean 'train.seq_len'" in bad.stderr
