"""Training data: mixture of sources -> tokens with a target-only loss mask -> packed batches.

Every example is the text `prompt + target` tokenized once, as the model reads it at eval time
(prompt = task.format_prompt(row), target = task.format_target(row)), plus EOS; the loss covers
only the target's tokens and EOS. Each epoch is a seeded function of (seed, epoch): which rows
of each source it uses (mixture weights), their order, and how they are packed into `seq_len`
rows (segment ids keep packed examples apart; positions restart at 0 in each). So the
iterator's whole state is (seed, epoch, position): saved in a checkpoint, it resumes on exactly
the next batch, and every process of a multi-host run computes the same plan and materialises
only its own rows.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import pathlib
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from stt_jax.tasks.base import MalformedRow, read_jsonl

# Data sources, in the order their weights appear in the config (train.mixture.<source>).
SOURCES = ("en", "translated", "code_switched")
# The sources each experiment variant trains on (PAPER.md): zero-shot transfer uses English
# only; Self-Translate-Train adds the self-translated rows, optionally code-switched ones too.
VARIANTS = {
    "zero_shot": ("en",),
    "self_translate": ("en", "translated"),
    "self_translate_cs": ("en", "translated", "code_switched"),
    # The round-trip-filtered translations, mixed as self_translate mixes its own.
    "self_translate_rt": ("en", "translated"),
}
# Row sets that fill a variant's source when they are not the source's own rows:
# variant -> {source: key of rows_by_source}.
ROW_SETS = {"self_translate_rt": {"translated": "translated_rt"}}


class DataError(ValueError):
  """Training data that cannot be used (missing source, empty after filtering, bad file)."""


def read_rows(path: str | os.PathLike) -> list[dict[str, Any]]:
  """Rows of a jsonl file written by the translation stage (task schema plus `lang`); the
  first broken line is an error naming file:line (the task reader only skips them)."""
  rows = []
  for where, _, record in read_jsonl(pathlib.Path(path)):
    if isinstance(record, MalformedRow):
      raise DataError(f"{where}: {record}; fix or delete the line, or rerun the translate "
                      "stage")
    rows.append(record)
  return rows


def rows_for_variant(variant: str, rows_by_source: Mapping[str, Sequence[dict]]
                     ) -> dict[str, Sequence[dict]]:
  """The sources a variant trains on (each from its row set, ROW_SETS); a missing or empty
  one is an error, not a silent skip."""
  if variant not in VARIANTS:
    raise DataError(f"unknown variant {variant!r}; choose from {', '.join(VARIANTS)}")
  sets = {s: ROW_SETS.get(variant, {}).get(s, s) for s in VARIANTS[variant]}
  missing = [sets[s] for s in VARIANTS[variant] if not rows_by_source.get(sets[s])]
  if missing:
    raise DataError(f"variant {variant!r} needs rows for {', '.join(missing)}; run the "
                    "translate stage first (or pick variant 'zero_shot')")
  return {s: rows_by_source[sets[s]] for s in VARIANTS[variant]}


# ------------------------------------------------------------------------------ tokenize


@dataclasses.dataclass
class Examples:
  """Tokenized examples of all sources, concatenated.

  tokens[i]: ids of prompt + target, then EOS; prompt_len[i]: how many of them are prompt;
  source[i]: index into `sources`. Examples longer than seq_len + 1 tokens were truncated
  (target end lost); those whose prompt alone filled seq_len were dropped. `cut` counts both
  per source and language: {source: {lang: {"truncated": n, "dropped": n, "of": rows}}},
  only where something was cut.
  """

  tokens: list[np.ndarray]
  prompt_len: np.ndarray
  source: np.ndarray
  sources: tuple[str, ...]
  cut: dict[str, dict[str, dict[str, int]]] = dataclasses.field(default_factory=dict)

  @property
  def truncated(self) -> int:
    return sum(c["truncated"] for langs in self.cut.values() for c in langs.values())

  @property
  def dropped(self) -> int:
    return sum(c["dropped"] for langs in self.cut.values() for c in langs.values())

  def indices(self, source: str) -> np.ndarray:
    return np.flatnonzero(self.source == self.sources.index(source))

  def target_width(self, seq_len: int, multiple: int = 8) -> int:
    """The most target tokens a row of `seq_len` tokens can hold, however examples are packed
    (rounded up to `multiple`, at most seq_len). A row holds at most seq_len tokens and each
    example's targets are at most r x its length, r the highest targets-to-length ratio of
    any example, so no row exceeds r x seq_len. The loss projects the LM head at this many
    positions per row."""
    n = np.asarray([len(t) - 1 for t in self.tokens], np.int64)
    if not len(n) or not n.max():
      return seq_len
    # Position j (< n) is a target when j + 1 >= prompt_len (the loss mask of BatchIterator).
    targets = np.clip(n - np.maximum(self.prompt_len, 1) + 1, 0, n)
    ratio = float(np.max(targets[n > 0] / n[n > 0]))
    width = -(-int(np.ceil(ratio * seq_len - 1e-9)) // multiple) * multiple
    return int(min(seq_len, max(width, multiple)))


def _encode(tokenizer, texts: Sequence[str], special: bool) -> list[list[int]]:
  return list(tokenizer(list(texts), add_special_tokens=special)["input_ids"])


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
  """Length of the longest common prefix of two id sequences."""
  n = min(len(a), len(b))
  diff = np.flatnonzero(np.asarray(a[:n]) != np.asarray(b[:n]))
  return int(diff[0]) if diff.size else n


def joined_tokens(tokenizer, prompts: Sequence[str], continuations: Sequence[str],
                  special: bool = True) -> list[tuple[list[int], int]]:
  """(ids of prompt + continuation tokenized as one text, how many of them are prompt).

  Encoding the two apart and concatenating is not what the model sees: a SentencePiece
  tokenizer adds its dummy prefix '▁' to the continuation, and BPE may merge across the
  boundary. The prompt part is the longest common prefix of encode(prompt) and
  encode(prompt + continuation), so a token straddling the boundary is continuation.
  """
  alone = _encode(tokenizer, prompts, special)
  joined = _encode(tokenizer, [p + c for p, c in zip(prompts, continuations)], special)
  return [(list(j), common_prefix(a, j)) for a, j in zip(alone, joined)]


def tokenize(task, rows_by_source: Mapping[str, Sequence[dict]], tokenizer,
             seq_len: int) -> Examples:
  """Tokenizes every row of every source (HF tokenizer call API: `tokenizer(texts,
  add_special_tokens=...)["input_ids"]`): prompt + target as one text with the tokenizer's
  special prefix (BOS), the loss on the target's tokens (see `joined_tokens`), and EOS
  appended so the model learns to stop."""
  unknown = set(rows_by_source) - set(SOURCES)
  if unknown:
    raise DataError(f"unknown data source(s) {sorted(unknown)}; sources are {SOURCES}")
  eos = getattr(tokenizer, "eos_token_id", None)
  if eos is None:
    raise DataError("the tokenizer has no eos_token_id; set one (EOS ends every target)")
  sources = tuple(s for s in SOURCES if rows_by_source.get(s))
  tokens, prompt_len, source = [], [], []
  counts: dict[tuple[str, str], dict[str, int]] = {}
  for k, name in enumerate(sources):
    rows = rows_by_source[name]
    pairs = joined_tokens(tokenizer, [task.format_prompt(r) for r in rows],
                          [task.format_target(r) for r in rows])
    for row, (ids, n_prompt) in zip(rows, pairs):
      count = counts.setdefault((name, str(row.get("lang", "unknown"))),
                                {"truncated": 0, "dropped": 0, "of": 0})
      count["of"] += 1
      ids = ids + [eos]
      if n_prompt >= seq_len:
        count["dropped"] += 1
        continue
      if len(ids) > seq_len + 1:
        count["truncated"] += 1
        ids = ids[:seq_len + 1]
      tokens.append(np.asarray(ids, np.int32))
      prompt_len.append(n_prompt)
      source.append(k)
  cut: dict[str, dict[str, dict[str, int]]] = {}
  for (name, lang), count in counts.items():
    if count["truncated"] or count["dropped"]:
      cut.setdefault(name, {})[lang] = count
  examples = Examples(tokens, np.asarray(prompt_len, np.int32), np.asarray(source, np.int32),
                      sources, cut)
  if cut:
    where = "; ".join(f"{name}/{lang}: {c['truncated']} truncated, {c['dropped']} dropped of "
                      f"{c['of']}" for name, langs in cut.items() for lang, c in langs.items())
    logging.warning("train data: %d example(s) truncated to seq_len=%d, %d dropped (prompt "
                    "alone too long) (%s); raise train.seq_len to keep them",
                    examples.truncated, seq_len, examples.dropped, where)
  if not tokens:
    raise DataError("no training examples left after tokenization")
  return examples


# ------------------------------------------------------------------------------ epochs


def _rng(*keys: int) -> np.random.Generator:
  return np.random.default_rng([int(k) for k in keys])


def epoch_order(examples: Examples, weights: Mapping[str, float], seed: int,
                epoch: int) -> np.ndarray:
  """Example indices of one epoch, shuffled.

  A source of n rows with weight w contributes round(w * n) rows per epoch, read from an
  endless sequence of seeded permutations of that source: w = 1 uses every row once (the
  paper's plain union), w = 0.5 a different half each epoch, w = 2 every row twice.
  """
  picks = []
  for k, name in enumerate(examples.sources):
    idx = examples.indices(name)
    n = len(idx)
    count = int(round(float(weights.get(name, 1.0)) * n))
    if count <= 0:
      continue
    start, stop = epoch * count, (epoch + 1) * count
    chunks = []
    for perm in range(start // n, (stop - 1) // n + 1):
      order = _rng(seed, 1, k, perm).permutation(n)
      lo, hi = max(start - perm * n, 0), min(stop - perm * n, n)
      chunks.append(idx[order[lo:hi]])
    picks.append(np.concatenate(chunks))
  if not picks:
    raise DataError("every data source has mixture weight 0")
  order = np.concatenate(picks)
  return order[_rng(seed, 2, epoch).permutation(len(order))]


def pack(lengths: np.ndarray, order: np.ndarray, seq_len: int, packing: bool
         ) -> list[list[int]]:
  """Rows of example indices. Packing fills rows greedily in order (an example that does not
  fit starts the next row); without packing each row holds one example."""
  if not packing:
    return [[int(i)] for i in order]
  rows, row, used = [], [], 0
  for i in order:
    n = int(lengths[i])
    if row and used + n > seq_len:
      rows.append(row)
      row, used = [], 0
    row.append(int(i))
    used += n
  if row:
    rows.append(row)
  return rows


@dataclasses.dataclass
class Batch:
  """Host arrays [rows, seq_len]: inputs, next-token targets, loss mask (1 on target tokens),
  segment ids (1, 2, ... per packed example, 0 = padding) and positions (restart per segment)."""

  inputs: np.ndarray
  targets: np.ndarray
  loss_mask: np.ndarray
  segment_ids: np.ndarray
  positions: np.ndarray

  def arrays(self) -> dict[str, np.ndarray]:
    return dataclasses.asdict(self)


class BatchIterator:
  """Deterministic, resumable batches over epochs; state = {seed, epoch, position}.

  Each batch has `batch_size` rows of `seq_len` tokens (the epoch's last batch is filled with
  empty rows, whose loss mask is 0). `next(rows)` materialises only the given row indices of
  the global batch, which is how each host builds just its slice.
  """

  def __init__(self, examples: Examples, *, batch_size: int, seq_len: int, packing: bool,
               weights: Mapping[str, float], seed: int, state: Mapping[str, int] | None = None):
    self.examples = examples
    self.batch_size = batch_size
    self.seq_len = seq_len
    self.packing = packing
    self.weights = dict(weights)
    self.seed = int(seed)
    self.epoch, self.position = 0, 0
    self._lengths = np.asarray([len(t) - 1 for t in examples.tokens], np.int64)
    self._plan: tuple[int, list[list[int]]] | None = None
    if state is not None:
      self.restore(state)

  @property
  def state(self) -> dict[str, int]:
    return {"seed": self.seed, "epoch": self.epoch, "position": self.position}

  def restore(self, state: Mapping[str, int]) -> None:
    if int(state["seed"]) != self.seed:
      raise DataError(f"data iterator state has seed {state['seed']} but train.seed is "
                      f"{self.seed}; resume with the seed the run started with")
    self.epoch, self.position = int(state["epoch"]), int(state["position"])

  def rows(self, epoch: int) -> list[list[int]]:
    """The packed rows of an epoch (cached for the current one)."""
    if self._plan is None or self._plan[0] != epoch:
      order = epoch_order(self.examples, self.weights, self.seed, epoch)
      self._plan = (epoch, pack(self._lengths, order, self.seq_len, self.packing))
    return self._plan[1]

  def batches_in_epoch(self, epoch: int) -> int:
    return math.ceil(len(self.rows(epoch)) / self.batch_size)

  def next(self, rows: Sequence[int] | None = None) -> Batch:
    """The next batch (or the given rows of it); advances the state."""
    plan = self.rows(self.epoch)
    first = self.position * self.batch_size
    picked = range(self.batch_size) if rows is None else rows
    batch = self._build([plan[first + r] if first + r < len(plan) else [] for r in picked])
    self.position += 1
    if self.position >= self.batches_in_epoch(self.epoch):
      self.epoch, self.position = self.epoch + 1, 0
    return batch

  def _build(self, rows: Sequence[Sequence[int]]) -> Batch:
    shape = (len(rows), self.seq_len)
    out = Batch(*(np.zeros(shape, np.int32) for _ in range(5)))
    for r, row in enumerate(rows):
      at = 0
      for seg, i in enumerate(row, 1):
        ids = self.examples.tokens[i]
        n = len(ids) - 1
        sl = slice(at, at + n)
        out.inputs[r, sl] = ids[:-1]
        out.targets[r, sl] = ids[1:]
        # Position j predicts token j + 1: a target token when j + 1 >= prompt_len.
        out.loss_mask[r, sl] = np.arange(1, n + 1) >= self.examples.prompt_len[i]
        out.segment_ids[r, sl] = seg
        out.positions[r, sl] = np.arange(n)
        at += n
    return out
