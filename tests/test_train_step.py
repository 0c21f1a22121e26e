"""Losses, schedules and the jitted train step on synthetic batches."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.special import log_softmax, logsumexp

from t5lite.config import ModelConfig
from t5lite.models import param_axes
from t5lite.train import optimizers
from t5lite.train.losses import cross_entropy
from t5lite.train.step import eval_step, init_state, train_step


def test_cross_entropy_against_numpy():
    rs = np.random.RandomState(0)
    logits, targets = rs.randn(2, 5, 11).astype(np.float32), rs.randint(0, 11, (2, 5))
    weights = (rs.rand(2, 5) > 0.3).astype(np.float32)
    log_p = log_softmax(logits.astype(np.float64), axis=-1)
    nll = -np.take_along_axis(log_p, targets[..., None], -1)[..., 0]
    z = 1e-3 * logsumexp(logits.astype(np.float64), axis=-1) ** 2
    loss, z_sum, correct = cross_entropy(jnp.asarray(logits), jnp.asarray(targets), jnp.asarray(weights), z_loss=1e-3)
    np.testing.assert_allclose(loss, np.sum((nll + z) * weights), rtol=1e-5)
    np.testing.assert_allclose(z_sum, np.sum(z * weights), rtol=1e-5)
    assert correct == np.sum((logits.argmax(-1) == targets) * weights)
    # Label smoothing: KL from the smoothed target distribution.
    eps, vocab = 0.1, 11
    q = np.full((2, 5, vocab), eps / (vocab - 1))
    np.put_along_axis(q, targets[..., None], 1 - eps, -1)
    kl = np.sum(q * (np.log(q) - log_p), axis=-1)
    smoothed, _, _ = cross_entropy(
        jnp.asarray(logits), jnp.asarray(targets), jnp.asarray(weights), z_loss=0.0, label_smoothing=eps
    )
    np.testing.assert_allclose(smoothed, np.sum(kl * weights), rtol=1e-5)


def test_schedules():
    rsqrt = optimizers.learning_rate_schedule("rsqrt", 1.0, warmup_steps=100)
    np.testing.assert_allclose([rsqrt(0), rsqrt(100), rsqrt(400)], [0.1, 0.1, 0.05], rtol=1e-6)
    cosine = optimizers.learning_rate_schedule("cosine", 2.0, warmup_steps=10, total_steps=110, final_fraction=0.1)
    np.testing.assert_allclose(
        [cosine(0), cosine(5), cosine(10), cosine(60), cosine(110)], [0, 1, 2, 1.1, 0.2], rtol=1e-5, atol=1e-6
    )
    wsd = optimizers.learning_rate_schedule("wsd", 1.0, warmup_steps=10, total_steps=110, decay_fraction=0.2)
    np.testing.assert_allclose([wsd(5), wsd(50), wsd(87), wsd(99), wsd(110)], [0.5, 1, 1, 0.5, 0], atol=1e-6)
    linear = optimizers.learning_rate_schedule("linear", 1.0, warmup_steps=0, total_steps=10)
    np.testing.assert_allclose([linear(0), linear(5), linear(10)], [1, 0.5, 0], atol=1e-6)
    with pytest.raises(ValueError, match="total_steps"):
        optimizers.learning_rate_schedule("cosine", 1.0, warmup_steps=10)
    with pytest.raises(ValueError, match="Allowed values"):
        optimizers.learning_rate_schedule("exponential")


CONFIG = ModelConfig(
    architecture="encoder_decoder",
    vocab_size=32,
    d_model=32,
    num_heads=2,
    head_dim=16,
    d_ff=64,
    num_encoder_layers=1,
    num_decoder_layers=1,
    mlp_activation="geglu",
    dtype="float32",
    tie_embeddings=False,
)


def batch(batch_size=4, seed=0):
    rs = np.random.RandomState(seed)
    targets = rs.randint(1, 32, (batch_size, 6))
    targets[:, -1] = 0  # padding carries no loss
    return {
        "encoder_input_tokens": jnp.asarray(rs.randint(1, 32, (batch_size, 7))),
        "decoder_input_tokens": jnp.asarray(np.concatenate([np.zeros((batch_size, 1), int), targets[:, :-1]], 1)),
        "decoder_target_tokens": jnp.asarray(targets),
    }


def step_fn(tx, schedule, **kwargs):
    return jax.jit(functools.partial(train_step, config=CONFIG, tx=tx, schedule=schedule, **kwargs))


def test_microbatches_give_the_same_update():
    schedule = optimizers.learning_rate_schedule("constant", 1e-2)
    tx = optimizers.optimizer("adamw", schedule)
    state = init_state(CONFIG, tx, jax.random.PRNGKey(0))
    one, metrics_one = step_fn(tx, schedule)(state, batch(), jax.random.PRNGKey(1))
    four, metrics_four = step_fn(tx, schedule, num_microbatches=2)(state, batch(), jax.random.PRNGKey(1))
    np.testing.assert_allclose(metrics_four["loss"], metrics_one["loss"], rtol=1e-6)
    np.testing.assert_allclose(metrics_four["grad_norm"], metrics_one["grad_norm"], rtol=1e-5)
    jax.tree.map(functools.partial(np.testing.assert_allclose, rtol=1e-4, atol=1e-7), four.params, one.params)
    assert int(one.step) == 1 and float(metrics_one["target_tokens"]) == 4 * 5


@pytest.mark.parametrize("name", ["adafactor", "adamw"])
def test_loss_falls_when_memorising_a_batch(name):
    schedule = optimizers.learning_rate_schedule("constant", 1e-2)
    tx = optimizers.optimizer(name, schedule, clip_norm=1.0, param_axes=param_axes(CONFIG))
    state = init_state(CONFIG, tx, jax.random.PRNGKey(0))
    step = step_fn(tx, schedule)
    data = batch()
    first = float(eval_step(state.params, data, config=CONFIG)["loss_sum"])
    for _ in range(40):
        state, metrics = step(state, data, jax.random.PRNGKey(1))
    last = float(eval_step(state.params, data, config=CONFIG)["loss_sum"])
    assert last < 0.3 * first, (first, last)
    assert np.isfinite(float(metrics["grad_norm"]))


def test_int8_training_tracks_its_bfloat16_twin():
    """Int8 projections and MLP (straight-through gradients) train as well as bfloat16, within a
    margin of 0.1 nats + 10% after 60 steps over four batches."""
    final = {}
    for int8_dense in ((), ("attention", "mlp")):
        config = CONFIG.replace(dtype="bfloat16", int8_dense=int8_dense)
        schedule = optimizers.learning_rate_schedule("constant", 3e-3)
        tx = optimizers.optimizer("adamw", schedule)
        state = init_state(config, tx, jax.random.PRNGKey(0))
        step = jax.jit(functools.partial(train_step, config=config, tx=tx, schedule=schedule))
        curve = []
        for i in range(60):
            state, metrics = step(state, batch(8, seed=i % 4), jax.random.PRNGKey(1))
            curve.append(float(metrics["loss"]))
        assert curve[-1] < 0.2 * curve[0], (int8_dense, curve)
        final[int8_dense] = np.mean(curve[-4:])
    assert abs(final[("attention", "mlp")] - final[()]) <= 0.1 + 0.1 * final[()], final


def test_a_non_finite_update_is_flagged_and_skipped_when_asked():
    """An update to infinity (lr inf): `finite` says so; skipping keeps parameters and optimizer state."""
    schedule = optimizers.learning_rate_schedule("constant", np.inf)
    tx = optimizers.optimizer("adamw", schedule)
    state = init_state(CONFIG, tx, jax.random.PRNGKey(0))
    before = jax.device_get(state)
    applied, metrics = step_fn(tx, schedule)(state, batch(), jax.random.PRNGKey(1))
    assert np.isfinite(metrics["loss"]) and np.isfinite(metrics["grad_norm"])
    assert not metrics["params_finite"] and not metrics["finite"]
    assert not all(np.isfinite(x).all() for x in jax.tree.leaves(applied.params))
    state = init_state(CONFIG, tx, jax.random.PRNGKey(0))
    skipped, metrics = step_fn(tx, schedule, skip_nonfinite=True)(state, batch(), jax.random.PRNGKey(1))
    assert not metrics["finite"] and int(skipped.step) == 1
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(skipped.params), before.params)
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(skipped.opt_state), before.opt_state)


def step_values(loss=1.0, grad_norm=1.0, params_finite=True):
    finite = bool(np.isfinite(loss) and np.isfinite(grad_norm) and params_finite)
    return {
        "loss": np.float32(loss),
        "z_loss": np.float32(0),
        "grad_norm": np.float32(grad_norm),
        "params_finite": params_finite,
        "finite": finite,
        "target_tokens": np.float32(10),
    }


@pytest.mark.parametrize(
    "bad, message",
    [
        (dict(loss=np.nan), "At step 3 the loss became nan"),
        (dict(grad_norm=np.inf), "At step 3 the gradient norm became inf"),
        (dict(params_finite=False), "At step 3 the update made parameters non-finite"),
    ],
)
def test_the_first_non_finite_step_stops_naming_what_and_the_last_good_checkpoint(bad, message):
    from t5lite.train.metrics import StepMetrics

    metrics = StepMetrics(1.0, 10, 1, 1.0)
    for step in (1, 2):
        metrics.add(step, step_values())
    metrics.add(3, step_values(**bad))
    with pytest.raises(FloatingPointError, match=f"{message}.*the last good checkpoint is step 2"):
        metrics.fetch(last_checkpoint=2)


def test_skipped_steps_are_counted_and_left_out_of_the_means(capsys):
    from t5lite.train.metrics import ZERO_GRADIENT_STEPS, StepMetrics

    metrics = StepMetrics(1.0, 10, 1, 1.0, skip_nonfinite=2)
    for step, values in enumerate([step_values(2.0), step_values(np.nan), step_values(np.inf), step_values(4.0)], 1):
        metrics.add(step, values)
    metrics.fetch(last_checkpoint=None)
    summary = metrics.summary()
    assert summary["loss"] == 3.0 and summary["skipped_steps"] == 2
    for step in range(5, 8):
        metrics.add(step, step_values(np.nan))
    with pytest.raises(FloatingPointError, match="At step 7 the loss became nan after skipping 2 such steps"):
        metrics.fetch(last_checkpoint=4)
    metrics = StepMetrics(1.0, 10, 1, 1.0)
    for step in range(1, ZERO_GRADIENT_STEPS + 1):
        metrics.add(step, step_values(grad_norm=0.0))
    metrics.fetch(last_checkpoint=None)
    assert f"the gradient norm has been 0 for {ZERO_GRADIENT_STEPS} steps" in capsys.readouterr().err
