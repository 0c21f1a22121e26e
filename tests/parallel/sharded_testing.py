"""Tiny models, meshes and a few sharded training steps, shared by the parallelism tests."""

import functools

import jax
import numpy as np

from t5lite.config import ModelConfig, MoeConfig
from t5lite.models import param_axes
from t5lite.sharding import BATCH_LOGICAL, MeshShape
from t5lite.train import optimizers
from t5lite.train.loop import TrainStep
from t5lite.train.step import init_state

ENCODER_DECODER = ModelConfig(
    architecture="encoder_decoder",
    vocab_size=64,
    d_model=32,
    num_heads=4,
    head_dim=8,
    d_ff=64,
    num_encoder_layers=2,
    num_decoder_layers=2,
    mlp_activation="geglu",
    dtype="float32",
    tie_embeddings=False,
)
# GQA with 2 key/value heads: on tensor=4 its K/V projections stay whole on every device.
DECODER = ModelConfig(
    architecture="decoder",
    vocab_size=64,
    d_model=32,
    num_heads=4,
    num_kv_heads=2,
    head_dim=8,
    d_ff=64,
    num_decoder_layers=2,
    mlp_activation="swiglu",
    position_encoding="rope",
    dtype="float32",
    tie_embeddings=True,
)
CONFIGS = {"encoder_decoder": ENCODER_DECODER, "decoder": DECODER}
# Switch (top-1, experts every other layer of both stacks, some tokens dropped at capacity 1.0) and
# a top-2 decoder with experts in every layer.
MOE_CONFIGS = {
    "switch": ENCODER_DECODER.replace(moe=MoeConfig(num_experts=8, train_capacity_factor=1.0, min_expert_capacity=1)),
    "moe_decoder_top2": DECODER.replace(moe=MoeConfig(num_experts=8, experts_per_token=2, decoder_every=1)),
}
# Four layers per stack: two or four pipeline stages, one or two chunks of layers per stage.
PIPELINE_CONFIGS = {
    "encoder_decoder_4_layers": ENCODER_DECODER.replace(num_encoder_layers=4, num_decoder_layers=4),
    "decoder_4_layers": DECODER.replace(num_decoder_layers=4),
}
MESHES = {
    "data8": MeshShape(data=8),
    "fsdp8": MeshShape(data=1, fsdp=8),
    "data2_tensor4": MeshShape(data=2, tensor=4),
    "fsdp4_tensor2": MeshShape(data=1, fsdp=4, tensor=2),
}
EXPERT_MESHES = {
    "expert4_data2": MeshShape(data=2, expert=4),
    "expert8": MeshShape(data=1, expert=8),
    "expert2_fsdp2_tensor2": MeshShape(data=1, fsdp=2, tensor=2, expert=2),
}
ALL_CONFIGS = {**CONFIGS, **MOE_CONFIGS, **PIPELINE_CONFIGS}
BATCH, MICROBATCHES, STEPS = 16, 2, 3


def batches(config, seed=0):
    rs = np.random.RandomState(seed)
    out = []
    for _ in range(STEPS):
        targets = rs.randint(1, config.vocab_size, (BATCH, 8)).astype(np.int32)
        targets[:, -2:] = 0  # padding carries no loss
        batch = {
            "decoder_input_tokens": np.concatenate([np.zeros((BATCH, 1), np.int32), targets[:, :-1]], 1),
            "decoder_target_tokens": targets,
        }
        if config.is_encoder_decoder:
            batch["encoder_input_tokens"] = rs.randint(1, config.vocab_size, (BATCH, 12)).astype(np.int32)
        out.append(batch)
    return out


def train_step(config, mesh_shape, devices=None, num_microbatches=MICROBATCHES, z_loss=1e-4, teacher=None):
    """The step the tests train with: Adafactor at a constant learning rate of 0.01."""
    schedule = optimizers.learning_rate_schedule("constant", 0.01)
    tx = optimizers.optimizer(learning_rate=schedule, param_axes=param_axes(config))
    return TrainStep.create(
        config,
        mesh_shape,
        tx,
        schedule,
        seed=0,
        batch_size=BATCH,
        num_microbatches=num_microbatches,
        z_loss=z_loss,
        label_smoothing=0.0,
        teacher=teacher,
        devices=devices,
    )


def lowered(step, config):
    """`step` lowered (not run) for a batch shaped like `batches(config)`."""
    partitioner = step.partitioner
    batch = {
        name: jax.ShapeDtypeStruct(value.shape, value.dtype, sharding=partitioner.sharding(BATCH_LOGICAL))
        for name, value in batches(config)[0].items()
    }
    key = jax.eval_shape(lambda: jax.random.PRNGKey(0))
    rng = jax.ShapeDtypeStruct(key.shape, key.dtype, sharding=partitioner.replicated)
    with partitioner.context():
        return step.fn.lower(step.abstract_state, batch, rng)


def train(config, mesh_shape, devices=None):
    """(losses, final state) of STEPS Adafactor steps with microbatches on `mesh_shape`; for MoE
    models the losses are the objective (cross entropy plus the weighted auxiliary losses)."""
    step = train_step(config, mesh_shape, devices)
    partitioner = step.partitioner
    with partitioner.context():
        state = init_state(config, step.tx, jax.random.PRNGKey(0), step.state_shardings)
        rng = jax.device_put(jax.random.PRNGKey(1), partitioner.replicated)
        losses = []
        for batch in batches(config):
            state, metrics = step.fn(state, partitioner.global_batch(batch, BATCH), rng)
            moe = config.moe
            losses.append(
                float(
                    metrics["loss"]
                    + moe.load_balance_loss * metrics.get("moe_load_balance_loss", 0.0)
                    + moe.router_z_loss * metrics.get("moe_router_z_loss", 0.0)
                )
            )
    return losses, state


def save_and_restore(directory, state, targets):
    """Saves an encoder-decoder's `state` as a run's checkpoint, then restores it once for each train
    step in `targets` (on their meshes); returns the restored states."""
    from t5lite.data import DataStream
    from t5lite.train.checkpoint import TrainCheckpoints

    stream = DataStream(
        "t5lite_synthetic_copy",
        split="train",
        task_feature_lengths={"inputs": 8, "targets": 8},
        batch_size=BATCH,
        model_kind="encoder_decoder",
    )
    checkpoints = TrainCheckpoints(directory, save_every=1, keep=None)
    checkpoints.save(int(state.step), state, stream, force=True)
    checkpoints.close()
    restored = []
    for target in targets:
        checkpoints = TrainCheckpoints(directory, save_every=1, keep=None)
        restored.append(checkpoints.restore(target.abstract_state))
        checkpoints.close()
    return restored


@functools.cache
def single_device(kind):
    losses, state = train(ALL_CONFIGS[kind], MeshShape(), devices=jax.devices()[:1])
    return losses, jax.device_get(state)


def train_like_one_device(kind, mesh_shape, **config_changes):
    """Trains `kind` (with `config_changes`, which must not change the model's function) on
    `mesh_shape`, checks losses, parameters and optimizer state against one device (float32
    throughout: only the order of sums over devices differs); returns the state."""
    losses, state = train(ALL_CONFIGS[kind].replace(**config_changes), mesh_shape)
    reference_losses, reference = single_device(kind)
    np.testing.assert_allclose(losses, reference_losses, rtol=2e-5)
    assert losses[-1] < losses[0]
    jax.tree.map(
        functools.partial(np.testing.assert_allclose, rtol=2e-4, atol=2e-5),
        jax.device_get(state.params),
        reference.params,
    )
    jax.tree.map(
        functools.partial(np.testing.assert_allclose, rtol=2e-4, atol=1e-7),
        jax.device_get(state.opt_state),
        reference.opt_state,
    )
    return state
