"""The same forward on an 8-device mesh equals the unsharded one, with params really sharded."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from stt_jax import sharding
from stt_jax.models import load_hf
from tests import hf_tiny


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
  # 4 heads / 2 kv heads / mlp 96 / vocab 256 all divide tensor=2.
  return hf_tiny.tmp_model(tmp_path_factory, "qwen2")


def test_eight_devices_available():
  assert jax.device_count() == 8, "tests/conftest.py must force 8 host devices"


@pytest.mark.parametrize("shape", [{"data": 2, "fsdp": 2, "tensor": 2}, {"fsdp": 8},
                                   {"data": 1, "fsdp": 2, "tensor": 4}])
def test_sharded_forward_equals_unsharded(folder, shape):
  rng = np.random.default_rng(0)
  ids, mask = hf_tiny.random_batch(rng, [9, 16, 5, 12, 16, 3, 7, 10], pad_left=True)
  ref_model, _ = load_hf(folder)
  ref = np.asarray(ref_model(jnp.asarray(ids), jnp.asarray(mask)))

  mesh = sharding.make_mesh(shape)
  model, _ = load_hf(folder, mesh=mesh)
  state = nnx.state(model, nnx.Param)
  specs = {".".join(map(str, k)): v.get_value().sharding.spec
           for k, v in nnx.to_flat_state(state)}
  q = specs["model.layers.self_attn.q_proj.kernel"]  # Stacked: [layers, embed, heads].
  assert len(q) == 0 or q[0] is None, specs  # The layers dim is never split.
  if mesh.shape["tensor"] > 1:
    assert q[2] == "tensor", specs
  if mesh.shape["fsdp"] > 1:
    assert q[1] == "fsdp", specs
    assert specs["model.embed_tokens.embedding"][1] == "fsdp"
  # Each device holds only its shard of the kernel.
  kernel = model.model.layers.self_attn.q_proj.kernel.get_value()
  shard = kernel.addressable_shards[0].data.shape
  assert np.prod(shard) * mesh.shape["fsdp"] * mesh.shape["tensor"] == np.prod(kernel.shape)

  @nnx.jit
  def forward(m, ids, mask):
    return m(ids, mask)

  batch = sharding.named_sharding(mesh, ("batch", None), ids.shape)
  got = forward(model, jax.device_put(jnp.asarray(ids), batch),
                jax.device_put(jnp.asarray(mask), batch))
  np.testing.assert_allclose(np.asarray(got), ref, atol=2e-5, rtol=0)


def test_logical_rules_resolution():
  mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  P = jax.sharding.PartitionSpec
  assert sharding.logical_to_spec(("embed", "heads"), (64, 64), mesh) == P("fsdp", "tensor")
  assert sharding.logical_to_spec(("batch", "length"), (8, 3), mesh) == P(("data", "fsdp"), None)
  # A dimension the mesh axis does not divide is replicated instead of failing.
  assert sharding.logical_to_spec(("embed", "kv_heads"), (64, 3), mesh) == P("fsdp", None)
  assert sharding.logical_to_spec(("batch",), (2,), mesh) == P("data")
  with pytest.raises(sharding.ShardingError, match="unknown logical axis 'embd'"):
    sharding.logical_to_spec(("embd",))


def test_make_mesh_errors():
  assert sharding.make_mesh({"data": -1, "tensor": 2}).shape["data"] == 4
  with pytest.raises(sharding.ShardingError, match="needs 12 devices but 8"):
    sharding.make_mesh({"data": 3, "tensor": 4})
  with pytest.raises(sharding.ShardingError, match="unknown axis 'model'"):
    sharding.make_mesh({"model": 8})
  with pytest.raises(sharding.ShardingError, match="not divisible"):
    sharding.make_mesh({"data": -1, "tensor": 3})
