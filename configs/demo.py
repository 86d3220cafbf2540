"""The CPU demo: the real 0.5B Qwen, MultiNLI -> XNLI Chinese, zero-shot transfer vs
Self-Translate-Train, LoRA, in about half an hour on 2 CPU cores.

    bash launch/demo.sh          # fetches the model, then runs this config

Sizes are chosen for the budget (see README "Demo"): a few hundred English training pairs are
self-translated; each variant gets a short LoRA run; the test set is the first `eval.limit`
XNLI-zh items (label log-likelihood), reported with bootstrap 95% intervals.
"""

from stt_jax import run_config


def get_config():
  c = run_config.get_config()
  c.name = "demo"
  c.model.path = run_config.demo_model_path()  # Made by python -m stt_jax.models.fetch_demo.
  c.model.name = "qwen2.5-coder-0.5b"
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
