"""Every field of a Self-Translate-Train run, with its default, documented once.

Task files (`configs/mgsm_th.py`, ...) start from `get_config()` here and override a few
fields; any field can be overridden on the command line, e.g. `--config.train.lr=1e-4`.
Unknown or mistyped keys are an error naming the nearest valid key (stt_jax.config).
"""

import ml_collections

from stt_jax import train as train_lib
from stt_jax import translate as translate_lib

VARIANTS = ("zero_shot", "self_translate", "self_translate_cs")
STAGES = ("translate", "train", "eval", "report")
# Translate-section keys that the `task` section owns (one source of truth).
_TASK_OWNED = ("limit", "sample_seed", "data_dir", "data_source", "allow_subset")


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.name = "run"  # Label of the run (report titles).
  c.seed = 0  # Global seed (train.seed and translation exemplars derive from their own fields).
  # Stages run in order by `python -m stt_jax.main`; each one resumes where it stopped.
  c.stages = STAGES
  # Sequence fields are tuples so the command line can override them:
  # --config.variants="('zero_shot','self_translate')".
  # Fine-tuning variants: zero_shot = English only (the baseline, zero-shot cross-lingual
  # transfer); self_translate = English + self-translated; self_translate_cs = + code-switched.
  c.variants = VARIANTS

  c.model = ml_collections.ConfigDict()
  c.model.path = ""  # Local Hugging Face folder (config.json + *.safetensors). Required.
  c.model.name = ""  # Label in reports (default: the folder's name).
  c.model.dtype = "bfloat16"  # Compute dtype for translation and evaluation (float32 on CPU).
  c.model.param_dtype = ""  # Storage dtype for translation/evaluation ('' = model.dtype).

  # Device mesh: axis sizes; -1 = all remaining devices. Train: batch over data x fsdp, params
  # over fsdp (+ tensor). Decode: batch over data (x fsdp), heads over tensor.
  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = 1
  c.mesh.fsdp = -1
  c.mesh.tensor = 1

  c.task = ml_collections.ConfigDict()
  c.task.name = "mgsm"  # mgsm | xquad | xnli (aliases gsm8k, squad, mnli).
  c.task.target_langs = ("de", "ru", "th", "zh")
  c.task.data_dir = ml_collections.config_dict.placeholder(str)  # Folder in data/'s schema.
  c.task.data_source = "auto"  # auto (data_dir, bundled data/, HF datasets, TFDS) | local | hf | tfds
  # The bundled SQuAD and MultiNLI train files are partial (data/SOURCES.md). A run that would
  # read them stops in preflight unless this is True (demo/tiny) or the full set comes from
  # data_source=hf|tfds or data_dir. Complete bundled splits (GSM8K, MGSM, XNLI, XQuAD) are fine.
  c.task.allow_subset = False
  c.task.train_limit = ml_collections.config_dict.placeholder(int)  # N English train rows ...
  c.task.train_sample_seed = 0  # ... a seeded random sample (files may be sorted by label).

  c.translate = translate_lib.default_translate_config()
  c.translate.unlock()
  for key in _TASK_OWNED:
    del c.translate[key]

  tc = train_lib.default_train_config()
  tc.unlock()
  c.train = tc.train
  c.checkpoint = tc.checkpoint

  c.eval = ml_collections.ConfigDict()
  c.eval.langs = ("de", "ru", "th", "zh", "en")  # Test languages (target languages + English).
  c.eval.limit = ml_collections.config_dict.placeholder(int)  # First N test items per language.
  c.eval.batch_size = 16
  c.eval.max_new_tokens = 256  # Generation budget per answer (MGSM rationales are long).
  c.eval.method = "generate"  # generate | loglik (XNLI: rank the label words).
  c.eval.base_model = True  # Also score the model before fine-tuning (variant 'base').
  c.eval.checkpoints = "all"  # all | final: which saved steps of each variant to score.
  c.eval.poll_seconds = 30.0  # Separate eval loop: how often to look for new checkpoints.
  c.eval.timeout_hours = 48.0  # Separate eval loop: give up waiting after this long.
  return c


def choices() -> dict:
  """Enumerated fields and their allowed values (checked by stt_jax.config.validate)."""
  return {
      "stages": STAGES, "variants": VARIANTS, "task.name": ("mgsm", "xquad", "xnli"),
      "train.method": ("full", "lora"), "eval.method": ("generate", "loglik"),
      "eval.checkpoints": ("all", "final"),
      "model.dtype": ("float32", "bfloat16", "float16"),
      "task.data_source": ("auto", "local", "hf", "tfds"),
  }


def translate_section(cfg: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The full translate config the stage expects: the run's section + the task-owned keys."""
  out = translate_lib.default_translate_config()
  out.unlock()
  out.update(cfg.translate.to_dict())
  out.limit = cfg.task.train_limit
  out.sample_seed = cfg.task.train_sample_seed
  out.data_dir = cfg.task.data_dir
  out.data_source = cfg.task.data_source
  out.allow_subset = cfg.task.allow_subset
  return out


# Per-task settings of the paper setup (Llama-2-7B on a TPU VM), used by configs/<task>_<lang>.py.
_PAPER_TASK = {
    # GSM8K question + rationale; rationales need a long answer budget.
    "mgsm": dict(batch_size=64, epochs=3, method="generate"),
    # SQuAD contexts are long; answers are short spans.
    "xquad": dict(batch_size=32, epochs=2, method="generate"),
    # MultiNLI is large (393k pairs): one pass is plenty; rank the three label words.
    "xnli": dict(batch_size=64, epochs=1, method="loglik"),
}

# Token budgets per task x target language: (train.seq_len, eval.max_new_tokens,
# translate.max_new_tokens, translate.max_new_ratio). English-sized budgets cut Thai, which
# Llama-2 writes mostly as UTF-8 bytes (3 tokens per character). Sized from the p99 lengths
# measured by `python -m stt_jax.budgets` (docs/budgets.md) with two tokenizers: the demo Qwen
# and the Llama-2-style byte-fallback SentencePiece test fixture (tests/hf_tiny.py, the worst
# case; no Llama-2 tokenizer was at hand). th, zh: cover the fixture's p99; de, ru (Llama-2
# has Latin and Cyrillic pieces, the 60x smaller fixture overstates them): 1.5 x Qwen's p99.
# The ratio is per *English* source token, and Llama-2 English is nearly as compact as Qwen's
# (x1.1 assumed), so th/zh ratios are the fixture's p99 x its English tokens/char over 1.1 x
# Qwen's (mgsm 0.51 / 0.34). Rounded up; xquad th seq_len is capped at Llama-2's 4096 positions
# (its p99 on the fixture is 5179: some Thai SQuAD examples are cut there).
_PAPER_BUDGETS = {
    ("mgsm", "de"): (768, 320, 256, 4.0), ("mgsm", "ru"): (768, 320, 256, 4.0),
    ("mgsm", "zh"): (1280, 320, 384, 5.0), ("mgsm", "th"): (3072, 768, 1024, 14.0),
    ("xnli", "de"): (256, 8, 160, 4.0), ("xnli", "ru"): (384, 8, 256, 5.0),
    ("xnli", "zh"): (512, 8, 384, 7.0), ("xnli", "th"): (1280, 8, 1024, 18.0),
    ("xquad", "de"): (1280, 48, 384, 5.0), ("xquad", "ru"): (1280, 64, 384, 6.0),
    ("xquad", "zh"): (2048, 96, 512, 8.0), ("xquad", "th"): (4096, 320, 1024, 21.0),
}


def paper_config(task: str, lang: str) -> ml_collections.ConfigDict:
  """Train on the English set of `task`, test in `lang` (and English), Llama-2-7B, TPU VM."""
  from stt_jax.tasks import get_task  # pylint: disable=g-import-not-at-top
  s = _PAPER_TASK[task]
  seq_len, eval_new, translate_new, ratio = _PAPER_BUDGETS[(task, lang)]
  c = get_config()
  c.name = f"{task}_{lang}"
  c.model.path = "/models/Llama-2-7b-hf"  # Local HF folder (download it once; see README).
  c.model.name = "llama-2-7b"
  c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 1, -1, 1  # e.g. v4-8 / v5e-8: FSDP over all chips.
  c.task.name = task
  c.task.target_langs = (lang,)
  # The full English train set: the bundled SQuAD / MultiNLI train copies are partial, so
  # those tasks read Hugging Face `datasets` (or --config.task.data_source=tfds, or a
  # task.data_dir); GSM8K and every test split are bundled complete.
  c.task.data_source = "hf" if get_task(task).splits["train"].bundled_note else "auto"
  c.eval.langs = (lang, "en")
  c.eval.method = s["method"]
  c.eval.max_new_tokens = eval_new
  c.train.seq_len = seq_len
  c.train.remat = True  # 7B activations of a 64-sequence batch do not fit otherwise.
  c.train.batch_size = s["batch_size"]
  c.train.epochs = s["epochs"]
  # Warmup as a share of each variant's steps: zero_shot and self_translate differ 2-4x in
  # length but get the same LR shape.
  c.train.warmup_steps = 0
  c.train.warmup_ratio = 0.03
  c.translate.max_new_tokens = translate_new
  c.translate.max_new_ratio = ratio
  return c
