"""benchmarks/accelerator.py --smoke end to end (tiny shapes, CPU), as the GPU image would run
it: without ml_collections and datasets (not installed there), so the GPU run is not the
script's first execution. About a minute: marked slow."""

import json
import os
import subprocess
import sys
import textwrap

import pytest

from benchmarks import accelerator

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Makes `import ml_collections` / `import datasets` fail in the script and its children.
BLOCKER = textwrap.dedent("""
    import importlib.abc, sys

    class _Absent(importlib.abc.MetaPathFinder):
      def find_spec(self, name, path, target=None):
        if name.split(".")[0] in ("ml_collections", "datasets"):
          raise ImportError(f"{name} is not installed on the GPU image")

    sys.meta_path.insert(0, _Absent())
""")


def test_train_settings_are_run_config_defaults():
  from stt_jax import run_config
  t = run_config.get_config().train
  for key in ("dtype", "param_dtype", "remat", "grad_accum", "seed", "min_lr_ratio",
              "clip_norm", "adam_b1", "adam_b2", "adam_eps", "warmup_ratio"):
    assert accelerator.TRAIN[key] == t[key], key


@pytest.mark.parametrize("name", ["llama2-7b", "llama3.2-1b"])
def test_full_shapes_have_the_same_parameters_on_both_sides(name):
  """Our model and transformers' built from the same SHAPES entry (abstract / meta device)."""
  import torch
  from flax import nnx
  from stt_jax.models import hf_io
  config = accelerator.model_config(name)
  ours = nnx.state(hf_io.abstract_model(config, "bfloat16"), nnx.Param)
  ours_count = sum(v.get_value().size for _, v in nnx.to_flat_state(ours))
  with torch.device("meta"):
    hf = accelerator.hf_model(name, torch.bfloat16, "meta", "sdpa")
  assert ours_count == config.num_params() == sum(p.numel() for p in hf.parameters())
  assert hf.config.tie_word_embeddings == config.tie_word_embeddings


def test_decode_bytes_per_step_llama2_7b():
  need = accelerator.decode_bytes_per_step(accelerator.model_config("llama2-7b"), 256, 128)
  assert need["weight_bytes"] == 2 * (6_738_415_616 - 32000 * 4096)  # HF's parameter count
  assert need["kv_bytes"] == 2 * 32 * 4096 * 2 * (256 + 127 / 2)


def test_attention_switch_passed_only_when_the_constructor_has_it():
  from flax import nnx

  class WithSwitch(nnx.Module):
    def __init__(self, config, *, attention: str = "auto"):
      self.attention = attention

  class Without(nnx.Module):
    def __init__(self, config):
      pass

  kwargs, note = accelerator.attention_kwargs(WithSwitch, "cudnn")
  assert kwargs == {"attention": "cudnn"} and "passed" in note
  assert accelerator.model_attention(WithSwitch(None, **kwargs)) == "cudnn"
  kwargs, note = accelerator.attention_kwargs(Without, "cudnn")
  assert kwargs == {} and "ignored" in note


@pytest.mark.slow
def test_smoke_run_end_to_end(tmp_path):
  (tmp_path / "sitecustomize.py").write_text(BLOCKER)
  env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
  env["PYTHONPATH"] = str(tmp_path)
  out = tmp_path / "accelerator.json"
  proc = subprocess.run(
      [sys.executable, os.path.join(ROOT, "benchmarks", "accelerator.py"), "--smoke",
       "--out", str(out), "--hbm_tbs", "0.05", "--peak_tflops", "1"],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, check=False)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  result = json.loads(out.read_text())
  assert set(result["phases"]) == {"decode:ours", "decode:transformers", "train:ours",
                                   "train:transformers"}
  assert not any(p.get("error") for p in result["phases"].values())
  cases = result["cases"]
  assert len(cases) == 2 * 2 + 2 and not any(c.get("error") for c in cases)
  assert {c["env"]["framework"] for c in cases if c["side"] == "ours"} == {"jax"}
  assert {c["env"]["framework"] for c in cases if c["side"] == "transformers"} == {"torch"}
  rows = {r["case"]: r for r in result["summary"]["rows"]}
  assert rows["decode b=1"]["ratio"] > 0 and rows["decode b=4"]["ratio"] > 0
  assert rows["decode b=1"]["roofline_step_ms"] > 0
  train = rows["train b=2x32"]
  assert train["ours_mfu"] > 0 and train["hf_mfu"] > 0 and train["ratio"] > 0
  assert result["phases"]["train:ours"]["hlo"]["attention_ran"] == "xla dot-product"
  assert "| decode b=1" in proc.stdout and "MFU" in proc.stdout
