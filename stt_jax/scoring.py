"""Scores one model on one task × language: generation or label log-likelihood, with CIs.

Used by the eval loop (evaluate.py) for every checkpoint and for the base model. Per-example
scores give a bootstrap 95% confidence interval, which the report prints next to each number
(small test sets are the norm on CPU).
"""

from __future__ import annotations

import functools
import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from stt_jax import decode, sharding
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


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _continuation_logprob(graphdef, state, ids, mask, target_mask):
  """Sum of log p(token) over positions where target_mask is set (next-token aligned)."""
  model = nnx.merge(graphdef, state)
  logits = model(ids, mask)[:, :-1]
  logp = jax.nn.log_softmax(logits, axis=-1)
  tok = jnp.take_along_axis(logp, ids[:, 1:, None], axis=-1)[..., 0]
  return jnp.sum(jnp.where(target_mask[:, 1:], tok, 0.0), axis=-1)


def loglik_fn(model, tokenizer, batch_size: int = 8, mesh=None):
  """A `score_fn(prompts, continuations) -> log-likelihoods` over a JAX model.

  Prompt and continuation are tokenized separately and concatenated, so the continuation's
  tokens are the same for every prompt (as in lm-evaluation-harness). Right padding into
  power-of-two lengths keeps compilations few.
  """
  graphdef, state = nnx.split(model)
  mesh = mesh if mesh is not None else model.mesh

  def score(prompts: Sequence[str], continuations: Sequence[str]) -> list[float]:
    out = []
    for k in range(0, len(prompts), batch_size):
      pairs = [(tokenizer.encode(p), tokenizer.encode(c, add_special_tokens=False))
               for p, c in zip(prompts[k:k + batch_size], continuations[k:k + batch_size])]
      width = decode._bucket(max(len(p) + len(c) for p, c in pairs))  # pylint: disable=protected-access
      rows = batch_size
      ids = np.zeros((rows, width), np.int32)
      mask = np.zeros((rows, width), np.bool_)
      target = np.zeros((rows, width), np.bool_)
      for r, (p, c) in enumerate(pairs):
        ids[r, :len(p) + len(c)] = p + c
        mask[r, :len(p) + len(c)] = True
        target[r, len(p):len(p) + len(c)] = True
      arrays = [jnp.asarray(a) for a in (ids, mask, target)]
      if mesh is not None:
        spec = sharding.named_sharding(mesh, ("batch", None), ids.shape)
        arrays = [jax.device_put(a, spec) for a in arrays]
      out += np.asarray(_continuation_logprob(graphdef, state, *arrays))[:len(pairs)].tolist()
    return out

  return score


def score_split(model, tokenizer, task: Task, rows: Sequence[dict], lang: str, *,
                method: str = "generate", batch_size: int = 8, max_new_tokens: int = 256,
                mesh=None, desc: str = "eval") -> dict:
  """Metrics of `model` on `rows`: {metrics: {name: (value, lo, hi)}, n, seconds, predictions}.

  method: 'generate' (greedy, stop at the task's stop sequences, extract the answer) or
  'loglik' (rank the task's label words; XNLI).
  """
  start = time.perf_counter()
  if method == "loglik":
    if not hasattr(task, "rank_labels"):
      raise ValueError(f"eval.method='loglik' needs a task with label words; {task.name} has "
                       "none (use 'generate')")
    predictions = task.rank_labels(rows, loglik_fn(model, tokenizer, batch_size, mesh))
  elif method == "generate":
    prompts = [task.format_prompt(r) for r in rows]
    predictions = [""] * len(rows)
    for i, text in decode.generate_stream(
        model, tokenizer, prompts, max_new_tokens=max_new_tokens,
        stop=task.stop_sequences, batch_size=batch_size, mesh=mesh, desc=desc):
      predictions[i] = text
  else:
    raise ValueError(f"eval.method={method!r}; use 'generate' or 'loglik'")
  per_example = [task.example_scores(p, r) for p, r in zip(predictions, rows)]
  result = {}
  for name in task.metric_names:
    values = [s[name] for s in per_example]
    lo, hi = bootstrap_ci(values)
    result[name] = (float(np.mean(values)) if values else float("nan"), lo, hi)
  return {"metrics": result, "n": len(rows), "seconds": time.perf_counter() - start,
          "predictions": predictions}
