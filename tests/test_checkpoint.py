"""Checkpoints: unfinished and corrupt saves are skipped, a state saved on 8 devices restores on
4 and on 1, the weights-only restore follows the same error policy, and a NaN loss stops
training with the last good checkpoint intact."""

import glob
import logging
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from stt_jax import checkpoint, sharding, train, train_data
from stt_jax.tasks import get_task
from tests import hf_tiny
from tests.test_train_helpers import ByteTokenizer, math_rows, small_config

TASK = get_task("mgsm")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
  return hf_tiny.tmp_model(tmp_path_factory, "llama_gqa")


def _state(value):
  return {"params": {"w": jnp.full((16, 16), float(value))}, "step": jnp.int32(value)}


def test_unfinished_and_corrupt_checkpoints_are_skipped(tmp_path, caplog):
  directory = str(tmp_path / "checkpoints")
  ckpts = checkpoint.Checkpoints(directory, every=2, keep=5, async_save=True)
  assert not ckpts.save(1, _state(1), {"n": 1})  # Not due.
  for step in (2, 4):
    assert ckpts.save(step, _state(step), {"n": step})
  ckpts.wait()
  ckpts.close()
  # A process killed mid-save leaves only Orbax's tmp folder; a damaged disk leaves a
  # finalised step whose data files are cut short.
  shutil.copytree(os.path.join(directory, "2"), os.path.join(
      directory, "6.orbax-checkpoint-tmp-1234"))
  for f in glob.glob(os.path.join(directory, "4", "state", "**", "d", "*"), recursive=True):
    with open(f, "r+b") as fh:
      fh.truncate(8)
  abstract = jax.eval_shape(lambda: _state(0))
  # A reader beside a running trainer (evaluation) skips the bad step but changes nothing.
  reader = checkpoint.Checkpoints(directory, read_only=True)
  assert reader.restore(abstract)[0] == 2
  step, params = reader.restore_params(abstract["params"])  # Weights only: the same choice.
  assert step == 2 and float(params["w"][0, 0]) == 2.0
  with pytest.raises(checkpoint.CheckpointError, match="step 4"):  # Asked for: an error.
    reader.restore_params(abstract["params"], step=4)
  reader.close()
  assert sorted(os.listdir(directory)) == ["2", "4", "6.orbax-checkpoint-tmp-1234"]
  with caplog.at_level(logging.WARNING):
    ckpts = checkpoint.Checkpoints(directory, every=2, keep=5)
    assert ckpts.steps() == [2, 4]
    step, state, meta = ckpts.restore(abstract)
  assert step == 2 and meta == {"n": 2} and int(state["step"]) == 2
  assert float(state["params"]["w"][0, 0]) == 2.0
  assert "unfinished save" in caplog.text and "step 4" in caplog.text
  assert os.listdir(directory + ".corrupt")  # Moved aside, not deleted ...
  assert ckpts.save(4, _state(4), {"n": 4})  # ... so step 4 can be written again.
  ckpts.wait()
  assert ckpts.restore(abstract)[0] == 4
  assert not any("tmp" in d for d in os.listdir(directory)), "tmp folders cleaned"
  ckpts.close()


def _lora_state(rank):
  return {"params": {"q_proj": {"lora_a": jnp.ones((16, rank)), "lora_b": jnp.ones((rank, 16))}},
          "step": jnp.int32(2)}


def _saved(directory, rank=8):
  ckpts = checkpoint.Checkpoints(directory, async_save=False)
  ckpts.save(2, _lora_state(rank), {"train": {"lr": 1e-4, "lora": {"rank": rank}}}, force=True)
  ckpts.close()
  return checkpoint.Checkpoints(directory)


def test_a_changed_config_is_one_line_naming_the_key_and_nothing_moves(tmp_path):
  directory = str(tmp_path / "checkpoints")
  ckpts = _saved(directory, rank=8)
  abstract = jax.eval_shape(lambda: _lora_state(4))
  with pytest.raises(checkpoint.CheckpointMismatchError) as e:
    ckpts.restore(abstract, settings={"train": {"lr": 1e-4, "lora": {"rank": 4}}})
  msg = str(e.value)
  assert "\n" not in msg and "train.lora.rank=8 (now 4)" in msg and "new --workdir" in msg
  assert "train.lr" not in msg  # Only what changed.
  assert os.listdir(directory) == ["2"] and not os.path.exists(directory + ".corrupt")
  # Without the saved settings the error still names the array that does not fit.
  with pytest.raises(checkpoint.CheckpointMismatchError, match="do not fit"):
    ckpts.restore(jax.eval_shape(lambda: {"params": {}, "step": jnp.int32(0)}))
  assert ckpts.restore(jax.eval_shape(lambda: _lora_state(8)))[0] == 2  # Old value: fine.
  # The weights-only restore says the same, and a parameter that was never saved (another
  # method or target list) is a mismatch too, not a silently unset weight.
  with pytest.raises(checkpoint.CheckpointMismatchError, match=r"train.lora.rank=8 \(now 4\)"):
    ckpts.restore_params(jax.eval_shape(lambda: _lora_state(4))["params"],
                         settings={"train": {"lr": 1e-4, "lora": {"rank": 4}}})
  extra = jax.eval_shape(lambda: {**_lora_state(8)["params"], "k_proj": jnp.ones((16, 16))})
  with pytest.raises(checkpoint.CheckpointMismatchError, match="not in the saved state"):
    ckpts.restore_params(extra)
  assert os.listdir(directory) == ["2"] and not os.path.exists(directory + ".corrupt")
  ckpts.close()


@pytest.mark.parametrize("weights_only", [False, True])
def test_a_read_error_is_retried_once_then_raised_and_nothing_moves(tmp_path, monkeypatch,
                                                                   weights_only):
  import errno  # pylint: disable=g-import-not-at-top
  directory = str(tmp_path / "checkpoints")
  ckpts = _saved(directory)
  abstract = jax.eval_shape(lambda: _lora_state(8))
  restore = ckpts.restore
  if weights_only:
    abstract, restore = abstract["params"], ckpts.restore_params
  real, calls = ckpts._manager.restore, []  # pylint: disable=protected-access

  def flaky(*args, fail_times, **kwargs):
    calls.append(1)
    if len(calls) <= fail_times:
      raise OSError(errno.EIO, "Input/output error")
    return real(*args, **kwargs)

  monkeypatch.setattr(ckpts._manager, "restore", lambda *a, **k: flaky(*a, fail_times=1, **k))  # pylint: disable=protected-access
  assert restore(abstract)[0] == 2 and len(calls) == 2  # Transient: the retry reads it.
  calls.clear()
  monkeypatch.setattr(ckpts._manager, "restore", lambda *a, **k: flaky(*a, fail_times=9, **k))  # pylint: disable=protected-access
  with pytest.raises(checkpoint.CheckpointIOError, match="failed twice"):
    restore(abstract)
  assert len(calls) == 2
  assert os.listdir(directory) == ["2"] and not os.path.exists(directory + ".corrupt")
  ckpts.close()


@pytest.mark.parametrize("message,kind", [
    ("UNAVAILABLE: Error reading gs://bucket/ckpt/2/state: connection reset", "io"),
    ("UNKNOWN: Error reading local file [os_error_code='5']", "io"),
    ("OUT_OF_RANGE: Requested byte range [0, 253) is not valid for value of size 126", "corrupt"),
    ("NOT_FOUND: Error reading \"step/.zarray\"", "corrupt"),
    ("Requested shape: (4, 4) is not compatible with the stored shape: (4, 8).", "mismatch"),
])
def test_error_kinds_of_tensorstore_and_orbax_messages(message, kind):
  assert checkpoint.error_kind(ValueError(message)) == kind


def test_checkpoint_from_8_devices_restores_on_4_and_1(folder, tmp_path):
  config = small_config()
  examples = train_data.tokenize(TASK, {"en": math_rows(24)}, ByteTokenizer(), 64)
  data = train_data.BatchIterator(examples, batch_size=8, seq_len=64, packing=True,
                                  weights={}, seed=0)
  batches = [data.next() for _ in range(3)]

  def trainer_on(shape, n):
    mesh = sharding.make_mesh(shape, jax.devices()[:n])
    return train.Trainer(train._prepare_model(folder, config.train, mesh), config.train, mesh,
                         total_steps=8)

  big = trainer_on({"data": 2, "fsdp": 2, "tensor": 2}, 8)
  state = big.init_state()
  for b in batches[:2]:
    state, _ = big.step(state, big.device_batch(b))
  ckpts = checkpoint.Checkpoints(tmp_path / "ckpt", every=2, keep=1)
  ckpts.save(2, state.as_dict(), {"data": data.state})
  ckpts.wait()
  saved = jax.device_get(state)
  _, metrics = big.step(state, big.device_batch(batches[2]))
  want = float(metrics["loss"])
  for shape, n in (({"fsdp": 2, "tensor": 2}, 4), ({"fsdp": 1}, 1)):
    small = trainer_on(shape, n)
    step, restored, meta = small.restore(ckpts)
    assert step == 2 and meta["data"] == data.state
    kernel = restored.params["model"]["layers"]["mlp"]["up_proj"]["kernel"]  # Stacked layers.
    assert len(kernel.sharding.device_set) == n
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(restored), saved)
    _, metrics = small.step(restored, small.device_batch(batches[2]))
    np.testing.assert_allclose(float(metrics["loss"]), want, rtol=1e-5)
  ckpts.close()


def test_nan_loss_stops_and_keeps_last_good_checkpoint(folder, tmp_path):
  config = small_config(lr=1e30, warmup_steps=2, steps=8)
  config.checkpoint.every = 1
  mesh = sharding.make_mesh({"fsdp": 1}, jax.devices()[:1])
  with pytest.raises(train.NonFiniteLossError, match=r"non-finite .* at step (\d+).*Last good "
                     r"checkpoint: step (\d+)") as err:
    train.train(folder, ByteTokenizer(), TASK, {"en": math_rows(24)}, config, tmp_path, mesh)
  import re  # pylint: disable=g-import-not-at-top
  bad, good = map(int, re.search(r"at step (\d+).*step (\d+) in", str(err.value)).groups())
  assert good == bad - 1 >= 1
  ckpts = checkpoint.Checkpoints(tmp_path / "checkpoints", every=1, keep=0)
  assert ckpts.latest_step() == good
  trainer = train.Trainer(train._prepare_model(folder, config.train, mesh), config.train, mesh,
                          total_steps=8)
  _, state, _ = trainer.restore(ckpts)
  assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(state.params))
  ckpts.close()
