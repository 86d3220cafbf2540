"""Scores one model on one task × language: generation or label log-likelihood, with CIs.

Used by the eval loop (evaluate.py) for every checkpoint and for the base model. Per-example
scores give a bootstrap 95% confidence interval, which the report prints next to each number
(small test sets are the norm on CPU). Two models scored on the same items are compared by a
paired bootstrap of the difference and McNemar's exact test (paired_bootstrap, mcnemar).
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from stt_jax import decode, generation, sharding, train_data
from stt_jax.models.decoder import KVCache, positions_from_mask
from stt_jax.tasks import Task


def bootstrap_ci(values: Sequence[float], n_boot: int = 1000, seed: int = 0,
                 level: float = 0.95) -> tuple[float, float]:
  """Percentile bootstrap interval of the mean."""
  v = np.asarray(values, np.float64)
  if v.size == 0:
    return float("nan"), float("nan")
  rng = np.random.default_rng(seed)
  means = v[rng.integers(0, v.size, size=(n_boot, v.size))].mean(axis=1)
  lo, hi = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
  return float(lo), float(hi)


# ------------------------------------------------------------------------------ paired tests


def paired_items(a: Sequence[dict], b: Sequence[dict], metric: str, names=("a", "b")
                 ) -> tuple[np.ndarray, np.ndarray]:
  """Per-item `metric` values of two prediction files' rows ({id, <metric>, ...}), matched by
  id in `a`'s order; ValueError (one line, naming `names`) when they cover different items."""
  by_id = [{r["id"]: r for r in rows} for rows in (a, b)]
  only = [sorted(set(by_id[i]) - set(by_id[1 - i])) for i in (0, 1)]
  if only[0] or only[1] or len(by_id[0]) != len(a) or len(by_id[1]) != len(b):
    side = 0 if only[0] else 1
    example = (f"e.g. {only[side][0]!r} only in {names[side]}" if only[side]
               else "an id appears twice")
    raise ValueError(f"{names[0]} ({len(a)} items) and {names[1]} ({len(b)} items) cover "
                     f"different test items ({example}); score both with the same eval.limit "
                     "and test data")
  missing = [n for n, rows in zip(names, by_id) if any(metric not in r for r in rows.values())]
  if missing:
    raise ValueError(f"{missing[0]} has items without a {metric!r} score; rescore it")
  ids = [r["id"] for r in a]
  return (np.asarray([by_id[0][i][metric] for i in ids], np.float64),
          np.asarray([by_id[1][i][metric] for i in ids], np.float64))


def paired_bootstrap(a: Sequence[float], b: Sequence[float], n_boot: int = 2000,
                     seed: int = 0, level: float = 0.95) -> tuple[float, float, float]:
  """(mean(a) - mean(b), percentile-bootstrap interval) with items resampled jointly: the
  same test items for both models, so item difficulty cancels out of the interval."""
  d = np.asarray(a, np.float64) - np.asarray(b, np.float64)
  if d.size == 0:
    return float("nan"), float("nan"), float("nan")
  rng = np.random.default_rng(seed)
  chunk = max(1, 2 ** 22 // d.size)  # Draws per step: ~32 MiB of indices at a time.
  means = np.concatenate([d[rng.integers(0, d.size, size=(min(chunk, n_boot - k), d.size))]
                          .mean(axis=1) for k in range(0, n_boot, chunk)])
  lo, hi = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
  return float(d.mean()), float(lo), float(hi)


def binary_levels(*arrays: np.ndarray) -> tuple[float, float] | None:
  """(wrong, right) when every item scores one of two values, 0 and 1 (accuracy) or 0 and 100
  (exact match); None for graded scores such as F1."""
  values = set(np.unique(np.concatenate([np.asarray(x, np.float64) for x in arrays])).tolist())
  for top in (1.0, 100.0):
    if values <= {0.0, top}:
      return 0.0, top
  return None


def mcnemar(a: Sequence[float], b: Sequence[float]) -> tuple[float, int, int] | None:
  """McNemar's exact test of paired right/wrong outcomes: (two-sided p, items only `a` got
  right, items only `b` got right), or None when the scores are not binary.

  Under the null a discordant item is equally likely to go either way, so the smaller count of
  n = b + c discordant items is Binomial(n, 1/2); p = min(1, 2 P(X <= min(b, c))), and 1 when
  nothing is discordant. Exact for any n (big-integer arithmetic), so no continuity
  correction or large-sample chi-square is needed.
  """
  levels = binary_levels(a, b)
  if levels is None:
    return None
  right_a = np.asarray(a, np.float64) == levels[1]
  right_b = np.asarray(b, np.float64) == levels[1]
  better, worse = int(np.sum(right_a & ~right_b)), int(np.sum(~right_a & right_b))
  n, k = better + worse, min(better, worse)
  tail = sum(math.comb(n, i) for i in range(k + 1))
  return min(1.0, 2 * tail / 2 ** n), better, worse


@functools.partial(jax.jit, static_argnames=("graphdef", "kv_dtype"))
def _continuation_logprobs(graphdef, state, ids, mask, conts, cont_mask, score_mask, *,
                           kv_dtype):
  """Log-likelihood of each continuation after its prompt, the prompt computed once.

  ids/mask: [B, P] left-padded prompts; conts/cont_mask: [M, B, C] right-padded continuations
  (M per prompt); score_mask: [M, B, C] the continuation tokens that count (a continuation may
  start with prompt tokens, see `loglik_fn`). Returns [M, B] sums of log p(scored token).
  The prompts' KV cache holds keys and values in `kv_dtype`.
  """
  model = nnx.merge(graphdef, state)
  b, p = ids.shape
  c = conts.shape[-1]
  cache = KVCache.zeros(model.config, b, p + c, kv_dtype, model.mesh)
  last, cache = model.forward_cached(ids, mask, positions_from_mask(mask), cache, last_only=True)
  start = jnp.sum(mask, axis=-1, dtype=jnp.int32)[:, None]

  def one(args):
    cont, cm, sm = args
    logits, _ = model.forward_cached(cont, cm, start + jnp.arange(c)[None], cache)
    prev = jnp.concatenate([last, logits[:, :-1]], axis=1)  # logits that predict each token
    logp = jax.nn.log_softmax(prev, axis=-1)
    tok = jnp.take_along_axis(logp, cont[..., None], axis=-1)[..., 0]
    return jnp.sum(jnp.where(sm, tok, 0.0), axis=-1)

  return jax.lax.map(one, (conts, cont_mask, score_mask))


def loglik_fn(model, tokenizer, batch_size: int = 8, mesh=None, kv_dtype=None,
              desc: str | None = None):
  """A `score_fn(prompts, continuations) -> log-likelihoods` over a JAX model.

  Each prompt + continuation is tokenized as one text and the continuation's tokens are those
  after the prompt's (`train_data.joined_tokens`: the tokens training put the loss on, with no
  SentencePiece dummy prefix '▁' before the continuation; a token across the boundary counts
  as continuation). A prompt repeated with several continuations (XNLI's three labels) is run
  once, up to the prompt tokens all its continuations share; each continuation then reads its
  KV cache (in `kv_dtype`, default the model's compute dtype). Prompts are batched longest
  first, so each batch pads to lengths close to its own (a memory shortfall shows in the
  first batch), and padded lengths come in few sizes, so compilations stay few. `desc`: show a
  progress bar (prompts/s, ETA) under that name.
  """
  graphdef, state = nnx.split(model)
  kv_dtype = jnp.dtype(kv_dtype or model.dtype)
  mesh = mesh if mesh is not None else model.mesh

  def prepare(prompt: str, conts: Sequence[str]) -> tuple[list[int], list[tuple]]:
    """(shared prompt ids, per continuation (ids after them, how many of those not scored))."""
    joined = train_data.joined_tokens(tokenizer, [prompt] * len(conts), list(conts))
    shared = min(n for _, n in joined)
    if shared == 0:
      raise ValueError(f"loglik: prompt {prompt[:40]!r} has no token before its continuation "
                       "(tokenizer adds no BOS and merges it into the first token); start "
                       "the prompt with text the continuation cannot merge into")
    return joined[0][0][:shared], [(ids[shared:], n - shared) for ids, n in joined]

  def score(prompts: Sequence[str], continuations: Sequence[str]) -> list[float]:
    groups: dict[str, list[int]] = {}
    for i, p in enumerate(prompts):
      groups.setdefault(p, []).append(i)
    prepared = {p: prepare(p, [continuations[i] for i in idx]) for p, idx in groups.items()}
    unique = sorted(groups, key=lambda p: -len(prepared[p][0]))  # Longest first, stable.
    out = [0.0] * len(prompts)
    bar = tqdm(total=len(unique), desc=desc, unit="prompt", disable=desc is None,
               dynamic_ncols=True)
    for k in range(0, len(unique), batch_size):
      chunk = unique[k:k + batch_size]
      p_ids = [prepared[p][0] for p in chunk]
      c_ids = [prepared[p][1] for p in chunk]
      m = max(len(c) for c in c_ids)
      p_len = decode.bucket_length(max(len(x) for x in p_ids))
      c_len = decode.bucket_length(max(len(x) for c in c_ids for x, _ in c), 4)
      ids, mask = decode.left_pad(p_ids, p_len, rows=batch_size)
      conts = np.zeros((m, batch_size, c_len), np.int32)
      cmask = np.zeros((m, batch_size, c_len), np.bool_)
      smask = np.zeros((m, batch_size, c_len), np.bool_)
      for r, cs in enumerate(c_ids):
        for j, (x, skip) in enumerate(cs):
          conts[j, r, :len(x)] = x
          cmask[j, r, :len(x)] = True
          smask[j, r, skip:len(x)] = True
      args = [jnp.asarray(a) for a in (ids, mask, conts, cmask, smask)]
      if mesh is not None:
        row = sharding.named_sharding(mesh, ("batch", None), ids.shape)
        col = sharding.named_sharding(mesh, (None, "batch", None), conts.shape)
        args = [jax.device_put(a, row if a.ndim == 2 else col) for a in args]
      scores = np.asarray(_continuation_logprobs(graphdef, state, *args, kv_dtype=kv_dtype))
      for r, p in enumerate(chunk):
        for j, i in enumerate(groups[p]):
          out[i] = float(scores[j, r])
      bar.update(len(chunk))
    bar.close()
    return out

  return score


def score_split(model, tokenizer, task: Task, rows: Sequence[dict], lang: str, *,
                method: str = "generate", batch_size: int = 8, max_new_tokens: int = 256,
                mesh=None, desc: str = "eval", lm_eval_compat: bool = False,
                kv_dtype=None) -> dict:
  """Metrics of `model` on `rows`: {metrics: {name: (value, lo, hi)}, n, seconds, predictions,
  stopped, truncated, choices}.

  method: 'generate' (greedy, stop at the task's stop sequences, extract the answer) or
  'loglik' (rank the task's label words; XNLI). stopped[i] is False when generation i used all
  `max_new_tokens` (its answer may be cut off; None for loglik); truncated counts those, so
  a score lowered by a too-small budget shows in the report.
  lm_eval_compat: also the task's `compat_metric_names` (the rules of lm-eval-harness and
  MLQA tables); where they rank continuations (XNLI) that is one more log-likelihood pass,
  and choices[i] is the index it picked (else choices is None). kv_dtype: the KV caches'
  dtype (default the model's compute dtype).
  """
  start = time.perf_counter()
  if method == "loglik":
    if not hasattr(task, "rank_labels"):
      raise ValueError(f"eval.method='loglik' needs a task with label words; {task.name} has "
                       "none (use 'generate')")
    predictions = task.rank_labels(rows, loglik_fn(model, tokenizer, batch_size, mesh,
                                                   kv_dtype=kv_dtype, desc=desc))
    stopped = None
  elif method == "generate":
    prompts = [task.format_prompt(r) for r in rows]
    predictions = [""] * len(rows)
    stopped = [True] * len(rows)
    for i, done in generation.generate_stream(
        model, tokenizer, prompts, max_new_tokens=max_new_tokens,
        stop=task.stop_sequences, batch_size=batch_size, mesh=mesh, desc=desc, details=True,
        kv_dtype=kv_dtype):
      predictions[i], stopped[i] = done.text, done.stopped
  else:
    raise ValueError(f"eval.method={method!r}; use 'generate' or 'loglik'")
  choices = None
  names = task.metric_names
  if lm_eval_compat:
    # Built on first use: only tasks whose compat metrics rank continuations need it.
    score_fn = lambda p, c: loglik_fn(model, tokenizer, batch_size, mesh, kv_dtype=kv_dtype,
                                      desc=f"{desc} (lm-eval rules)")(p, c)
    choices = task.rank_compat_choices(rows, score_fn)
    names += task.compat_metric_names
  per_example = example_scores(task, predictions, rows, choices, lm_eval_compat)
  result = {}
  for name in names:
    values = [s[name] for s in per_example]
    lo, hi = bootstrap_ci(values)
    result[name] = (float(np.mean(values)) if values else float("nan"), lo, hi)
  return {"metrics": result, "n": len(rows), "seconds": time.perf_counter() - start,
          "predictions": predictions, "stopped": stopped,
          "truncated": 0 if stopped is None else stopped.count(False), "choices": choices}


def example_scores(task: Task, predictions: Sequence[str], rows: Sequence[dict],
                   choices: Sequence[int] | None, lm_eval_compat: bool) -> list[dict]:
  """Per row: our metrics, plus the compat ones (given the ranked choice, if any)."""
  choices = choices if choices is not None else [None] * len(rows)
  return [{**task.example_scores(p, r), **(task.compat_scores(p, r, c) if lm_eval_compat
                                           else {})}
          for p, r, c in zip(predictions, rows, choices)]
