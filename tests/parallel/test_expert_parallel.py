"""Expert parallelism on 8 virtual CPU devices equals one device, and bad MoE meshes fail clearly."""

import jax
import pytest
from jax.sharding import PartitionSpec as P
from sharded_testing import BATCH, EXPERT_MESHES, MOE_CONFIGS, batches, train_like_one_device

from t5lite.models import param_axes
from t5lite.sharding import BATCH_LOGICAL, MeshShape, Partitioner
from t5lite.train import optimizers
from t5lite.train.loop import TrainStep


@pytest.mark.parametrize(
    "kind, mesh", [("switch", "expert4_data2"), ("switch", "expert8"), ("moe_decoder_top2", "expert2_fsdp2_tensor2")]
)
def test_expert_parallel_training_matches_one_device(kind, mesh):
    state = train_like_one_device(kind, EXPERT_MESHES[mesh])
    stack = "encoder" if MOE_CONFIGS[kind].is_encoder_decoder else "decoder"
    layers = state.params[stack]["layers"]
    moe = layers["layer_1"]["moe"] if "layer_1" in layers else layers["layer_0"]["moe"]
    # [blocks, experts, embed, expert_mlp] and [blocks, experts, expert_mlp, embed]
    for name, spec in (("wi_0", P(None, "expert", "fsdp", "tensor")), ("wo", P(None, "expert", "tensor", "fsdp"))):
        assert moe[name].sharding.spec == spec, (name, moe[name].sharding.spec)
        assert moe[name].addressable_shards[0].data.shape[1] == 8 // EXPERT_MESHES[mesh].expert


def test_dispatched_tokens_split_experts_over_expert_and_groups_over_data_and_fsdp():
    partitioner = Partitioner.create(MOE_CONFIGS["switch"], MeshShape(data=2, fsdp=2, expert=2))
    spec = partitioner.sharding(("expert", "expert_batch", None, "embed")).spec
    assert spec == P("expert", ("data", "fsdp"), None, None)


def test_experts_must_divide_over_the_expert_axis():
    config = MOE_CONFIGS["switch"].replace(moe=MOE_CONFIGS["switch"].moe.replace(num_experts=6))
    with pytest.raises(
        ValueError,
        match=r"expert axis \(expert=4\) must divide MoeConfig.num_experts=6.*"
        r"\[1, 2, 3, 6\]",
    ):
        Partitioner.create(config, MeshShape(data=2, expert=4))


def test_dropless_refuses_an_expert_axis():
    config = MOE_CONFIGS["switch"].replace(moe=MOE_CONFIGS["switch"].moe.replace(dropless=True))
    with pytest.raises(ValueError, match="dropless=True.*MeshShape.expert=1"):
        Partitioner.create(config, MeshShape(data=1, expert=8))


def test_tokens_reach_their_experts_by_all_to_all():
    """Expert parallelism moves tokens, not weights: the compiled step exchanges dispatched tokens
    between devices with all-to-all."""
    config = MOE_CONFIGS["switch"]
    schedule = optimizers.learning_rate_schedule("constant", 0.01)
    tx = optimizers.optimizer(learning_rate=schedule, param_axes=param_axes(config))
    step = TrainStep.create(
        config,
        EXPERT_MESHES["expert4_data2"],
        tx,
        schedule,
        seed=0,
        batch_size=BATCH,
        num_microbatches=1,
        z_loss=0.0,
        label_smoothing=0.0,
    )
    partitioner = step.partitioner
    batch = {
        name: jax.ShapeDtypeStruct(value.shape, value.dtype, sharding=partitioner.sharding(BATCH_LOGICAL))
        for name, value in batches(config)[0].items()
    }
    key = jax.eval_shape(lambda: jax.random.PRNGKey(0))
    with partitioner.context():
        hlo = (
            step.fn.lower(
                step.abstract_state, batch, jax.ShapeDtypeStruct(key.shape, key.dtype, sharding=partitioner.replicated)
            )
            .compile()
            .as_text()
        )
    assert "all-to-all" in hlo
