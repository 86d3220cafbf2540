"""Writes a random tiny Qwen2 + byte-level tokenizer HF folder: `python -m tests.make_tiny_model DIR`."""

import sys

from tests import hf_tiny


def main(out_dir: str) -> str:
  # 1024 positions: the longest tiny-config prompts (XNLI en, byte tokens) need ~300.
  hf_tiny.make_tiny("qwen2", out_dir, max_position_embeddings=1024)
  hf_tiny.byte_tokenizer(out_dir)
  return out_dir


if __name__ == "__main__":
  print(main(sys.argv[1]))
