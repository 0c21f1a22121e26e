"""The RL step on a mesh: sampling with the KV cache, scoring and PPO's minibatch updates, sharded
over data, fsdp and tensor axes, give what one device gives."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from sharded_testing import DECODER, MESHES

from t5lite.models import param_axes
from t5lite.sharding import MeshShape
from t5lite.train import optimizers
from t5lite.train.loop import TrainStep
from t5lite.train.rl import PPO
from t5lite.train.step import init_state

PROMPTS, T, STEPS = 8, 6, 2
CONFIG = DECODER.replace(adapters=DECODER.adapters.replace(reward_head=True))  # PPO's value head


def starts_with_five(responses, targets, eos_id):
    return (responses[:, 0] == 5).astype(jnp.float32)


def prompt_batch():
    """causal_prefix_lm rows: a prompt of 2 to 4 tokens, then a target with the loss weight."""
    rs = np.random.RandomState(0)
    tokens, weights = np.zeros((PROMPTS, 4 + T), np.int32), np.zeros((PROMPTS, 4 + T), np.int32)
    for row in range(PROMPTS):
        p = rs.randint(2, 5)
        tokens[row, : p + 3] = rs.randint(2, CONFIG.vocab_size, p + 3)
        weights[row, p : p + 3] = 1
    return {"decoder_target_tokens": tokens, "decoder_loss_weights": weights}


def run(mesh_shape, devices=None):
    schedule = optimizers.learning_rate_schedule("constant", 3e-3)
    tx = optimizers.optimizer("adamw", schedule, param_axes=param_axes(CONFIG))
    step = TrainStep.create(
        CONFIG,
        mesh_shape,
        tx,
        schedule,
        seed=0,
        batch_size=PROMPTS,
        num_microbatches=1,
        z_loss=0.0,
        label_smoothing=0.0,
        rl=PPO(reward=starts_with_five, group_size=2, epochs=2, minibatches=2),
        kind="causal_prefix_lm",
        max_new_tokens=T,
        frozen=(CONFIG,),
        devices=devices,
    )
    partitioner = step.partitioner
    with partitioner.context():
        state = init_state(CONFIG, step.tx, jax.random.PRNGKey(0), step.state_shardings)
        # Buffers of its own, as the loop makes them: the step donates the state's.
        reference = init_state(CONFIG, step.tx, jax.random.PRNGKey(0), step.state_shardings).params
        rng = jax.device_put(jax.random.PRNGKey(1), partitioner.replicated)
        rows = []
        for _ in range(STEPS):
            state, metrics = step.fn(state, partitioner.global_batch(prompt_batch(), PROMPTS), rng, reference)
            rows.append(jax.device_get(metrics))
    return rows, jax.device_get(state.params)


@functools.cache
def one_device():
    return run(MeshShape(), jax.devices()[:1])


@pytest.mark.slow
@pytest.mark.parametrize("mesh", ["fsdp4_tensor2", "data2_tensor4"])
def test_the_rl_step_on_a_mesh_matches_one_device(mesh):
    rows, params = run(MESHES[mesh])
    reference_rows, reference_params = one_device()
    for ours, theirs in zip(rows, reference_rows):
        # The same responses: the same rewards and lengths, exactly.
        assert ours["reward_mean"] == theirs["reward_mean"] and ours["response_length"] == theirs["response_length"]
        for name in ("loss", "kl", "entropy", "value_loss", "grad_norm"):
            np.testing.assert_allclose(ours[name], theirs[name], rtol=2e-4, atol=1e-6, err_msg=name)
    assert rows[-1]["kl"] != 0.0  # the policy moved
    jax.tree.map(functools.partial(np.testing.assert_allclose, rtol=2e-3, atol=2e-5), params, reference_params)
