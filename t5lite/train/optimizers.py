"""Learning-rate schedules and optimizers, gin-configurable by name.

Schedules return a function of the step (optax convention). The T5 default is
Adafactor with `rsqrt` decay after a constant warmup: lr = base / sqrt(max(step, warmup)).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import gin
import jax.numpy as jnp
import optax

from t5lite.pruning.gradual import gradual_pruning
from t5lite.train.adafactor import adafactor

SCHEDULES = ("constant", "rsqrt", "linear", "cosine", "wsd")
OPTIMIZERS = ("adafactor", "adamw")


@gin.configurable(module="t5lite")
def learning_rate_schedule(
    name: str = "rsqrt",
    base_learning_rate: float = 1.0,
    warmup_steps: int = 1000,
    total_steps: int | None = None,
    final_fraction: float = 0.0,
    decay_fraction: float = 0.2,
):
    """`rsqrt`: T5's inverse square root after a flat warmup. `linear` / `cosine`: linear warmup, then
    decay to `final_fraction` of the base at `total_steps`. `wsd`: warmup, stable, then a linear decay over
    the last `decay_fraction` of the steps."""
    if name not in SCHEDULES:
        raise ValueError(
            f"learning_rate_schedule.name={name!r} is not supported. Allowed values: {', '.join(SCHEDULES)}."
        )
    if warmup_steps < 0:
        raise ValueError(f"learning_rate_schedule.warmup_steps={warmup_steps} must be >= 0.")
    if name == "constant":
        return optax.constant_schedule(base_learning_rate)
    if name == "rsqrt":
        return lambda step: base_learning_rate / jnp.sqrt(jnp.maximum(step, max(warmup_steps, 1)).astype(jnp.float32))
    if not total_steps or total_steps <= warmup_steps:
        raise ValueError(
            f"The {name!r} schedule needs learning_rate_schedule.total_steps > warmup_steps "
            f"(got total_steps={total_steps}, warmup_steps={warmup_steps})."
        )
    warmup = optax.linear_schedule(0.0, base_learning_rate, warmup_steps)
    final = base_learning_rate * final_fraction
    decay_steps = total_steps - warmup_steps
    if name == "linear":
        decay = optax.linear_schedule(base_learning_rate, final, decay_steps)
    elif name == "cosine":
        decay = optax.cosine_decay_schedule(base_learning_rate, decay_steps, alpha=final_fraction)
    else:
        cooldown = max(1, int(round(total_steps * decay_fraction)))
        stable = max(0, decay_steps - cooldown)
        decay = optax.join_schedules(
            [optax.constant_schedule(base_learning_rate), optax.linear_schedule(base_learning_rate, final, cooldown)],
            [stable],
        )
    return optax.join_schedules([warmup, decay], [warmup_steps])


@gin.configurable(module="t5lite", denylist=["param_axes"])
def optimizer(
    name: str = "adafactor",
    learning_rate=gin.REQUIRED,
    param_axes: Mapping[str, tuple] | None = None,
    clip_norm: float | None = None,
    weight_decay: float = 0.0,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    adafactor_decay_rate: float = 0.8,
    sparsity_schedule: Callable | None = None,
):
    """Adafactor as T5X runs it (factored second moments along the parameters' logical axes
    `param_axes`, see t5lite.train.adafactor; update clipping 1.0, parameter-scale updates, no
    momentum) or AdamW; optional global-norm clipping first; with a `sparsity_schedule` (step ->
    sparsity, e.g. t5lite.pruning.cubic_sparsity), gradual magnitude pruning last."""
    if name not in OPTIMIZERS:
        raise ValueError(f"optimizer.name={name!r} is not supported. Allowed values: {', '.join(OPTIMIZERS)}.")
    if name == "adafactor":
        if param_axes is None:
            raise ValueError(
                "Adafactor factors each parameter along its logical axes: pass "
                "param_axes=t5lite.models.param_axes(model_config)."
            )
        core = adafactor(
            learning_rate, param_axes, decay_rate=adafactor_decay_rate, weight_decay_rate=weight_decay or None
        )
    else:
        core = optax.adamw(learning_rate, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay)
    tx = optax.chain(optax.clip_by_global_norm(clip_norm), core) if clip_norm else core
    return tx if sparsity_schedule is None else optax.chain(tx, gradual_pruning(sparsity_schedule))
