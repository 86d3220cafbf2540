"""Checks a fetched folder (default: the demo's) against transformers' own GGUF route (uses torch).

Our converter dequantizes with the same `gguf` numpy kernels transformers uses, then rounds
to bf16; so the weights must equal transformers' f32 weights rounded to bf16 bit for bit,
and logits may differ only by that rounding. Run after `python -m stt_jax.models.fetch_demo`:

  python benchmarks/check_fetch_demo.py [--model gemma3-270m] [--folder DIR] [--gguf PATH]
      [--json OUT]
"""

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

PROMPTS = {
    "en": "The quick brown fox jumps over the lazy dog. Translate into Chinese:",
    "zh": "今天天气很好，我们一起去公园散步吧。请翻译成英文：",
}


def main() -> int:
  import safetensors
  import torch
  from transformers import AutoModelForCausalLM, AutoTokenizer

  from stt_jax.models import fetch_demo

  parser = argparse.ArgumentParser()
  parser.add_argument("--model", default=fetch_demo.DEFAULT_MODEL,
                      choices=sorted(fetch_demo.MODELS))
  parser.add_argument("--folder", default=None, help="default: the model's cache folder")
  parser.add_argument("--gguf", default=None, help="default: the GGUF the folder was built from")
  parser.add_argument("--new-tokens", type=int, default=24)
  parser.add_argument("--json", default=None)
  args = parser.parse_args()
  torch.manual_seed(0)
  args.folder = args.folder or str(fetch_demo.default_cache_dir(args.model))
  gguf = args.gguf or fetch_demo.source_gguf(args.folder)
  if not fetch_demo.is_complete(args.folder) or gguf is None:
    print(f"need a finished folder with its GGUF: {args.folder}", file=sys.stderr)
    return 2
  gdir, gname = os.path.split(os.path.abspath(gguf))
  report: dict = {"folder": args.folder, "gguf": str(gguf)}

  t = time.time()
  ref = AutoModelForCausalLM.from_pretrained(gdir, gguf_file=gname, dtype=torch.float32).eval()
  report["ref_load_s"] = round(time.time() - t, 1)
  t = time.time()
  ours = AutoModelForCausalLM.from_pretrained(args.folder, dtype=torch.float32).eval()
  report["ours_load_s"] = round(time.time() - t, 1)
  ref_tok = AutoTokenizer.from_pretrained(gdir, gguf_file=gname)
  our_tok = AutoTokenizer.from_pretrained(args.folder)

  # 1. Weights: ours (bf16 on disk) vs transformers' f32 dequantization.
  ref_sd = ref.state_dict()
  max_abs, not_exact, n = 0.0, [], 0
  with safetensors.safe_open(os.path.join(args.folder, "model.safetensors"), "pt") as f:
    names = list(f.keys())
    for name in names:
      mine = f.get_tensor(name)
      theirs = ref_sd[name]
      assert mine.shape == theirs.shape, (name, mine.shape, theirs.shape)
      max_abs = max(max_abs, (mine.float() - theirs).abs().max().item())
      if not torch.equal(mine, theirs.to(mine.dtype)):
        not_exact.append(name)
      n += 1
  tied = [k for k in ref_sd if k == "lm_head.weight" and k not in names]  # Tied: not stored.
  report["weights"] = {"tensors": n,
                       "same_names": sorted(names) == sorted(set(ref_sd) - set(tied)),
                       "tied_head_not_stored": bool(tied),
                       "max_abs_diff_vs_f32": max_abs,
                       "not_equal_to_ref_rounded_to_bf16": not_exact}

  # 2. Tokenizer ids, and chat template rendering.
  report["tokenizer"] = {}
  for key, text in PROMPTS.items():
    a, b = our_tok(text).input_ids, ref_tok(text).input_ids
    report["tokenizer"][key] = {"ids_equal": a == b, "n_tokens": len(a)}
  if our_tok.chat_template or ref_tok.chat_template:  # Gemma's GGUF carries none.
    msgs = [{"role": "user", "content": PROMPTS["zh"]}]
    a = our_tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    b = ref_tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    report["tokenizer"]["chat_template_equal"] = a == b
  report["tokenizer"]["decode_roundtrip"] = all(
      our_tok.decode(our_tok(x).input_ids, skip_special_tokens=True) == x  # Gemma adds <bos>.
      for x in PROMPTS.values())

  # 3. Logits: ours vs transformers' f32, and vs transformers' weights rounded to bf16.
  rounded = AutoModelForCausalLM.from_pretrained(gdir, gguf_file=gname, dtype=torch.float32).eval()
  with torch.no_grad():
    for p in rounded.parameters():
      p.copy_(p.to(torch.bfloat16).float())
  report["logits"] = {}
  with torch.no_grad():
    for key, text in PROMPTS.items():
      ids = ref_tok(text, return_tensors="pt").input_ids
      lo, lr, lb = (m(ids).logits[0].float() for m in (ours, ref, rounded))
      top_o, top_r = lo.argmax(-1), lr.argmax(-1)
      report["logits"][key] = {
          "positions": ids.shape[1],
          "max_abs_diff_vs_f32_ref": (lo - lr).abs().max().item(),
          "max_abs_logit": lr.abs().max().item(),
          "max_abs_diff_vs_bf16_rounded_ref": (lo - lb).abs().max().item(),
          "argmax_agree_frac": (top_o == top_r).float().mean().item(),
          "last_token_agree": bool(top_o[-1] == top_r[-1]),
      }
      go = ours.generate(ids, max_new_tokens=args.new_tokens, do_sample=False)[0, ids.shape[1]:]
      gr = ref.generate(ids, max_new_tokens=args.new_tokens, do_sample=False)[0, ids.shape[1]:]
      same = 0  # Leading tokens that agree.
      while same < min(len(go), len(gr)) and go[same] == gr[same]:
        same += 1
      report["logits"][key].update(
          greedy_prefix_match=f"{same}/{len(gr)}",
          ours_text=our_tok.decode(go, skip_special_tokens=True),
          ref_text=ref_tok.decode(gr, skip_special_tokens=True))
  text = json.dumps(report, indent=2, ensure_ascii=False)
  print(text)
  if args.json:
    with open(args.json, "w", encoding="utf-8") as fh:
      fh.write(text + "\n")
  return 0


if __name__ == "__main__":
  sys.exit(main())
