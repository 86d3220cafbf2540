"""Self-Translate-Train vs zero-shot transfer, sized to decide on a 2-core CPU (issue 18).

The 0.5B demo Qwen, MultiNLI -> XNLI, one target language per run (the paper's setup: one
model per language). The experiment, its cost and its results: docs/results_cpu.md.

    python -m stt_jax.models.fetch_demo
    python -m stt_jax.main --config=configs/cpu_xnli.py:zh --workdir=runs/cpu_xnli_zh
    python -m stt_jax.main --config=configs/cpu_xnli.py:de --workdir=runs/cpu_xnli_de

(`:zh` is the default; Gemma 3 270M instead: `--config.model.path=$(python -m
stt_jax.models.fetch_demo --model gemma3-270m -q) --config.model.name=gemma-3-270m`.)
Kill it at any point and rerun the same command: every stage continues where it stopped.
Sizes: 1,000 English training pairs and their self-translations (+ code-switched pairs, + the
round-trip-filtered share), the first 2,000 XNLI test items, scored by label log-likelihood;
every variant gets the same number of LoRA steps and the same LR shape.
"""

from stt_jax import run_config


def get_config(lang: str | None = None):
  lang = lang or "zh"
  c = run_config.demo_config()
  c.name = f"cpu_xnli_{lang}"
  c.task.target_langs = (lang,)
  c.task.train_limit = 1000
  c.variants = ("zero_shot", "self_translate", "self_translate_cs", "self_translate_rt")
  # Round trip: keep a row when the back-translation of each field scores chrF >= 40 against
  # the English source (the demo Qwen's median row score on zh is 41: about half are kept).
  c.translate.roundtrip.min_chrf = 40.0
  c.translate.roundtrip.keep_fraction = 0.0
  # The same optimizer steps and LR shape for every variant: the mixtures differ up to 3x in
  # size, so epochs would hand self_translate_cs three times zero_shot's compute. 32 steps of
  # 8 packed 256-token rows (~65k tokens: about one pass over the English pairs); the demo's
  # 4-6 steps only learned a label prior.
  c.train.steps = 32
  c.train.epochs = 0
  c.train.warmup_steps = 0
  c.train.warmup_ratio = 0.1
  c.train.min_lr_ratio = 0.1
  c.train.log_every = 4
  c.eval.langs = (lang,)
  c.eval.limit = 2000
  # Our label-log-likelihood accuracy only: the lm-eval-harness rescoring would double the
  # eval stage, the second-longest here (docs/results_cpu.md, "Cost").
  c.eval.lm_eval_compat = False
  return c
