"""Cheap checks before any stage runs, so bad input fails in seconds with one line naming the
problem and the fix, not an hour into a run or deep inside XLA."""

from __future__ import annotations

import json
import os


class PreflightError(ValueError):
  """Input that cannot work: the message names the file or key and the fix."""


def load_tokenizer(model_path: str):
  """The model folder's tokenizer, never executing code shipped in the folder."""
  from transformers import AutoTokenizer  # pylint: disable=g-import-not-at-top
  return AutoTokenizer.from_pretrained(model_path, trust_remote_code=False)


def check(cfg, workdir: str, tokenizer) -> None:
  """Raises PreflightError for a config that cannot run with this model and tokenizer."""
  with open(os.path.join(cfg.model.path, "config.json"), encoding="utf-8") as f:
    vocab = json.load(f).get("vocab_size")
  if vocab is not None and len(tokenizer) > int(vocab):
    raise PreflightError(
        f"model.path={cfg.model.path!r}: the tokenizer has {len(tokenizer)} tokens but "
        f"config.json says vocab_size={vocab}; the tokenizer files belong to another model")
  del workdir
