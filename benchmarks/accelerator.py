"""Ours vs transformers on one lent GPU: decode of a Llama-2-7B shape and one full fine-tuning
step of a Llama-3.2-1B shape, random weights made on the device, one JSON.

    python benchmarks/accelerator.py --out $OUT/accelerator.json   # one H100/H200, < 8 min
    python benchmarks/accelerator.py --smoke                        # tiny shapes, CPU, ~1 min

Decode (prompt 256 tokens, 128 new, greedy, EOS never ends a row; batch 1, 8, 64): ours is
the continuous-batching `Engine` the translate stage drives (its default steps_per_call and
prefill_chunk, as run_config.translate), transformers is `LlamaForCausalLM.generate` (bf16,
its default attention, min_new_tokens = max_new_tokens). Reported per side: end-to-end
tokens/s (prefill included), the decode step time ((T(128 new) - T(1 new)) / 127: prefill
cancels), and at batch 1 that step against the HBM roofline (weights read per step plus the
average KV, over the GPU's bandwidth). Train (batch 8 x 1024): our `Trainer` step (full FT,
bf16 compute, float32 master weights, AdamW, clipping; run_config.train's defaults) vs
transformers with autocast bf16, float32 weights and fused AdamW (benchmarks/train.py's
step); MFU from `stt_jax.flops`.

The four phases (ours / transformers x decode / train) each run in a subprocess, so JAX and
torch never share a process (their CUDA libraries can clash) and each phase starts with the
whole GPU. Cases stream back as they finish: a case that fails (OOM, unsupported op) records
its error and the rest still run; a global time guard (--budget_s) skips what no longer
fits; the JSON is rewritten after every phase. Compiles and warm-up are timed apart from the
measurements. JAX programs are dumped as HLO (their names only) to record which attention
kernels ran. Not a test: timings never gate CI; tests/test_accelerator_benchmark.py runs
--smoke.
"""

from __future__ import annotations

import argparse
import gc
import glob
import inspect
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import types

# Before JAX is imported anywhere: grow GPU memory on demand instead of taking 75% up front.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks import train as train_bench  # noqa: E402  (numpy-only at import)

# HF config.json dicts: one source for both sides (ModelConfig.from_hf_dict, LlamaConfig(**)).
_LLAMA = dict(architectures=["LlamaForCausalLM"], model_type="llama", hidden_act="silu",
              rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2)
SHAPES = {
    "llama2-7b": dict(_LLAMA, vocab_size=32000, hidden_size=4096, intermediate_size=11008,
                      num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
                      max_position_embeddings=4096, rope_theta=10000.0,
                      tie_word_embeddings=False),
    "llama3.2-1b": dict(_LLAMA, vocab_size=128256, hidden_size=2048, intermediate_size=8192,
                        num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
                        max_position_embeddings=131072, rope_theta=500000.0,
                        tie_word_embeddings=True),
    # --smoke: the same code paths at sizes a CPU runs in seconds.
    "tiny-decode": dict(_LLAMA, vocab_size=512, hidden_size=64, intermediate_size=128,
                        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                        max_position_embeddings=512, rope_theta=10000.0,
                        tie_word_embeddings=False),
    "tiny-train": dict(_LLAMA, vocab_size=512, hidden_size=64, intermediate_size=128,
                       num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                       max_position_embeddings=512, rope_theta=500000.0,
                       tie_word_embeddings=True),
}
FULL = dict(decode_shape="llama2-7b", train_shape="llama3.2-1b", prompt=256, new=128,
            batches="1,8,64", train_batch=8, seq=1024, repeats=2, steps=5, warmup=2)
SMOKE = dict(decode_shape="tiny-decode", train_shape="tiny-train", prompt=16, new=16,
             batches="1,4", train_batch=2, seq=32, repeats=2, steps=2, warmup=1)

# run_config.train's defaults for a full fine-tune (tests/test_accelerator_benchmark.py
# checks them against run_config), with benchmarks/train.py's learning-rate schedule.
TRAIN = dict(method="full", dtype="bfloat16", param_dtype="float32", remat=False,
             grad_accum=1, seed=0, lr=train_bench.LR, warmup_steps=train_bench.WARMUP,
             warmup_ratio=0.0, min_lr_ratio=0.1, clip_norm=train_bench.CLIP,
             weight_decay=train_bench.DECAY, adam_b1=0.9, adam_b2=0.999, adam_eps=1e-8)

# HBM bandwidth (bytes/s) by device name substring, longest match wins.
HBM = {"H100": 3.35e12, "H100 PCIe": 2.0e12, "H100 NVL": 3.9e12, "H200": 4.8e12,
       "A100": 2.0e12}
TARGETS = {"decode_b1_roofline": 0.60, "decode_b1_vs_hf": 5.0, "decode_b64_vs_hf": 3.0,
           "train_mfu": 0.50}
PHASES = (("decode", "ours"), ("decode", "transformers"), ("train", "ours"),
          ("train", "transformers"))
HF_TRAIN_MFU_H100 = 0.357  # transformers, measured on an H100 (issue 15).


def settings(args) -> dict:
  """The sizes of this run: --smoke's or the full ones, each overridable by its flag."""
  base = SMOKE if args.smoke else FULL
  return {k: (getattr(args, k) if getattr(args, k, None) is not None else v)
          for k, v in base.items()}


def by_substring(table: dict, name: str) -> float | None:
  matches = [k for k in table if k.lower() in (name or "").lower()]
  return table[max(matches, key=len)] if matches else None


# ------------------------------------------------------------------------------ children


def _error(e: BaseException) -> str:
  return f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"[:400]


class Child:
  """One phase in its own process: emits `CASE {json}` lines on stdout as cases finish."""

  def __init__(self, args, s: dict):
    self.args, self.s = args, s
    self.deadline = args.deadline
    self.last_case_s = 0.0

  def emit(self, kind: str, row: dict) -> None:
    print(f"{kind} {json.dumps(row)}", flush=True)

  def fits(self) -> bool:
    """Enough time left for another case like the last one (with half again to spare)."""
    return time.time() + 1.5 * self.last_case_s < self.deadline

  def run_case(self, row: dict, fn) -> None:
    start = time.perf_counter()
    if not self.fits():
      row["skipped"] = "time budget"
    else:
      try:
        row.update(fn())
      except Exception as e:  # pylint: disable=broad-except
        row["error"] = _error(e)
        print(f"[{row['phase']} {row['side']} b={row['batch']}]", file=sys.stderr)
        traceback.print_exc()
      finally:
        gc.collect()
      self.last_case_s = time.perf_counter() - start
    row["case_s"] = round(time.perf_counter() - start, 2)
    self.emit("CASE", row)


def best_time(fn, repeats: int) -> float:
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return min(times)


class CompileMeter:
  """Seconds spent compiling (every /jax/core/compile/ event: trace, lowering, XLA backend)."""

  def __init__(self):
    import jax  # pylint: disable=g-import-not-at-top
    self.total = self.backend = 0.0
    self.count = 0

    def on_event(event: str, seconds: float, **_) -> None:
      if event.startswith("/jax/core/compile/"):
        self.total += seconds
      if event.endswith("backend_compile_duration"):
        self.backend += seconds
        self.count += 1

    jax.monitoring.register_event_duration_secs_listener(on_event)

  def snapshot(self) -> tuple[float, float, int]:
    return self.total, self.backend, self.count

  def since(self, snap) -> dict:
    return {"compile_s": round(self.total - snap[0], 2),
            "backend_compile_s": round(self.backend - snap[1], 2),
            "compiles": self.count - snap[2]}


def attention_kwargs(cls, requested: str) -> tuple[dict, str]:
  """`attention=requested` for the constructor when it has that switch, and a note for the
  JSON saying whether it was passed. (`__init__`'s signature: an nnx.Module class's own is
  its metaclass's `(*args, **kwargs)`.)"""
  if "attention" in inspect.signature(cls.__init__).parameters:
    return {"attention": requested}, f"attention={requested!r} passed to {cls.__name__}"
  note = f"{cls.__name__} has no attention= switch (its one implementation ran)"
  if requested != "auto":
    note += f"; --attention {requested} ignored"
  return {}, note


def model_attention(model) -> str | None:
  """What the model says about its attention implementation, if it says anything."""
  for obj in (model, getattr(model, "config", None)):
    for name in ("attention_impl", "attention_implementation", "attention"):
      value = getattr(obj, name, None)
      if isinstance(value, str):
        return value
  return None


def hlo_kernels(dump_dir: str | None) -> dict:
  """Custom calls in the optimized HLO XLA dumped for our programs: which attention kernels
  (cuDNN fused attention, Triton/Pallas, Mosaic) ran, per program."""
  if not dump_dir:
    return {}
  out = {}
  for path in sorted(glob.glob(os.path.join(dump_dir, "*after_optimizations.txt"))):
    name = re.sub(r"^module_\d+\.", "", os.path.basename(path)).split(".")[0]
    with open(path, encoding="utf-8", errors="replace") as f:
      targets = set(re.findall(r'custom_call_target="([^"]+)"', f.read()))
    attn = sorted(t for t in targets if re.search(r"fmha|flash|attention|triton|mosaic|splash",
                                                  t, re.IGNORECASE))
    out.setdefault(name, set()).update(attn)
  return {k: sorted(v) for k, v in out.items()}


def attention_ran(kernels: dict) -> str:
  """A one-word summary of `hlo_kernels`."""
  found = {t for v in kernels.values() for t in v}
  if any("fmha" in t.lower() for t in found):
    return "cudnn"
  if any("mosaic" in t.lower() or "splash" in t.lower() for t in found):
    return "mosaic/splash"
  if any("triton" in t.lower() for t in found):
    return "triton/pallas"
  return "xla dot-product" if kernels else "unknown (no HLO dump)"


def jax_env(smoke: bool) -> dict:
  import flax  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  dev = jax.devices()[0]
  if not smoke and dev.platform == "cpu":
    raise RuntimeError("JAX sees no accelerator (jax.devices() is CPU); run with --smoke on a "
                       "CPU, or install jax[cuda] on the GPU machine")
  return {"framework": "jax", "jax": jax.__version__, "flax": flax.__version__,
          "platform": dev.platform, "device": dev.device_kind, "python": platform.python_version()}


def torch_env(smoke: bool) -> dict:
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  cuda = torch.cuda.is_available() and not smoke
  if not smoke and not cuda:
    raise RuntimeError("torch sees no CUDA device; run with --smoke on a CPU")
  return {"framework": "torch", "torch": torch.__version__,
          "transformers": transformers.__version__, "platform": "cuda" if cuda else "cpu",
          "device": torch.cuda.get_device_name() if cuda else platform.processor() or "cpu",
          "python": platform.python_version()}


def random_model(config, dtype, param_dtype, mesh, layout: str, **kwargs):
  """A CausalLM with random weights made on the device under jit, each parameter in the
  sharding its logical axes give on `mesh` (no host copy of the weights)."""
  import jax  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from stt_jax.models import hf_io  # pylint: disable=g-import-not-at-top
  from stt_jax.models.decoder import CausalLM  # pylint: disable=g-import-not-at-top

  def make():
    return CausalLM(config, dtype=dtype, param_dtype=param_dtype, mesh=mesh,
                    rngs=nnx.Rngs(0), **kwargs)

  graphdef, state = nnx.split(nnx.eval_shape(make))
  flat = nnx.to_flat_state(state)
  shardings = {keys: hf_io.param_sharding(var, var.get_value().shape, mesh, layout)
               for keys, var in flat}
  values = jax.jit(lambda: {k: v.get_value() for k, v in nnx.to_flat_state(nnx.state(make()))},
                   out_shardings=shardings)()
  for keys, var in flat:
    var.set_value(values[keys])
  return nnx.merge(graphdef, nnx.from_flat_state(flat))


def model_config(name: str):
  from stt_jax.models.config import ModelConfig  # pylint: disable=g-import-not-at-top
  return ModelConfig.from_hf_dict(dict(SHAPES[name]), source=name)


def decode_ours(child: Child) -> None:
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from stt_jax import decode, sharding  # pylint: disable=g-import-not-at-top
  from stt_jax.engine import Engine  # pylint: disable=g-import-not-at-top
  from stt_jax.models.decoder import CausalLM  # pylint: disable=g-import-not-at-top

  s, args = child.s, child.args
  meter = CompileMeter()
  env = jax_env(args.smoke)
  config = model_config(s["decode_shape"])
  kwargs, note = attention_kwargs(CausalLM, args.attention)
  engine_kw = {k: getattr(args, k) for k in ("steps_per_call", "prefill_chunk")
               if getattr(args, k) is not None}
  mesh = sharding.make_mesh({"fsdp": 1}, jax.devices()[:1])
  snap, start = meter.snapshot(), time.perf_counter()
  model = random_model(config, jnp.bfloat16, jnp.bfloat16, mesh, "inference", **kwargs)
  jax.block_until_ready(nnx_leaves(model))
  init = {"init_s": round(time.perf_counter() - start, 2), **meter.since(snap)}
  crit = decode.StopCriteria.build(config.vocab_size)  # No EOS: every row makes `new` tokens.
  rng = np.random.default_rng(0)
  for b in [int(x) for x in s["batches"].split(",")]:
    row = {"phase": "decode", "side": "ours", "shape": s["decode_shape"], "batch": b,
           "prompt": s["prompt"], "new": s["new"], "env": env, "model_init": init,
           "attention_requested": args.attention, "attention_note": note}

    def case(b=b):
      prompts = rng.integers(10, config.vocab_size - 1, size=(b, s["prompt"])).tolist()
      eng = Engine(model, slots=b, **engine_kw)

      def run(new):
        out = list(eng.generate(prompts, new, crit))
        if sorted(len(o) for _, o, _ in out) != [new] * b:
          raise RuntimeError(f"engine made {sorted(len(o) for _, o, _ in out)} tokens, "
                             f"expected {new} per row")

      snap, start = meter.snapshot(), time.perf_counter()
      run(s["new"])
      run(1)  # Same programs: the slot capacity only grows.
      warm = {"warmup_s": round(time.perf_counter() - start, 2), **meter.since(snap)}
      snap = meter.snapshot()
      t_new = best_time(lambda: run(s["new"]), s["repeats"])
      t_one = best_time(lambda: run(1), s["repeats"])
      return {"seconds": t_new, "seconds_new1": t_one, "tokens_per_s": b * s["new"] / t_new,
              **decode_step(t_new, t_one, b, s["new"]), **warm,
              "compiles_while_timed": meter.since(snap)["compiles"],
              "engine": {"slots": eng.slots, "steps_per_call": eng.steps_per_call,
                         "prefill_chunk": eng.prefill_chunk, "capacity": eng.capacity,
                         "prefix_len": eng.prefix_len},
              "attention_model": model_attention(model)}

    child.run_case(row, case)


def decode_step(t_new: float, t_one: float, batch: int, new: int) -> dict:
  """Seconds per decode step from runs making `new` and 1 tokens (the same prefill): None
  when timing noise swamps the difference (tiny smoke shapes)."""
  if t_new <= t_one:
    return {"decode_step_s": None, "decode_tokens_per_s": None}
  step = (t_new - t_one) / (new - 1)
  return {"decode_step_s": step, "decode_tokens_per_s": batch / step}


def nnx_leaves(model):
  from flax import nnx  # pylint: disable=g-import-not-at-top
  return [v.get_value() for _, v in nnx.to_flat_state(nnx.state(model))]


def torch_device(smoke: bool) -> str:
  return "cpu" if smoke else "cuda"


def hf_model(name: str, dtype, device: str, attention: str):
  """LlamaForCausalLM with random weights made on `device` in `dtype` (default dtype switched
  for the construction, so no float32 copy of a bf16 model is ever made). The attention
  implementation is named: a model built from a config, not from_pretrained, gets eager
  attention in some transformers 4.x releases."""
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  config = transformers.LlamaConfig(attn_implementation=attention,
                                    **{k: v for k, v in SHAPES[name].items()
                                       if k not in ("architectures", "model_type")})
  previous = torch.get_default_dtype()
  torch.set_default_dtype(dtype)
  try:
    with torch.device(device):
      model = transformers.LlamaForCausalLM(config)
  finally:
    torch.set_default_dtype(previous)
  return model


def sync(device: str) -> None:
  import torch  # pylint: disable=g-import-not-at-top
  if device == "cuda":
    torch.cuda.synchronize()


def free_torch(device: str) -> None:
  import torch  # pylint: disable=g-import-not-at-top
  gc.collect()
  if device == "cuda":
    torch.cuda.empty_cache()


def decode_torch(child: Child) -> None:
  import numpy as np  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top

  s, args = child.s, child.args
  env = torch_env(args.smoke)
  device = torch_device(args.smoke)
  start = time.perf_counter()
  model = hf_model(s["decode_shape"], torch.bfloat16, device, args.hf_attention).eval()
  sync(device)
  init = {"init_s": round(time.perf_counter() - start, 2)}
  attn = model.config._attn_implementation  # pylint: disable=protected-access
  vocab = SHAPES[s["decode_shape"]]["vocab_size"]
  rng = np.random.default_rng(0)
  for b in [int(x) for x in s["batches"].split(",")]:
    row = {"phase": "decode", "side": "transformers", "shape": s["decode_shape"], "batch": b,
           "prompt": s["prompt"], "new": s["new"], "env": env, "model_init": init,
           "attention_model": attn}

    def case(b=b):
      ids = torch.tensor(rng.integers(10, vocab - 1, size=(b, s["prompt"])), device=device)

      def run(new):
        with torch.no_grad():
          out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new,
                               min_new_tokens=new, do_sample=False, pad_token_id=0)
        sync(device)
        if out.shape != (b, s["prompt"] + new):
          raise RuntimeError(f"generate returned {tuple(out.shape)}")

      start = time.perf_counter()
      run(s["new"])
      run(1)
      warm = {"warmup_s": round(time.perf_counter() - start, 2)}
      t_new = best_time(lambda: run(s["new"]), s["repeats"])
      t_one = best_time(lambda: run(1), s["repeats"])
      return {"seconds": t_new, "seconds_new1": t_one, "tokens_per_s": b * s["new"] / t_new,
              **decode_step(t_new, t_one, b, s["new"]), **warm}

    child.run_case(row, case)
    free_torch(device)


def train_ours(child: Child) -> None:
  import jax  # pylint: disable=g-import-not-at-top
  from stt_jax import sharding, train  # pylint: disable=g-import-not-at-top
  from stt_jax.models.decoder import CausalLM  # pylint: disable=g-import-not-at-top

  s, args = child.s, child.args
  meter = CompileMeter()
  env = jax_env(args.smoke)
  config = model_config(s["train_shape"])
  kwargs, note = attention_kwargs(CausalLM, args.attention)
  t = types.SimpleNamespace(**TRAIN, batch_size=s["train_batch"], seq_len=s["seq"])
  row = {"phase": "train", "side": "ours", "shape": s["train_shape"], "batch": s["train_batch"],
         "seq": s["seq"], "env": env, "attention_requested": args.attention,
         "attention_note": note, "settings": dict(TRAIN)}

  def case():
    mesh = sharding.make_mesh({"fsdp": 1}, jax.devices()[:1])
    snap, start = meter.snapshot(), time.perf_counter()
    model = random_model(config, t.dtype, t.param_dtype, mesh, "train", **kwargs)
    model.remat = t.remat
    attention = model_attention(model)
    trainer = train.Trainer(model, t, mesh, total_steps=s["warmup"] + s["steps"])
    del model
    state = trainer.init_state()
    batch = trainer.device_batch(train_bench.make_batch(s["train_batch"], s["seq"],
                                                        config.vocab_size))
    jax.block_until_ready(state)
    init = {"init_s": round(time.perf_counter() - start, 2), **meter.since(snap)}
    losses = []
    snap, start = meter.snapshot(), time.perf_counter()
    for _ in range(s["warmup"]):  # The first step compiles.
      state, metrics = trainer.step(state, batch)
      losses.append(float(metrics["loss"]))
    warm = {"warmup_s": round(time.perf_counter() - start, 2), **meter.since(snap)}
    snap = meter.snapshot()
    times = []
    for _ in range(s["steps"]):
      start = time.perf_counter()
      state, metrics = trainer.step(state, batch)
      losses.append(float(metrics["loss"]))  # Waits for the step.
      times.append(time.perf_counter() - start)
    step = sorted(times)[len(times) // 2]
    return {"model_init": init, **warm, "compiles_while_timed": meter.since(snap)["compiles"],
            "step_s": step, "times": times, "losses": losses,
            "tokens_per_s": s["train_batch"] * s["seq"] / step, "attention_model": attention}

  child.run_case(row, case)


def train_torch(child: Child) -> None:
  import torch  # pylint: disable=g-import-not-at-top

  s, args = child.s, child.args
  env = torch_env(args.smoke)
  device = torch_device(args.smoke)
  row = {"phase": "train", "side": "transformers", "shape": s["train_shape"],
         "batch": s["train_batch"], "seq": s["seq"], "env": env,
         "settings": {"weights": "float32", "autocast": "bfloat16", "optimizer":
                      "torch.optim.AdamW(fused=True)", "clip_norm": train_bench.CLIP}}

  def case():
    start = time.perf_counter()
    model = hf_model(s["train_shape"], torch.float32, device, args.hf_attention).train()
    opt = train_bench.torch_adamw(model, fused=True)
    total = s["warmup"] + s["steps"]
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda i: train_bench.lr_at(i, total) / train_bench.LR)
    batch = train_bench.make_batch(s["train_batch"], s["seq"],
                                   SHAPES[s["train_shape"]]["vocab_size"])
    step_fn = train_bench.torch_step_fn(model, opt, sched, batch, torch.bfloat16, device)
    sync(device)
    init = {"init_s": round(time.perf_counter() - start, 2)}
    losses = []
    start = time.perf_counter()
    for _ in range(s["warmup"]):
      losses.append(step_fn())
    warm = {"warmup_s": round(time.perf_counter() - start, 2)}
    times = []
    for _ in range(s["steps"]):
      start = time.perf_counter()
      losses.append(step_fn())  # .item(): waits for the step.
      times.append(time.perf_counter() - start)
    step = sorted(times)[len(times) // 2]
    attn = model.config._attn_implementation  # pylint: disable=protected-access
    peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None
    return {"model_init": init, **warm, "step_s": step, "times": times, "losses": losses,
            "tokens_per_s": s["train_batch"] * s["seq"] / step, "attention_model": attn,
            "peak_memory_gib": peak}

  child.run_case(row, case)
  free_torch(device)


CHILDREN = {("decode", "ours"): decode_ours, ("decode", "transformers"): decode_torch,
            ("train", "ours"): train_ours, ("train", "transformers"): train_torch}


def run_child(args) -> None:
  phase, side = args.child.split(":")
  child = Child(args, settings(args))
  try:
    CHILDREN[(phase, side)](child)
  except Exception as e:  # pylint: disable=broad-except  (setup failed: no case ran)
    child.emit("FAIL", {"error": _error(e)})
    raise
  if side == "ours":
    kernels = hlo_kernels(args.hlo_dir)
    child.emit("HLO", {"kernels": kernels, "attention_ran": attention_ran(kernels)})


# ------------------------------------------------------------------------------ parent


def child_command(args, phase: str, side: str, deadline: float, hlo_dir: str | None) -> list:
  cmd = [sys.executable, os.path.abspath(__file__), "--child", f"{phase}:{side}",
         "--deadline", str(deadline), "--attention", args.attention,
         "--hf_attention", args.hf_attention]
  if args.smoke:
    cmd.append("--smoke")
  if hlo_dir:
    cmd += ["--hlo_dir", hlo_dir]
  for k in list(FULL) + ["steps_per_call", "prefill_chunk"]:
    if getattr(args, k, None) is not None:
      cmd += [f"--{k}", str(getattr(args, k))]
  return cmd


def child_env(args, side: str, hlo_dir: str | None) -> dict:
  env = dict(os.environ, XLA_PYTHON_CLIENT_PREALLOCATE="false", PYTHONUNBUFFERED="1")
  if args.smoke:
    env["JAX_PLATFORMS"] = "cpu"
    env["CUDA_VISIBLE_DEVICES"] = ""
  if side == "ours" and hlo_dir:  # Optimized HLO of our programs only (names in hlo_kernels).
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + f" --xla_dump_to={hlo_dir}"
                        " --xla_dump_hlo_as_text"
                        " --xla_dump_hlo_module_re=.*(_decode_program|_prefill_program"
                        "|_prefix_program|_train_step).*").strip()
  return env


def run_phase(args, phase: str, side: str, deadline: float, tmp: str, log_dir: str) -> dict:
  """Runs one phase's child (its stderr kept in `log_dir`); returns {cases, hlo, error,
  log_tail (when anything failed), seconds}."""
  hlo_dir = None if args.no_hlo_dump else os.path.join(tmp, f"hlo_{phase}")
  log_path = os.path.join(log_dir, f"{phase}_{side}.log")
  out = {"cases": [], "hlo": None, "error": None, "seconds": None}
  start = time.perf_counter()
  with open(log_path, "w", encoding="utf-8") as log:
    proc = subprocess.Popen(child_command(args, phase, side, deadline, hlo_dir),
                            stdout=subprocess.PIPE, stderr=log, text=True,
                            env=child_env(args, side, hlo_dir), start_new_session=True)

    def read():
      for line in proc.stdout:
        kind, _, payload = line.partition(" ")
        if kind == "CASE":
          case = json.loads(payload)
          out["cases"].append(case)
          print(f"  {case_line(case)}", flush=True)
        elif kind == "HLO":
          out["hlo"] = json.loads(payload)
        elif kind == "FAIL":
          out["error"] = json.loads(payload)["error"]

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
      proc.wait(timeout=max(1.0, deadline - time.time()))
    except subprocess.TimeoutExpired:
      os.killpg(proc.pid, 9)  # The child and anything it started.
      proc.wait()
      out["error"] = out["error"] or "stopped at the time budget (--budget_s)"
    reader.join(timeout=10)
  if proc.returncode and not out["error"]:
    out["error"] = f"exit status {proc.returncode}"
  if out["error"] or any(c.get("error") for c in out["cases"]):
    with open(log_path, encoding="utf-8", errors="replace") as f:
      out["log_tail"] = f.read()[-3000:]
    print(f"  {phase} {side}: {out['error'] or 'a case failed'}; log {log_path}, tail:\n"
          f"{out['log_tail'][-1500:].strip()}", flush=True)
  out["seconds"] = round(time.perf_counter() - start, 1)
  return out


def case_line(c: dict) -> str:
  head = f"{c['phase']} {c['side']} {c['shape']} b={c['batch']}"
  if c.get("error") or c.get("skipped"):
    return f"{head}: {c.get('error') or 'skipped: ' + c['skipped']}"
  if c["phase"] == "decode":
    step = ("step -" if c["decode_step_s"] is None else
            f"step {1e3 * c['decode_step_s']:.2f} ms ({c['decode_tokens_per_s']:.1f} tok/s)")
    return (f"{head}: {c['tokens_per_s']:.1f} tok/s end to end, {step}, warm-up "
            f"{c['warmup_s']:.1f} s")
  return (f"{head}x{c['seq']}: step {c['step_s']:.3f} s ({c['tokens_per_s']:.0f} tok/s), "
          f"warm-up {c['warmup_s']:.1f} s")


def decode_bytes_per_step(config, prompt: int, new: int, batch: int = 1) -> dict:
  """Bytes a decode step must read at least: every weight but the input embedding table (a
  lookup; read whole when tied, as the LM head), in bf16, plus the batch's KV at the average
  context over the run (prompt + (new - 1) / 2 tokens)."""
  weights = config.num_params()
  if not config.tie_word_embeddings:
    weights -= config.vocab_size * config.hidden_size
  per_token = 2 * config.num_hidden_layers * config.num_key_value_heads * config.head_dim * 2
  kv = batch * per_token * (prompt + (new - 1) / 2)
  return {"weight_bytes": 2 * weights, "kv_bytes": kv, "bytes": 2 * weights + kv}


def summarize(cases: list[dict], s: dict, args) -> dict:
  """Ratios, roofline and MFU beside the targets."""
  from stt_jax import flops  # pylint: disable=g-import-not-at-top
  get = lambda phase, side, batch: next(
      (c for c in cases if (c["phase"], c["side"], c["batch"]) == (phase, side, batch)
       and not c.get("error") and not c.get("skipped")), None)
  device = next((c["env"]["device"] for c in cases if c.get("env", {}).get("platform")
                 not in (None, "cpu")), None)
  device = device or next((c["env"]["device"] for c in cases if c.get("env")), "")
  bandwidth = args.hbm_tbs * 1e12 if args.hbm_tbs else by_substring(HBM, device)
  peak = flops.peak_flops(device, (args.peak_tflops or 0) * 1e12)
  out = {"device": device, "hbm_bytes_per_s": bandwidth, "peak_flops": peak, "rows": []}
  rows = out["rows"]

  dcfg = model_config(s["decode_shape"])
  for b in [int(x) for x in s["batches"].split(",")]:
    ours, hf = get("decode", "ours", b), get("decode", "transformers", b)
    r = {"case": f"decode b={b}", "batch": b}
    step = lambda c: c and c["decode_step_s"]
    for name, c in (("ours", ours), ("hf", hf)):
      r[f"{name}_tok_s"] = c and c["tokens_per_s"]
      r[f"{name}_step_ms"] = step(c) and 1e3 * step(c)
    if ours and hf:
      r["ratio"] = ours["tokens_per_s"] / hf["tokens_per_s"]
      if step(ours) and step(hf):
        r["step_ratio"] = step(hf) / step(ours)
    need = decode_bytes_per_step(dcfg, s["prompt"], s["new"], b)
    r.update(need)
    if bandwidth:
      r["roofline_step_ms"] = 1e3 * need["bytes"] / bandwidth
      for name, c in (("ours", ours), ("hf", hf)):
        r[f"{name}_roofline"] = step(c) and need["bytes"] / bandwidth / step(c)
    if b == 1:
      r["target"] = (f"roofline >= {TARGETS['decode_b1_roofline']:.0%}, "
                     f">= {TARGETS['decode_b1_vs_hf']:.0f}x transformers")
      r["met"] = _met(r.get("ours_roofline"), TARGETS["decode_b1_roofline"],
                      r.get("ratio"), TARGETS["decode_b1_vs_hf"])
    elif b == 64 or b == max(int(x) for x in s["batches"].split(",")):
      r["target"] = f">= {TARGETS['decode_b64_vs_hf']:.0f}x transformers"
      r["met"] = _met(r.get("ratio"), TARGETS["decode_b64_vs_hf"])
    rows.append(r)

  tcfg = model_config(s["train_shape"])
  per_token = flops.flops_per_token(tcfg, s["seq"], "full")
  ours, hf = get("train", "ours", s["train_batch"]), get("train", "transformers",
                                                         s["train_batch"])
  r = {"case": f"train b={s['train_batch']}x{s['seq']}", "flops_per_token": per_token,
       "params": tcfg.num_params()}
  for name, c in (("ours", ours), ("hf", hf)):
    r[f"{name}_step_s"] = c and c["step_s"]
    r[f"{name}_tok_s"] = c and c["tokens_per_s"]
    r[f"{name}_mfu"] = c and flops.mfu(per_token, c["tokens_per_s"], peak, 1)
  if ours and hf:
    r["ratio"] = hf["step_s"] / ours["step_s"]
  r["target"] = (f"MFU >= {TARGETS['train_mfu']:.0%} (transformers: "
                 f"{HF_TRAIN_MFU_H100:.1%} on an H100)")
  r["met"] = _met(r.get("ours_mfu"), TARGETS["train_mfu"])
  rows.append(r)
  return out


def _met(*pairs) -> str:
  """'yes' / 'no' over (value, threshold) pairs; '-' when a value is missing."""
  values = list(zip(pairs[::2], pairs[1::2]))
  if any(v is None for v, _ in values):
    return "-"
  return "yes" if all(v >= t for v, t in values) else "no"


def print_table(summary: dict) -> None:
  fmt = lambda v, spec: "-" if v is None else format(v, spec)
  bw = summary["hbm_bytes_per_s"]
  print(f"\ndevice: {summary['device'] or '?'}; HBM {fmt(bw and bw / 1e12, '.2f')} TB/s; "
        f"peak bf16 {fmt(summary['peak_flops'] and summary['peak_flops'] / 1e12, '.0f')} "
        "TFLOP/s")
  header = ("case", "metric", "ours", "transformers", "speedup x", "target", "met")
  lines = []
  for r in summary["rows"]:
    if r["case"].startswith("decode"):
      lines.append((r["case"], "tokens/s (e2e)", fmt(r["ours_tok_s"], ".1f"),
                    fmt(r["hf_tok_s"], ".1f"), fmt(r.get("ratio"), ".2f"),
                    r.get("target", ""), r.get("met", "")))
      lines.append(("", "decode step ms", fmt(r["ours_step_ms"], ".2f"),
                    fmt(r["hf_step_ms"], ".2f"), fmt(r.get("step_ratio"), ".2f"), "", ""))
      if r["batch"] == 1:
        lines.append(("", "HBM roofline", fmt(r.get("ours_roofline"), ".1%"),
                      fmt(r.get("hf_roofline"), ".1%"), "",
                      f"roofline step {fmt(r.get('roofline_step_ms'), '.3g')} ms", ""))
    else:
      lines.append((r["case"], "step s", fmt(r["ours_step_s"], ".3f"), fmt(r["hf_step_s"], ".3f"),
                    fmt(r.get("ratio"), ".2f"), "", ""))
      lines.append(("", "MFU", fmt(r["ours_mfu"], ".1%"), fmt(r["hf_mfu"], ".1%"), "",
                    r["target"], r["met"]))
  widths = [max(len(str(x)) for x in col) for col in zip(header, *lines)]
  row = lambda cells: "| " + " | ".join(str(c).ljust(w) for c, w in zip(cells, widths)) + " |"
  print(row(header))
  print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
  for line in lines:
    print(row(line))


def run_parent(args) -> None:
  start = time.time()
  deadline = start + args.budget_s
  s = settings(args)
  out_path = args.out or os.path.join(ROOT, "benchmarks", "results",
                                      "accelerator_smoke.json" if args.smoke
                                      else "accelerator.json")
  result = {"script": "benchmarks/accelerator.py", "argv": sys.argv[1:], "smoke": args.smoke,
            "settings": s, "attention_requested": args.attention, "budget_s": args.budget_s,
            "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(start)),
            "targets": TARGETS, "phases": {}, "cases": []}
  phases = [p for p in PHASES if not args.phases or f"{p[0]}:{p[1]}" in args.phases.split(",")]
  log_dir = os.path.splitext(os.path.abspath(out_path))[0] + "_logs"  # stderr of each phase
  os.makedirs(log_dir, exist_ok=True)
  result["logs"] = log_dir
  with tempfile.TemporaryDirectory() as tmp:
    reserve = 0 if args.smoke else args.min_phase_s
    for i, (phase, side) in enumerate(phases):
      key = f"{phase}:{side}"
      left = deadline - time.time()
      if left < reserve:
        result["phases"][key] = {"skipped": f"time budget ({left:.0f} s left)"}
        print(f"{key}: skipped, {left:.0f} s left of --budget_s {args.budget_s}", flush=True)
        continue
      print(f"{key} ({left:.0f} s left)", flush=True)
      # Each later phase keeps `reserve` seconds: a stuck phase cannot starve the rest.
      cap = min(deadline, time.time() + left - reserve * (len(phases) - i - 1))
      got = run_phase(args, phase, side, cap, tmp, log_dir)
      result["cases"] += got.pop("cases")
      result["phases"][key] = got
      finish(result, s, args, start, out_path)
  finish(result, s, args, start, out_path)
  if "rows" in result["summary"]:
    print_table(result["summary"])
  for key, p in result["phases"].items():
    if p.get("hlo"):
      print(f"{key}: attention kernels: {p['hlo']['attention_ran']} {p['hlo']['kernels']}")
  print(f"wall {result['wall_s']:.0f} s of --budget_s {args.budget_s}; wrote {out_path}")
  if args.smoke and any(c.get("error") or c.get("skipped") for c in result["cases"]):
    raise SystemExit("smoke run: some case failed or was skipped (see above)")
  if args.smoke and len(result["cases"]) < len(phases):
    raise SystemExit("smoke run: a phase produced no case (see above)")


def finish(result: dict, s: dict, args, start: float, out_path: str) -> None:
  """Summary and wall time into `result`, written to `out_path` (the cases are kept even if
  the summary fails)."""
  try:
    result["summary"] = summarize(result["cases"], s, args)
  except Exception as e:  # pylint: disable=broad-except
    result["summary"] = {"error": _error(e)}
    traceback.print_exc()
  result["wall_s"] = round(time.time() - start, 1)
  write_json(out_path, result)


def write_json(path: str, result: dict) -> None:
  tmp = path + ".tmp"
  with open(tmp, "w", encoding="utf-8") as f:
    json.dump(result, f, indent=1, default=str)
  os.replace(tmp, path)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--out", default=None, help="JSON path (default benchmarks/results/)")
  parser.add_argument("--smoke", action="store_true", help="tiny shapes on CPU")
  parser.add_argument("--attention", default="auto",
                      help="auto|xla|cudnn|splash, passed to CausalLM(attention=) when it has "
                           "that switch")
  parser.add_argument("--hf_attention", default="sdpa",
                      help="transformers attn_implementation (sdpa, eager, flash_attention_2)")
  parser.add_argument("--budget_s", type=float, default=420.0,
                      help="wall-clock budget; phases and cases that no longer fit are skipped")
  parser.add_argument("--min_phase_s", type=float, default=45.0,
                      help="a phase starts only with this much budget left, and keeps this "
                           "much for each later phase")
  parser.add_argument("--phases", default="",
                      help="comma list of decode:ours,decode:transformers,train:ours,"
                           "train:transformers (default all)")
  parser.add_argument("--hbm_tbs", type=float, default=None,
                      help="HBM bandwidth in TB/s (default from the device name: H100 SXM "
                           "3.35, H200 4.8)")
  parser.add_argument("--peak_tflops", type=float, default=None,
                      help="peak dense bf16 TFLOP/s (default stt_jax.flops.PEAK_FLOPS: 989)")
  parser.add_argument("--no_hlo_dump", action="store_true",
                      help="skip the HLO dump that records which attention kernels ran")
  for k, v in FULL.items():
    parser.add_argument(f"--{k}", type=type(v), default=None,
                        help=f"default {v} ({SMOKE[k]} with --smoke)")
  parser.add_argument("--steps_per_call", type=int, default=None,
                      help="Engine decode steps per call (default: the Engine's, as translate)")
  parser.add_argument("--prefill_chunk", type=int, default=None,
                      help="Engine prompt tokens per prefill call (default: the Engine's)")
  parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
  parser.add_argument("--deadline", type=float, default=None, help=argparse.SUPPRESS)
  parser.add_argument("--hlo_dir", default=None, help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  if args.child:
    run_child(args)
  else:
    run_parent(args)


if __name__ == "__main__":
  main()
