"""The one run-config schema: every field with its default, the paper presets, the enums and
the validation of a Self-Translate-Train run.

Config files (`configs/*.py`) are data: each imports this module only, starts from
`get_config()` (or `paper_config(task, lang)`) and sets a few fields. Any field can be
overridden on the command line, e.g. `--config.train.lr=1e-4`. `validate(cfg)` is the only
check of a config: unknown or mistyped keys (with the nearest valid key), wrong types, values
outside an enum, and out-of-range numbers each end as one line naming the key. The library
(train, translate, decode, ...) takes the validated sections as they are and merges no defaults.
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Mapping
from typing import Any

import ml_collections
from ml_collections import config_dict

from stt_jax import codeswitch
from stt_jax import translate_filters
from stt_jax.tasks import get_task

VARIANTS = ("zero_shot", "self_translate", "self_translate_cs", "self_translate_rt")
# What a run trains when config.variants is not set: self_translate_rt costs one more decode
# pass (the round-trip filter), so a run asks for it by name.
DEFAULT_VARIANTS = ("zero_shot", "self_translate", "self_translate_cs")
# export runs right after train: each variant's final checkpoint as an HF folder (+ PEFT
# adapter). The demo's 0.5B model: ~10 s and 1.3 GB per variant on 2 CPU cores; a 7B model
# writes ~13.5 GB per variant, so drop it from config.stages when the disk is short.
STAGES = ("translate", "train", "export", "eval", "report")
TASKS = ("mgsm", "xquad", "xnli")
DTYPES = ("float32", "bfloat16", "float16")
TRAIN_METHODS = ("full", "lora")
# Translate-stage inputs that the `task` section owns (one source of truth): the stage reads
# the English rows with these, and its done-stamp records them.
TASK_OWNED = ("train_limit", "train_sample_seed", "data_dir", "data_source", "allow_subset")

LANG_NAMES = {"en": "English", "de": "German", "ru": "Russian", "th": "Thai", "zh": "Chinese"}
# Length of a human translation / length of the English, in characters, bounds that hold
# for >99.5% of XNLI dev sentence pairs (measured: zh median 0.31, th 0.90, ru 1.03, de 1.13).
LENGTH_RATIO = {"default": (0.3, 3.0), "de": (0.5, 2.5), "ru": (0.4, 2.5), "th": (0.3, 2.2),
                "zh": (0.1, 1.0)}

CHOICES = {
    "stages": STAGES, "variants": VARIANTS, "task.name": TASKS,
    "train.method": TRAIN_METHODS, "eval.method": ("generate", "loglik"),
    "eval.checkpoints": ("all", "final"), "model.dtype": DTYPES, "train.dtype": DTYPES,
    "train.param_dtype": DTYPES, "task.data_source": ("auto", "local", "hf", "tfds"),
    "model.kv_dtype": ("",) + DTYPES,
    "translate.truncate": ("left", "error"),
    "translate.filters.enabled": translate_filters.REASONS,
    "model.attention": ("auto", "xla", "cudnn", "splash", "einsum"),
}


class ConfigKeyError(ValueError):
  """A config that does not fit the schema."""


# ------------------------------------------------------------------------------ defaults


def get_config() -> ml_collections.ConfigDict:
  """Every field of a run, with its default."""
  c = ml_collections.ConfigDict()
  c.name = "run"  # Label of the run (report titles).
  c.seed = 0  # Global seed (train.seed and translation exemplars derive from their own fields).
  # Stages run in order by `python -m stt_jax.main`; each one resumes where it stopped.
  c.stages = STAGES
  # Sequence fields are tuples so the command line can override them:
  # --config.variants="('zero_shot','self_translate')".
  # Fine-tuning variants: zero_shot = English only (the baseline, zero-shot cross-lingual
  # transfer); self_translate = English + self-translated; self_translate_cs = + code-switched;
  # self_translate_rt = English + the self-translations that pass the round-trip filter
  # (translate.roundtrip; one more decode pass, run only when this variant is listed).
  c.variants = DEFAULT_VARIANTS
  c.model = _model()
  c.mesh = _mesh()
  c.task = _task()
  c.translate = _translate()
  c.train = _train()
  c.checkpoint = _checkpoint()
  c.eval = _eval()
  c.logging = _logging()
  return c


def _model() -> ml_collections.ConfigDict:
  m = ml_collections.ConfigDict()
  m.path = ""  # Local Hugging Face folder (config.json + *.safetensors). Required.
  m.name = ""  # Label in reports (default: the folder's name).
  m.dtype = "bfloat16"  # Compute dtype for translation and evaluation (float32 on CPU).
  m.param_dtype = ""  # Storage dtype for translation/evaluation ('' = model.dtype).
  # Keys/values of the decode KV cache ('' = the decoding model's compute dtype: model.dtype,
  # train.dtype for a fine-tuned checkpoint). bfloat16 halves the cache of a float32 model.
  m.kv_dtype = ""
  # Layers as one stacked module run under lax.scan (one layer compiled, not num_layers):
  # much faster compiles, same numbers. False unrolls them (the tree of earlier checkpoints;
  # a checkpoint restores only into the layout it was trained in).
  m.scan_layers = True
  # Attention kernel of training and full-sequence scoring (decoding always uses einsum):
  # auto = splash on TPU, cudnn on GPU (bf16/fp16), else xla; einsum = the dense reference.
  # See models/attention.py and docs/train.md.
  m.attention = "auto"
  return m


def _mesh() -> ml_collections.ConfigDict:
  # Device mesh: axis sizes; -1 = all remaining devices. Train: batch over data x fsdp, params
  # over fsdp (+ tensor). Decode: batch over data (x fsdp), heads over tensor.
  m = ml_collections.ConfigDict()
  m.data = 1
  m.fsdp = -1
  m.tensor = 1
  return m


def _task() -> ml_collections.ConfigDict:
  t = ml_collections.ConfigDict()
  t.name = "mgsm"  # mgsm | xquad | xnli (aliases gsm8k, squad, mnli).
  t.target_langs = ("de", "ru", "th", "zh")
  t.data_dir = config_dict.placeholder(str)  # Folder in data/'s schema (docs/tasks.md).
  t.data_source = "auto"  # auto (data_dir, bundled data/, HF datasets, TFDS) | local | hf | tfds
  # The bundled SQuAD and MultiNLI train files are partial (data/SOURCES.md). A run that would
  # read them stops in preflight unless this is True (demo/tiny) or the full set comes from
  # data_source=hf|tfds or data_dir. Complete bundled splits (GSM8K, MGSM, XNLI, XQuAD) are fine.
  t.allow_subset = False
  t.train_limit = config_dict.placeholder(int)  # N English train rows (None = all) ...
  t.train_sample_seed = 0  # ... a seeded random sample (files may be sorted by label).
  return t


def _translate() -> ml_collections.ConfigDict:
  """The self-translation stage (stt_jax.translate); its inputs come from the task section."""
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
  c.batch_size = 8                # engine slots: segments decoded at once (refilled as they end)
  c.steps_per_call = 16           # decode steps per device call; slots are refilled in between
  c.prefill_chunk = 128           # prompt tokens per prefill call, prompts packed end to end
  c.max_new_tokens = 256          # cap on generated tokens per segment
  c.max_new_ratio = 4.0           # budget of each segment = min(cap, ratio * its source tokens
  c.max_new_slack = 16            # + slack); 0 ratio = always the cap.
  c.truncate = "left"             # prompt longer than the context: keep its end ('error' raises)
  c.progress = True               # tqdm bar: segments/s, tokens/s, ETA
  c.model_id = ""                 # cache key; default: the model folder's name
  # --- segmentation
  c.split_sentences_over = 300    # lines longer than this (chars) are split into sentences;
                                  # 0 = always, -1 = never
  c.sentence_splitter = "auto"    # pysbd if installed, else the regex in translate_filters
  c.joiner = {"default": " ", "zh": "", "ja": ""}  # how translated sentences are re-joined
  # --- filters (translate_filters.check); a failing segment drops its example
  f = c.filters = ml_collections.ConfigDict()
  f.enabled = translate_filters.REASONS  # empty truncated repetition copy script length_ratio
                                         # numbers
  f.min_chars = 20        # shorter sources skip copy/script/length checks (names, numbers)
  f.light_fields = ("answer",)  # only empty/truncated/repetition checks: a SQuAD answer is
                                # judged by finding it in the translated context
  f.repeat_min_count = 4  # a unit repeated this many times in a row ...
  f.repeat_min_chars = 16  # ... over at least this many chars is a loop
  f.script_min_fraction = 0.5  # th/zh/ru: share of letters in the target script ...
  f.script_ignore_copied = True  # ... not counting names/units copied from the source
  f.numbers_tasks = ("mgsm",)  # tasks whose translations keep every source number
  f.length_ratio = dict(LENGTH_RATIO)  # lang -> (min, max) translated/source chars
  f.fuzzy_min_score = 80.0  # SQuAD answers: rapidfuzz partial_ratio to accept a span
  # --- code-switched examples (codeswitch.py)
  c.codeswitch = ml_collections.ConfigDict()
  c.codeswitch.enabled = True
  c.codeswitch.patterns = dict(codeswitch.DEFAULT_PATTERNS)  # task -> ('field=tgt,...', ...)
  # --- round-trip filter (translate_roundtrip.py; only for variant self_translate_rt): each
  # kept translation is translated back to English by the same model (reversed exemplars) and
  # scored with chrF(English source, back-translation) per field. Set exactly one rule:
  r = c.roundtrip = ml_collections.ConfigDict()
  r.min_chrf = 40.0      # keep a row when every field's chrF is >= this (0-100; 0 = rule off)
  r.keep_fraction = 0.0  # or: keep this top share (0-1] by the row's lowest field chrF (0 = off)
  # task -> fields translated back. The SQuAD answer is not: it is a span re-aligned in the
  # translated context (checked there), and chrF of a 1-3 word answer is mostly noise.
  r.fields = {"mgsm": ("question", "rationale"), "xquad": ("context", "question"),
              "xnli": ("premise", "hypothesis")}
  # --- translate_quality.quality_report
  c.quality = ml_collections.ConfigDict()
  c.quality.n = 100               # held-out XNLI dev sentences per language
  c.quality.mgsm_leave_one_out = True  # also each MGSM exemplar question, prompted with the rest
  return c


def _train() -> ml_collections.ConfigDict:
  t = ml_collections.ConfigDict()
  t.method = "lora"  # 'full': every weight is trained; 'lora': adapters only, base frozen.
  t.remat = False  # Recompute each decoder layer in the backward (less memory, ~1/3 more FLOPs).
  t.lora = ml_collections.ConfigDict()
  t.lora.rank = 16  # Adapter rank r.
  t.lora.alpha = 32.0  # Update scale is alpha / rank.
  t.lora.dropout = 0.05  # Dropout on the adapter input (training only).
  t.lora.targets = "all"  # Comma-separated projections (q_proj,...,down_proj) or 'all'.
  t.lora.init_adapter = ""  # A PEFT adapter folder to start from (its r, alpha, dropout and
                            # targets then replace the four above); "" = fresh adapters.
  t.lr = 2e-4  # Peak learning rate of AdamW.
  t.min_lr_ratio = 0.1  # Cosine decays to lr * min_lr_ratio at the last step.
  t.warmup_steps = 50  # Linear warmup from 0 to lr, in optimizer steps ...
  # ... or as a fraction of this run's total steps (0 = use warmup_steps), so variants with
  # 2-4x different step counts share one LR shape. Set one of the two; the other must be 0.
  t.warmup_ratio = 0.0
  t.steps = 0  # Optimizer steps; 0 = derive from `epochs`.
  t.epochs = 2  # Passes over the mixture (used when steps == 0).
  t.batch_size = 32  # Sequences (packed rows of seq_len tokens) per optimizer step, global.
  t.grad_accum = 1  # Micro-batches per step (batch_size must divide evenly).
  t.seq_len = 1024  # Tokens per row; longer examples are truncated (counted in the log).
  t.packing = True  # Pack several examples per row (segment ids keep them apart).
  t.weight_decay = 0.0  # AdamW decoupled weight decay (matrices only, not norms/biases).
  t.clip_norm = 1.0  # Clip the global gradient norm; 0 = off.
  t.adam_b1 = 0.9
  t.adam_b2 = 0.999
  t.adam_eps = 1e-8
  t.dtype = "bfloat16"  # Compute dtype (activations, matmuls).
  t.param_dtype = "float32"  # Master weights and optimizer state (frozen LoRA base: dtype).
  t.mixture = ml_collections.ConfigDict()
  # Rows of each source per epoch, as a multiple of its size: 1.0 = every row once (the
  # paper's union), 0.5 = a different random half each epoch, 2.0 = every row twice.
  t.mixture.en = 1.0
  t.mixture.translated = 1.0
  t.mixture.code_switched = 1.0
  t.seed = 0  # Data order, LoRA init and dropout.
  t.log_every = 10  # Steps between metrics.jsonl rows.
  t.peak_flops = 0.0  # Peak FLOP/s per device for MFU; 0 = from flops.PEAK_FLOPS by device.
  return t


def _checkpoint() -> ml_collections.ConfigDict:
  k = ml_collections.ConfigDict()
  k.every = 200  # Save every N optimizer steps (and at the end, and on SIGTERM).
  k.keep = 3  # Checkpoints kept; 0 = all.
  k.async_save = True  # Write in a background thread while training continues.
  return k


def _eval() -> ml_collections.ConfigDict:
  e = ml_collections.ConfigDict()
  e.langs = ("de", "ru", "th", "zh", "en")  # Test languages (target languages + English).
  e.limit = config_dict.placeholder(int)  # First N test items per language.
  e.batch_size = 16
  e.max_new_tokens = 256  # Generation budget per answer (MGSM rationales are long).
  e.method = "generate"  # generate | loglik (XNLI: rank the label words).
  # Also write metric rows under the rules of published tables (lm-eval-harness, MLQA; see
  # docs/tasks.md). Free for MGSM and XQuAD; XNLI costs one more log-likelihood pass.
  e.lm_eval_compat = True
  e.base_model = True  # Also score the model before fine-tuning (variant 'base').
  e.checkpoints = "all"  # all | final: which saved steps of each variant to score.
  e.poll_seconds = 30.0  # Separate eval loop: how often to look for new checkpoints.
  e.timeout_hours = 48.0  # Separate eval loop: give up waiting after this long.
  return e


def _logging() -> ml_collections.ConfigDict:
  g = ml_collections.ConfigDict()
  # TensorBoard event files beside the jsonl logs (runs/<variant>/train/, eval/tensorboard/
  # <variant>/; `tensorboard --logdir <workdir>`). Needs tensorboardX; without it, one warning.
  g.tensorboard = True
  return g


# ------------------------------------------------------------------------------ presets

# Per-task settings of the paper setup (Llama-2-7B on a TPU VM).
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
PAPER_BUDGETS = {
    ("mgsm", "de"): (768, 320, 256, 4.0), ("mgsm", "ru"): (768, 320, 256, 4.0),
    ("mgsm", "zh"): (1280, 320, 384, 5.0), ("mgsm", "th"): (3072, 768, 1024, 14.0),
    ("xnli", "de"): (256, 8, 160, 4.0), ("xnli", "ru"): (384, 8, 256, 5.0),
    ("xnli", "zh"): (512, 8, 384, 7.0), ("xnli", "th"): (1280, 8, 1024, 18.0),
    ("xquad", "de"): (1280, 48, 384, 5.0), ("xquad", "ru"): (1280, 64, 384, 6.0),
    ("xquad", "zh"): (2048, 96, 512, 8.0), ("xquad", "th"): (4096, 320, 1024, 21.0),
}


DEMO_MODEL = "qwen2.5-coder-0.5b-instruct"  # fetch_demo.MODELS keys; their report names:
DEMO_MODEL_NAMES = {DEMO_MODEL: "qwen2.5-coder-0.5b", "gemma3-270m": "gemma-3-270m"}


def demo_config(model: str = DEMO_MODEL) -> ml_collections.ConfigDict:
  """The CPU demo (configs/demo.py, configs/demo_gemma.py): a real small model fetched from
  PyPI (`model` is its fetch_demo.MODELS key), MultiNLI -> XNLI Chinese, zero_shot vs
  self_translate, LoRA, sized for about half an hour on 2 CPU cores."""
  c = get_config()
  c.name = "demo" if model == DEMO_MODEL else "demo_" + model.split("-")[0].rstrip("0123456789")
  c.model.path = demo_model_path(model)  # Made by python -m stt_jax.models.fetch_demo.
  c.model.name = DEMO_MODEL_NAMES.get(model, model)
  c.model.dtype = "float32"  # XLA:CPU runs float32 matmuls faster than bfloat16.
  # XLA:CPU copies each scanned layer's weight slice per step: decode of the 0.5B model ran at
  # 5.9 tok/s scanned vs 11.4 unrolled at batch 1 (31 vs 46 at batch 8), so the CPU demo
  # unrolls. Accelerators keep the default (scanned: one layer compiled, not 24).
  c.model.scan_layers = False
  c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 1, -1, 1
  c.task.name = "xnli"
  c.task.target_langs = ("zh",)
  c.task.train_limit = 128
  c.task.allow_subset = True  # The bundled 9000-row MultiNLI subset is enough here.
  c.variants = ("zero_shot", "self_translate")
  c.translate.shots = 8
  c.translate.batch_size = 16
  c.translate.max_new_tokens = 128
  c.translate.quality.n = 0
  c.train.method = "lora"
  c.train.lora.rank = 16
  c.train.lora.alpha = 32.0
  c.train.lora.dropout = 0.0
  c.train.lr = 3e-4
  c.train.warmup_steps = 3
  c.train.epochs = 1
  c.train.batch_size = 8
  # Memory: 8 x 256 tokens at once held 9.5 GiB of XLA:CPU temporaries (13.4 GiB peak RSS in
  # training); 4 micro-batches of 2 rows hold 2.4 GiB (6.2 GiB peak), same rows and losses.
  # train.remat does not pay here: XLA:CPU's schedule keeps most activations (8.6 GiB).
  c.train.grad_accum = 4
  c.train.seq_len = 256
  c.train.dtype = "float32"
  c.train.param_dtype = "float32"
  c.train.log_every = 2
  c.checkpoint.every = 1000  # Only the final step is saved (and scored).
  c.checkpoint.async_save = False
  c.eval.langs = ("zh",)
  c.eval.limit = 150
  c.eval.batch_size = 16
  c.eval.method = "loglik"
  c.eval.checkpoints = "final"
  return c


def paper_config(task: str, lang: str) -> ml_collections.ConfigDict:
  """Train on the English set of `task`, test in `lang` (and English), Llama-2-7B, TPU VM."""
  s = _PAPER_TASK[task]
  seq_len, eval_new, translate_new, ratio = PAPER_BUDGETS[(task, lang)]
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


def demo_model_path(model: str | None = None) -> str:
  """Where `python -m stt_jax.models.fetch_demo [--model MODEL]` puts a model (default: the
  demo's Qwen; `fetch_demo.MODELS` lists the others, e.g. "gemma3-270m")."""
  from stt_jax.models import fetch_demo  # pylint: disable=g-import-not-at-top
  return str(fetch_demo.default_cache_dir(model or fetch_demo.DEFAULT_MODEL))


def model_label(cfg) -> str:
  """The model's name in reports: model.name, else the folder's name."""
  import os  # pylint: disable=g-import-not-at-top
  return cfg.model.name or os.path.basename(os.path.normpath(cfg.model.path))


# ------------------------------------------------------------------------------ validation


def flatten(cfg: Mapping, prefix: str = "") -> dict[str, Any]:
  out = {}
  for key, value in cfg.items():
    path = f"{prefix}{key}"
    if isinstance(value, (Mapping, ml_collections.ConfigDict)):
      out.update(flatten(value, path + "."))
    else:
      out[path] = value
  return out


def nearest(key: str, valid: list[str]) -> str:
  """'; did you mean ...?' for the valid key closest to `key`, or ''."""
  near = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
  if not near:  # Try the last component alone (e.g. 'lrr' -> 'train.lr').
    leaf = key.rsplit(".", 1)[-1]
    by_leaf = {v.rsplit(".", 1)[-1]: v for v in valid}
    hit = difflib.get_close_matches(leaf, list(by_leaf), n=1, cutoff=0.6)
    near = [by_leaf[hit[0]]] if hit else []
  return f"; did you mean '{near[0]}'?" if near else ""


def nearest_key(key: str) -> str:
  """`nearest` over every key of the schema."""
  return nearest(key, sorted(flatten(get_config())))


def check_schema(cfg, schema, choices: Mapping[str, tuple] | None = None) -> None:
  """Raises ConfigKeyError for unknown keys, wrong types or values outside `choices`.

  Fields whose schema default is None accept any value; dict-valued fields (e.g. mixture
  weights) are checked key by key like any other section.
  """
  have, want = flatten(cfg), flatten(schema)
  for key in sorted(have):
    if key not in want:
      raise ConfigKeyError(f"config: unknown key '{key}'{nearest(key, sorted(want))}")
  for key, default in want.items():
    if key not in have:
      raise ConfigKeyError(f"config: missing key '{key}' (default {default!r}); "
                           "start config files from stt_jax.run_config.get_config()")
    value = have[key]
    if default is None or value is None:
      continue
    if isinstance(default, bool) != isinstance(value, bool):
      raise ConfigKeyError(f"config: '{key}' must be a bool, got {value!r}")
    if isinstance(default, (int, float)) and not isinstance(default, bool):
      if not isinstance(value, (int, float)):
        raise ConfigKeyError(f"config: '{key}' must be a number, got {value!r}")
    elif isinstance(default, str) and not isinstance(value, str):
      raise ConfigKeyError(f"config: '{key}' must be a string, got {value!r}")
    elif isinstance(default, (list, tuple)) and not isinstance(value, (list, tuple)):
      raise ConfigKeyError(f"config: '{key}' must be a list, got {value!r}")
  for key, allowed in (choices or {}).items():
    values = have.get(key)
    for v in values if isinstance(values, (list, tuple)) else [values]:
      if v not in allowed:
        raise ConfigKeyError(
            f"config: '{key}' = {v!r} is not one of {', '.join(map(str, allowed))}")


def check_ranges(cfg) -> None:
  """Numbers that fit their type but not their meaning (a negative rate, an uneven batch)."""
  t, k = cfg.train, cfg.checkpoint

  def check(ok, msg):
    if not ok:
      raise ConfigKeyError(f"config: {msg}")

  # Imported here: lora pulls in jax, which loading a config file does not need.
  from stt_jax.models import lora  # pylint: disable=g-import-not-at-top
  try:
    lora.parse_targets(t.lora.targets)
  except ValueError as e:
    raise ConfigKeyError(f"config: train.{e}") from None
  check(t.lora.rank > 0, f"train.lora.rank must be positive, got {t.lora.rank}")
  if t.lora.init_adapter:
    check(t.method == "lora", "train.lora.init_adapter needs train.method='lora'")
    check(os.path.isfile(os.path.join(t.lora.init_adapter, "adapter_config.json")),
          f"train.lora.init_adapter={t.lora.init_adapter!r} has no adapter_config.json; give "
          "the folder PEFT's save_pretrained wrote")
  check(0 <= t.lora.dropout < 1, f"train.lora.dropout must be in [0, 1), got {t.lora.dropout}")
  check(t.lr > 0, f"train.lr must be positive, got {t.lr}")
  check(t.steps > 0 or t.epochs > 0, "set train.steps or train.epochs to a positive number")
  check(t.steps >= 0 and t.warmup_steps >= 0 and t.log_every > 0, "train.steps/warmup_steps "
        "must be >= 0 and train.log_every > 0")
  check(0 <= t.warmup_ratio < 1, f"train.warmup_ratio must be in [0, 1), got {t.warmup_ratio}")
  check(not (t.warmup_ratio > 0 and t.warmup_steps > 0),
        f"train.warmup_steps={t.warmup_steps} and train.warmup_ratio={t.warmup_ratio} are both "
        "set; set the one you do not want to 0 (e.g. --config.train.warmup_steps=0)")
  check(t.grad_accum > 0 and t.batch_size % t.grad_accum == 0,
        f"train.batch_size={t.batch_size} must be a multiple of train.grad_accum="
        f"{t.grad_accum}")
  check(t.seq_len > 1, f"train.seq_len must be > 1, got {t.seq_len}")
  check(all(v >= 0 for v in t.mixture.values()), "train.mixture weights must be >= 0")
  check(k.every > 0 and k.keep >= 0, "checkpoint.every must be > 0 and checkpoint.keep >= 0")
  check_roundtrip(cfg.translate.roundtrip, check)
  for key in ("eval.batch_size", "translate.batch_size", "translate.shots",
              "translate.steps_per_call", "translate.prefill_chunk"):
    section, name = key.split(".")
    value = cfg[section][name]
    check(value > 0, f"{key}={value} must be positive")


def check_roundtrip(r, check) -> None:
  """translate.roundtrip: exactly one keep rule, each in its range, known fields."""
  check(0 <= r.min_chrf <= 100, f"translate.roundtrip.min_chrf must be in [0, 100], got "
        f"{r.min_chrf}")
  check(0 <= r.keep_fraction <= 1, f"translate.roundtrip.keep_fraction must be in [0, 1], got "
        f"{r.keep_fraction}")
  check((r.min_chrf > 0) != (r.keep_fraction > 0),
        f"translate.roundtrip.min_chrf={r.min_chrf} and keep_fraction={r.keep_fraction}: set "
        "exactly one of them above 0 (the other to 0), e.g. --config.translate.roundtrip."
        "keep_fraction=0")
  for task, fields in r.fields.items():
    known = [f.name for f in get_task(task).translatable_fields] if task in TASKS else None
    check(known is not None, f"translate.roundtrip.fields has unknown task {task!r}; tasks: "
          f"{', '.join(TASKS)}")
    bad = [f for f in fields if f not in known]
    check(not bad and fields, f"translate.roundtrip.fields[{task!r}] = {tuple(fields)}: name "
          f"one or more of {', '.join(known)}")


def validate(cfg) -> None:
  """The whole check of a run config (schema, enums, ranges); raises ConfigKeyError."""
  check_schema(cfg, get_config(), CHOICES)
  check_ranges(cfg)
