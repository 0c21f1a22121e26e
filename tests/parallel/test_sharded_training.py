"""Sharded training on 8 virtual CPU devices equals training on one device, mesh by mesh."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P
from sharded_testing import CONFIGS, ENCODER_DECODER, MESHES, save_and_restore, train, train_like_one_device, train_step

from t5lite.sharding import Partitioner
from t5lite.train import optimizers
from t5lite.train.step import TrainState


@pytest.mark.parametrize("mesh", MESHES)
@pytest.mark.parametrize("kind", CONFIGS)
def test_sharded_training_matches_one_device(kind, mesh):
    train_like_one_device(kind, MESHES[mesh])


def test_parameters_are_placed_as_the_rules_say():
    _, state = train(ENCODER_DECODER, MESHES["fsdp4_tensor2"])
    params = state.params
    expected = {  # [layers, ...] leading axis of the scanned stacks stays whole
        ("token_embedder", "embedding"): P("tensor", "fsdp"),  # vocab, embed
        ("encoder", "layers", "attention", "query", "kernel"): P(None, "fsdp", "tensor", None),  # embed, heads, kv
        ("encoder", "layers", "attention", "out", "kernel"): P(None, "tensor", None, "fsdp"),  # heads, kv, embed
        ("encoder", "layers", "mlp", "wi_0", "kernel"): P(None, "fsdp", "tensor"),  # embed, mlp
        ("decoder", "layers", "mlp", "wo", "kernel"): P(None, "tensor", "fsdp"),  # mlp, embed
        ("decoder", "logits_dense", "kernel"): P("fsdp", "tensor"),  # embed, vocab
        ("encoder", "positions", "relpos_bias", "rel_embedding"): P("tensor", None),  # heads, buckets
    }
    for path, spec in expected.items():
        leaf = functools.reduce(lambda tree, key: tree[key], path, params)
        assert leaf.sharding.spec == spec, (path, leaf.sharding.spec)
    query = params["encoder"]["layers"]["attention"]["query"]["kernel"]  # [2, 32, 4, 8]
    assert leaf_shard_shape(query) == (2, 8, 2, 8)


def test_factored_optimizer_statistics_follow_their_parameter():
    """Adafactor factors a stacked kernel [layers, embed, mlp]: its row statistic averages the mlp
    axis away and keeps the mesh axes of the others, the column statistic likewise."""
    partitioner = Partitioner.create(ENCODER_DECODER, MESHES["fsdp4_tensor2"])
    params = {"kernel": jax.ShapeDtypeStruct((2, 256, 512), jnp.float32)}
    axes = ("layers", "embed", "mlp")
    shardings = {"kernel": partitioner.sharding(axes)}
    tx = optimizers.optimizer(learning_rate=1e-3, param_axes={"kernel": axes})
    abstract = TrainState(
        step=jax.ShapeDtypeStruct((), jnp.int32), params=params, opt_state=jax.eval_shape(tx.init, params)
    )
    placed = partitioner.state(abstract, shardings)
    assert placed.params["kernel"].spec == P(None, "fsdp", "tensor")
    specs = {
        jax.tree_util.keystr(path): sharding.spec
        for path, sharding in jax.tree_util.tree_leaves_with_path(placed.opt_state)
    }
    assert specs == {
        ".count": P(),
        ".v_row['kernel']": P(None, "fsdp", None),
        ".v_col['kernel']": P(None, None, "tensor"),
        ".v['kernel']": P(),
    }


def leaf_shard_shape(array):
    return array.addressable_shards[0].data.shape


def test_checkpoint_restores_under_another_mesh(tmp_path):
    _, state = train(ENCODER_DECODER, MESHES["fsdp8"])
    target = train_step(ENCODER_DECODER, MESHES["data2_tensor4"], num_microbatches=1, z_loss=0.0)
    (restored,) = save_and_restore(tmp_path, state, [target])
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(restored), jax.device_get(state))
