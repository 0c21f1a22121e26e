"""Expert parallelism on 8 virtual CPU devices equals one device, and bad MoE meshes fail clearly."""

import pytest
from jax.sharding import PartitionSpec as P
from sharded_testing import EXPERT_MESHES, MOE_CONFIGS, lowered, train_like_one_device, train_step

from t5lite.sharding import MeshShape, Partitioner


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
    step = train_step(config, EXPERT_MESHES["expert4_data2"], num_microbatches=1, z_loss=0.0)
    hlo = lowered(step, config).compile().as_text()
    assert "all-to-all" in hlo
