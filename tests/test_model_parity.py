"""Logits of every supported architecture/feature equal transformers' (fp32, tiny random)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from stt_jax.models import load_hf
from tests import hf_tiny

TOL = 1e-4


@pytest.fixture(scope="module", params=sorted(hf_tiny.TINY))
def tiny(request, tmp_path_factory):
  return request.param, hf_tiny.tmp_model(tmp_path_factory, request.param)


@pytest.mark.parametrize("pad_left", [True, False])
def test_logits_match_transformers(tiny, pad_left):
  kind, folder = tiny
  rng = np.random.default_rng(1)
  ids, mask = hf_tiny.random_batch(rng, [19, 7, 12], pad_left)
  expected = hf_tiny.hf_logits(folder, ids, mask)
  model, _ = load_hf(folder)
  got = np.asarray(model(jnp.asarray(ids), jnp.asarray(mask)))
  real = mask.astype(bool)
  diff = np.abs(got - expected)[real].max()
  assert diff <= TOL, f"{kind}: max abs logit diff {diff:.2e}"


def test_padded_rows_equal_single_sequences(tiny):
  _, folder = tiny
  model, _ = load_hf(folder)
  rng = np.random.default_rng(2)
  lengths = [11, 4, 8]
  for pad_left in (True, False):
    ids, mask = hf_tiny.random_batch(rng, lengths, pad_left)
    batched = np.asarray(model(jnp.asarray(ids), jnp.asarray(mask)))
    for row, n in enumerate(lengths):
      real = mask[row].astype(bool)
      alone = np.asarray(model(jnp.asarray(ids[row:row + 1, real])))[0]
      np.testing.assert_allclose(batched[row, real], alone, atol=TOL, rtol=0)
