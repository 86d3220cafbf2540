"""The train state's layout is a pure function of (model folder, config, mesh): two builds give
the same abstract state and shardings (so compiled steps and restore targets are reusable), eval
restores exactly the train state's params, and it needs nothing else from the checkpoint: no
optimizer is built and no optimizer state has to exist on disk."""

from __future__ import annotations

import hashlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import tensorstore as ts

from stt_jax import checkpoint, sharding, train
from stt_jax.models import lora
from tests import hf_tiny
from tests.test_train_helpers import ByteTokenizer, math_rows, small_config

METHODS = ("full", "lora")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
  return hf_tiny.tmp_model(tmp_path_factory, "llama_gqa")


def _config(method, **overrides):
  return small_config(method=method, **{"lora.rank": 4}, **overrides)


def _trainer(folder, config, mesh):
  return train.Trainer(train._prepare_model(folder, config.train, mesh), config.train, mesh,
                       total_steps=8)


def _digest(tree) -> str:
  return hashlib.sha256(repr(tree).encode()).hexdigest()


def _assert_same_tree(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  assert jax.tree.leaves(a) == jax.tree.leaves(b)
  assert _digest(a) == _digest(b)


@pytest.mark.parametrize("method", METHODS)
def test_two_trainer_builds_have_the_same_abstract_state_and_shardings(folder, method):
  config = _config(method)
  mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  a, b = _trainer(folder, config, mesh), _trainer(folder, config, mesh)
  assert isinstance(a.abstract_state(), train.TrainState)
  _assert_same_tree((a.abstract_state(), a.state_sharding), (b.abstract_state(), b.state_sharding))
  _assert_same_tree(a.frozen_sharding, b.frozen_sharding)
  assert a.graphdef == b.graphdef and hash(a.graphdef) == hash(b.graphdef)
  # The shardings are in the digest: the same build on another mesh differs.
  other = _trainer(folder, config, sharding.make_mesh({"fsdp": 8}))
  assert jax.tree.structure(other.abstract_state()) == jax.tree.structure(a.abstract_state())
  assert _digest((other.abstract_state(), other.state_sharding)) != _digest(
      (a.abstract_state(), a.state_sharding))
  # Every optimizer moment has its parameter's sharding; step and rng are replicated.
  mu = a.abstract_state().opt_state[1][0].mu
  assert jax.tree.leaves(jax.tree.map(lambda x: x.sharding, mu)) == jax.tree.leaves(
      a.state_sharding.params)
  assert a.state_sharding.step.spec == a.state_sharding.rng.spec == jax.sharding.PartitionSpec()


@pytest.mark.parametrize("method", METHODS)
def test_the_weights_only_target_is_stable_and_is_the_train_states_params(folder, method):
  config = _config(method)
  mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  g1, target1, frozen1 = train.weights_target(folder, config.train, mesh)
  g2, target2, frozen2 = train.weights_target(folder, config.train, mesh)
  _assert_same_tree(target1, target2)
  assert g1 == g2 and hash(g1) == hash(g2)
  assert jax.tree.structure(frozen1) == jax.tree.structure(frozen2)
  trainer = _trainer(folder, config, mesh)
  _assert_same_tree(target1, trainer.abstract_state().params)
  _assert_same_tree(jax.tree.map(lambda x: x.sharding, frozen1), trainer.frozen_sharding)
  assert g1 == trainer.graphdef
  # Nothing but trainable weights: LoRA adapters alone, or every parameter.
  names = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(target1)[0]]
  assert all(n.endswith(("['lora_a']", "['lora_b']")) for n in names) == (method == "lora")


def _forbidden(*args, **kwargs):
  raise AssertionError("evaluation must not build an optimizer, a Trainer or read the full state")


@pytest.mark.parametrize("method", METHODS)
def test_eval_loads_a_checkpoint_whose_optimizer_state_was_deleted(folder, tmp_path,
                                                                  monkeypatch, method):
  config = _config(method, steps=2, lr=1e-2)
  mesh = sharding.make_mesh({"fsdp": 2}, jax.devices()[:2])
  run = tmp_path / "run"
  result = train.train(folder, ByteTokenizer(), "mgsm", {"en": math_rows(16)}, config, run,
                       mesh)
  ids, mask = (jnp.asarray(x) for x in hf_tiny.random_batch(
      np.random.default_rng(0), [12, 7, 12], pad_left=False))
  want = np.asarray(result.model(ids, mask))

  # The on-disk format is the dict {step, params, opt_state, rng} (an OCDBT key per array
  # chunk); drop every optimizer-state key from it.
  kv = ts.KvStore.open({"driver": "ocdbt",
                        "base": f"file://{run / 'checkpoints' / '2' / 'state'}/"}).result()
  assert {k.split(b"/")[0].split(b".")[0] for k in kv.list().result()} == {
      b"step", b"params", b"opt_state", b"rng"}
  kv.delete_range(ts.KvStore.KeyRange(inclusive_min=b"opt_state.",
                                      exclusive_max=b"opt_state/")).result()
  assert not [k for k in kv.list().result() if k.startswith(b"opt_state")]
  del kv
  # It is really gone: restoring the whole train state (what resuming does) fails now.
  reader = checkpoint.Checkpoints(run / "checkpoints", read_only=True)
  with pytest.raises(checkpoint.CheckpointError, match="step 2"):
    _trainer(folder, config, mesh).restore(reader, step=2)
  reader.close()

  for name in ("Trainer", "make_optimizer"):
    monkeypatch.setattr(train, name, _forbidden)
  monkeypatch.setattr(optax, "adamw", _forbidden)
  monkeypatch.setattr(checkpoint.Checkpoints, "restore", _forbidden)
  loaded, step = train.load_trained(folder, run, config, mesh)
  assert step == 2 and lora.has_lora(loaded) == (method == "lora")
  np.testing.assert_array_equal(np.asarray(loaded(ids, mask)), want)
