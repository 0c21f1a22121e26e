"""The train state and the jitted train / eval steps.

One step is one function: forward, loss, backward (accumulated over microbatches with
`lax.scan` when asked), optimizer update and metrics, all on device. The caller jits
it with the state donated, so parameters and optimizer state are updated in place.
With a `trainable` pattern (fine-tuning adapters, say) only the matching parameters are
differentiated and have optimizer state; the others are constants of the step.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from flax import traverse_util

from t5lite.config import ModelConfig
from t5lite.layers.moe import moe_summary
from t5lite.models import build, dummy_inputs
from t5lite.models.hidden import hidden_states
from t5lite.models.params import merge_params, model_features, split_params
from t5lite.sharding import BATCH_LOGICAL, Partitioner
from t5lite.train.distillation import Teacher
from t5lite.train.loss_scale import LossScaleState, LossScaling, objective_scale, scaled
from t5lite.train.losses import cross_entropy, distillation, hidden_distance, loss_weights
from t5lite.train.preference import Preference


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: Any
    opt_state: Any
    loss_scale: LossScaleState | None = None  # with train.loss_scale (float16): no leaves without


def init_state(
    config: ModelConfig,
    tx: optax.GradientTransformation,
    rng: jax.Array,
    shardings=None,
    trainable: str | None = None,
    pretrained: dict[str, jax.Array] | None = None,
    loss_scaling: LossScaling | None = None,
) -> TrainState:
    """A fresh state; with `shardings` (a TrainState of NamedShardings, from `Partitioner.state`)
    every array is created where it lives. The values do not depend on the sharding. `pretrained`
    ("/"-joined paths to arrays) replaces those parameters of the initialisation; the optimizer
    state covers the `trainable` ones. With `loss_scaling` the state holds the initial loss scale."""

    def init(key, pretrained):
        params = nn.unbox(build(config).init(key, **dummy_inputs(config), enable_dropout=False)["params"])
        if pretrained:
            params = merge_params(traverse_util.unflatten_dict(pretrained, sep="/"), params)
        return TrainState(
            step=jnp.zeros((), jnp.int32),
            params=params,
            opt_state=tx.init(split_params(params, trainable)[0]),
            loss_scale=None if loss_scaling is None else loss_scaling.init(),
        )

    return jax.jit(init, out_shardings=shardings)(rng, pretrained or {})


class Teaching(NamedTuple):
    """A distillation teacher's outputs on a batch, and the temperature of this step."""

    teacher: Teacher
    logits: jax.Array
    hidden: dict[str, list] | None  # stack -> layer outputs, with a hidden-state loss
    temperature: jax.Array


def _sums(config, params, batch, rng, z_loss, label_smoothing, enable_dropout, teaching: Teaching | None = None):
    """(objective, sums) of one (micro)batch. Sums: loss, z-loss, correct tokens and weight; for MoE
    models each `moe_*` statistic (a mean over MoE layers) times the weight, so that dividing by the
    batch's weight averages it over microbatches. The objective, which is differentiated, is the loss
    sum plus the weighted auxiliary losses; with `teaching` the distillation loss replaces the cross
    entropy in it (plus the hidden-state loss, times the weight, when the teacher has one)."""
    hidden = teaching is not None and teaching.hidden is not None
    logits, state = build(config).apply(
        {"params": params},
        **model_features(config, batch),
        enable_dropout=enable_dropout,
        rngs={"dropout": rng} if enable_dropout else None,
        mutable=["moe", "intermediates"] if hidden else ["moe"],
    )
    weights = loss_weights(batch)
    weight = jnp.sum(weights.astype(jnp.float32))
    loss, z, correct = cross_entropy(logits, batch["decoder_target_tokens"], weights, z_loss, label_smoothing)
    sums = {"loss": loss, "z_loss": z, "correct": correct, "weight": weight}
    objective = loss
    if teaching is not None:
        teacher = teaching.teacher
        soft, sums["distill_kl"] = distillation(
            logits, teaching.logits, batch["decoder_target_tokens"], weights, teaching.temperature, teacher.alpha
        )
        objective = soft + z
        if hidden:
            ours, valid = hidden_states(state["intermediates"], config), stack_valid(batch)
            sums["distill_hidden"] = weight * sum(
                hidden_distance(ours[stack][i], teaching.hidden[stack][j], valid[stack])
                for stack, i, j in teacher.layer_map
            )
            objective = objective + teacher.hidden_weight * sums["distill_hidden"]
    moe = moe_summary(state.get("moe", {}))
    if not moe:
        return objective, sums
    sums.update({f"moe_{name}": weight * value for name, value in moe.items()})
    auxiliary = (
        config.moe.load_balance_loss * moe["load_balance_loss"] + config.moe.router_z_loss * moe["router_z_loss"]
    )
    return objective + weight * auxiliary, sums


def stack_valid(batch) -> dict[str, jax.Array]:
    """The tokens of each stack that are not padding."""
    valid = {"decoder": batch["decoder_target_tokens"] > 0}
    if "encoder_input_tokens" in batch:
        segments = batch.get("encoder_segment_ids")
        valid["encoder"] = batch["encoder_input_tokens"] > 0 if segments is None else segments > 0
    return valid


def teach(teacher: Teacher, teacher_params, batch, step) -> Teaching:
    """The teacher's (constant) outputs on `batch`: its logits, and its layers' outputs when needed."""
    hidden = bool(teacher.hidden_weight)
    logits, state = build(teacher.config).apply(
        {"params": teacher_params},
        **model_features(teacher.config, batch),
        enable_dropout=False,
        mutable=["intermediates"] if hidden else [],
    )
    layers = hidden_states(state["intermediates"], teacher.config) if hidden else None
    logits, layers = jax.lax.stop_gradient((logits, layers))
    return Teaching(teacher, logits, layers, teacher.temperature(step))


def train_step(
    state: TrainState,
    batch,
    base_rng,
    reference_params=None,
    *,
    config: ModelConfig,
    tx: optax.GradientTransformation,
    schedule: Callable,
    num_microbatches: int = 1,
    z_loss: float = 1e-4,
    label_smoothing: float = 0.0,
    trainable: str | None = None,
    teacher: Teacher | None = None,
    preference: Preference | None = None,
    skip_nonfinite: bool = False,
    loss_scaling: LossScaling | None = None,
):
    """(new state, metrics). Gradients are of the mean loss over all target tokens of the batch
        (plus MoE auxiliary losses), whatever the number of microbatches, with respect to the parameters
        whose paths match `trainable` (all when None). The `loss` metric is the cross entropy (with
        z-loss); MoE models also log `moe_*` metrics, experts' shares one by one. With a `teacher`
        (and its parameters as `reference_params`) the loss is distillation's; `distill_kl`,
        `temperature` and, with a hidden-state loss, `distill_hidden` (summed over mapped layers) are
        logged. With `preference` the batch holds pair rows and the loss is DPO's against the reference
        model `reference_params`, or a reward model's; `loss` is the mean loss per pair, `accuracy` the
        share of pairs ranked right, `margin` the mean (implicit) reward margin. `finite` is 1 when the loss,
    the gradient norm and every updated parameter are finite; with `skip_nonfinite` a step where they
    are not leaves parameters and optimizer state as they were (only the step count moves on). With
    `loss_scaling` (the state holds its scale) the objective is scaled and the gradients unscaled once
    they are accumulated; `loss_scale` (after the step) and `loss_scale_overflows` are logged, and a
    dynamically scaled step with non-finite gradients is skipped (`overflow`; `finite` stays 1)."""
    rng = jax.random.fold_in(base_rng, state.step)
    params, frozen = split_params(state.params, trainable)

    def objective(p, data, key):
        if preference is not None:
            return preference.sums(config, merge_params(p, frozen), reference_params, data, key, True)
        teaching = None if teacher is None else teach(teacher, reference_params, data, state.step)
        return _sums(config, merge_params(p, frozen), data, key, z_loss, label_smoothing, True, teaching)

    assert (loss_scaling is None) == (state.loss_scale is None), "the state's loss scale and loss_scaling go together"
    factor = None if loss_scaling is None else objective_scale(state.loss_scale.scale, batch, preference is not None)
    grad_fn = jax.value_and_grad(objective if factor is None else scaled(objective, factor), has_aux=True)
    aux, grads = _gradients(grad_fn, params, batch, rng, num_microbatches)
    denominator = jnp.maximum(aux["weight"], 1.0)
    # Unscaled once, after accumulation (a power-of-two scale divides out exactly).
    grads = jax.tree.map(lambda g: g / (denominator if factor is None else denominator * factor), grads)
    updates, opt_state = tx.update(grads, state.opt_state, params)
    updated = optax.apply_updates(params, updates)
    metrics = {
        "loss": aux["loss"] / denominator,
        "z_loss": aux["z_loss"] / denominator,
        "accuracy": aux["correct"] / denominator,
        "grad_norm": optax.tree.norm(grads),
        "learning_rate": schedule(state.step),
        "target_tokens": aux["weight"],
        "params_finite": all_finite(updated),
    }
    updated, opt_state, loss_scale = guarded(state, (params, updated), opt_state, metrics, loss_scaling, skip_nonfinite)
    new_state = TrainState(
        step=state.step + 1, params=merge_params(updated, frozen), opt_state=opt_state, loss_scale=loss_scale
    )
    if teacher is not None:
        metrics.update(distill_kl=aux["distill_kl"] / denominator, temperature=teacher.temperature(state.step))
        if teacher.hidden_weight:
            metrics["distill_hidden"] = aux["distill_hidden"] / denominator
    if preference is not None:
        metrics["margin"] = aux["margin"] / denominator
    for name in (name for name in aux if name.startswith("moe_")):
        value = aux[name] / denominator
        metrics.update({f"{name}_{e}": share for e, share in enumerate(value)} if value.ndim else {name: value})
    return new_state, metrics


def guarded(state: TrainState, params, opt_state, metrics, loss_scaling: LossScaling | None, skip_nonfinite: bool):
    """(parameters, optimizer state, loss scale) after a step: `params` = (before, updated), the
    updated ones unless the step was not finite and is skipped (with `skip_nonfinite`, or with a dynamic
    loss scale, whose overflow it may be). Adds `finite` (1 at an overflow the scale handles, which
    is no reason to stop) and the loss scale's metrics to `metrics`."""
    (before, updated), loss_scale = params, state.loss_scale
    finite = jnp.isfinite(metrics["loss"]) & jnp.isfinite(metrics["grad_norm"]) & metrics["params_finite"]
    metrics["finite"] = finite
    if loss_scaling is not None:
        grads_finite = jnp.isfinite(metrics["grad_norm"])
        overflow = loss_scaling.absorbs(loss_scale, jnp.isfinite(metrics["loss"]), grads_finite)
        loss_scale = loss_scaling.update(loss_scale, grads_finite)
        metrics.update(loss_scale=loss_scale.scale, loss_scale_overflows=loss_scale.overflows, overflow=overflow)
        metrics["finite"] = finite | overflow
    if skip_nonfinite or (loss_scaling is not None and loss_scaling.dynamic):
        keep = functools.partial(jax.tree.map, lambda new, old: jnp.where(finite, new, old))
        updated, opt_state = keep(updated, before), keep(opt_state, state.opt_state)
    return updated, opt_state, loss_scale


def all_finite(tree) -> jax.Array:
    """Whether every value of every array of `tree` is finite: one pass over them, on device."""
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]))


def _gradients(grad_fn, params, batch, rng, num_microbatches: int):
    """(summed aux, summed gradients) of `grad_fn` over the batch, in `num_microbatches` pieces
    accumulated with `lax.scan`: microbatch m holds rows m, m + M, m + 2M, ..., so every device
    keeps its own rows of each."""
    if num_microbatches == 1:
        (_, aux), grads = grad_fn(params, batch, rng)
        return aux, grads
    micro = jax.tree.map(lambda x: x.reshape(-1, num_microbatches, *x.shape[1:]).swapaxes(0, 1), batch)

    def accumulate(carry, inputs):
        index, microbatch = inputs
        (_, aux), grads = grad_fn(params, microbatch, jax.random.fold_in(rng, index))
        return jax.tree.map(jnp.add, carry, (aux, grads)), None

    shapes = jax.eval_shape(lambda p, b: grad_fn(p, b, rng), params, jax.tree.map(lambda x: x[0], micro))
    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), (shapes[0][1], shapes[1]))
    return jax.lax.scan(accumulate, zeros, (jnp.arange(num_microbatches), micro))[0]


def eval_step(params, batch, *, config: ModelConfig):
    """Sums for perplexity and accuracy over a validation batch (no z-loss, no smoothing, no dropout)."""
    _, sums = _sums(config, params, batch, None, 0.0, 0.0, False)
    return {"loss_sum": sums["loss"], "correct": sums["correct"], "weight": sums["weight"]}


def sharded_train_step(
    partitioner: Partitioner, state_shardings, frozen_shardings=(), step_fn=train_step, **step_kwargs
):
    """`step_fn` (`train_step`, or `rl.rl_step`) jitted with explicit shardings (pjit): the state where
    `state_shardings` puts it (donated, so updated in place), the batch split over the batch axes,
    metrics replicated; the parameters of the frozen models the step also runs (a distillation
    teacher, a reference, a reward model) where `frozen_shardings` put them. Trace and compile it
    inside `partitioner.context()`."""
    return jax.jit(
        functools.partial(step_fn, **step_kwargs),
        in_shardings=(state_shardings, partitioner.sharding(BATCH_LOGICAL), partitioner.replicated, *frozen_shardings),
        out_shardings=(state_shardings, partitioner.replicated),
        donate_argnums=(0,),
    )


def sharded_eval_step(partitioner: Partitioner, param_shardings, config: ModelConfig):
    return jax.jit(
        functools.partial(eval_step, config=config),
        in_shardings=(param_shardings, partitioner.sharding(BATCH_LOGICAL)),
        out_shardings=partitioner.replicated,
    )
