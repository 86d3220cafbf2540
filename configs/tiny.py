"""A random tiny model through every stage in about a minute (tests and smoke runs).

    python -m stt_jax.main --config=configs/tiny.py --workdir=/tmp/tiny \
        --config.model.path=/path/to/tiny_hf_folder

The model folder is made by `python -m tests.make_tiny_model /tmp/tiny_model` (a random
2-layer Qwen2 with a byte-level tokenizer); its outputs are noise, so only the plumbing is
tested.
"""

from stt_jax import run_config


def get_config():
  c = run_config.get_config()
  c.name = "tiny"
  c.model.dtype = "float32"
  c.task.name = "xnli"
  c.task.target_langs = ("zh",)
  c.task.train_limit = 12
  c.task.allow_subset = True  # The bundled 9000-row MultiNLI subset is enough here.
  c.translate.shots = 2
  c.translate.batch_size = 8
  c.translate.max_new_tokens = 16
  c.translate.quality.n = 0
  c.translate.filters.enabled = ()  # A random model's output fails every filter.
  # The default variants; tests add self_translate_rt where they cover the round trip (a
  # second decode pass in every run would double the kill -9 suite). A random model's
  # back-translations score near chrF 0, so keep the better half rather than a threshold.
  c.translate.roundtrip.min_chrf = 0.0
  c.translate.roundtrip.keep_fraction = 0.5
  c.train.method = "lora"
  c.train.lora.rank = 4
  c.train.steps = 4
  c.train.batch_size = 4
  c.train.seq_len = 128
  c.train.warmup_steps = 1
  c.train.dtype = "float32"
  c.train.log_every = 2
  c.checkpoint.every = 2
  c.checkpoint.async_save = False
  c.eval.langs = ("zh", "en")
  c.eval.limit = 6
  c.eval.batch_size = 8
  c.eval.max_new_tokens = 4
  c.eval.method = "loglik"
  c.eval.poll_seconds = 1.0
  return c
