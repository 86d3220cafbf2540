"""Text generation for the pipeline: strings in, completions out, over the continuous-batching
`stt_jax.engine.Engine` (translation and eval generation both come through here).

Completions exclude the prompt, a final EOS and anything from a stop string on. Every prompt
may have its own token budget (`max_new_tokens` as a list).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence

from stt_jax import decode
from stt_jax.decode import Sampling, StopCriteria
from stt_jax.engine import Engine
from stt_jax.models.decoder import CausalLM


@dataclasses.dataclass(frozen=True)
class Completion:
  """One generation: `stopped` is False when the row used its whole token budget without EOS
  or a stop (a stop on the last allowed token counts as stopped)."""

  text: str          # decoded, without the prompt, EOS and anything from a stop string on
  num_tokens: int    # generated tokens, the final EOS/stop token included
  stopped: bool


def generate_stream(model: CausalLM, tokenizer, prompts: Sequence[str], *,
                    max_new_tokens: int | Sequence[int] = 64, stop: Sequence[str] = ("\n",),
                    temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
                    seed: int = 0, batch_size: int = 8, mesh=None, truncate: str = "error",
                    add_special_tokens: bool = True, progress: bool = True,
                    engine: Engine | None = None, desc: str = "decode",
                    details: bool = False, kv_dtype=None
                    ) -> Iterator[tuple[int, str | Completion]]:
  """Yields (prompt index, completion text) as generations finish (any order), with a tqdm
  bar (items/s, tokens/s, slot use, ETA). `batch_size` is the number of slots when no
  `engine` is given, `kv_dtype` its KV cache's dtype (default the model's compute dtype).
  details=True yields (prompt index, Completion): also the generated token count and whether
  the row stopped (False = it used its whole budget: truncated)."""
  engine = engine or Engine(model, slots=batch_size, mesh=mesh, kv_dtype=kv_dtype)
  ids = [tokenizer.encode(p, add_special_tokens=add_special_tokens) for p in prompts]
  criteria = decode.stop_criteria(tokenizer, model.config, stop)
  sampling = Sampling(temperature, top_k, top_p, seed)
  for i, out, stopped in engine.generate(ids, max_new_tokens, criteria, sampling, truncate,
                                         progress=progress, desc=desc):
    count = len(out)
    if out and out[-1] in criteria.eos_ids:
      out = out[:-1]
    text = decode.trim_text(tokenizer.decode(out, skip_special_tokens=True,
                                             clean_up_tokenization_spaces=False), stop)
    yield i, (Completion(text, count, stopped) if details else text)


def generate(model: CausalLM, tokenizer, prompts: Sequence[str],
             max_new_tokens: int | Sequence[int] = 64, stop: Sequence[str] = ("\n",),
             temperature: float = 0.0, batch_size: int = 8, mesh=None,
             **kwargs) -> list[str] | list[Completion]:
  """Completions for `prompts`, in order (Completion objects with details=True). See
  `generate_stream` for the options."""
  kwargs.setdefault("progress", False)
  out: list = [""] * len(prompts)
  for i, text in generate_stream(model, tokenizer, prompts, max_new_tokens=max_new_tokens,
                                 stop=stop, temperature=temperature, batch_size=batch_size,
                                 mesh=mesh, **kwargs):
    out[i] = text
  return out


def generate_tokens(model: CausalLM, prompts: Sequence[Sequence[int]],
                    max_new_tokens: int | Sequence[int] = 64,
                    eos_ids: Sequence[int] | None = None, stop_token_ids: Sequence[int] = (),
                    stop_sequences: Sequence[Sequence[int]] = (), temperature: float = 0.0,
                    top_k: int = 0, top_p: float = 1.0, seed: int = 0, batch_size: int = 8,
                    mesh=None, truncate: str = "error", engine: Engine | None = None,
                    kv_dtype=None) -> list[list[int]]:
  """Token-level variant: generated ids per prompt, in order (a final EOS/stop token kept)."""
  eos_ids = model.config.eos_token_id if eos_ids is None else eos_ids
  criteria = StopCriteria.build(model.config.vocab_size, eos_ids, stop_token_ids, stop_sequences)
  engine = engine or Engine(model, slots=batch_size, mesh=mesh, kv_dtype=kv_dtype)
  out: list[list[int]] = [[] for _ in prompts]
  for i, ids, _ in engine.generate(prompts, max_new_tokens, criteria,
                                   Sampling(temperature, top_k, top_p, seed), truncate):
    out[i] = ids
  return out
