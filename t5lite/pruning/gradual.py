"""Gradual magnitude pruning during training (Zhu & Gupta 2017, "To prune, or not to prune").

The sparsity rises from `initial` to `final` between `begin_step` and `end_step` along a cubic,
s_t = s_f + (s_i - s_f)·(1 - (t - t_0)/(t_end - t_0))³, fast at first while many weights are
redundant, slowly near the end; every `frequency` steps each prunable kernel (per layer) is
masked to the current sparsity by magnitude. Masked weights stay zero: the masks live in the
optimizer state, and the update sets them to zero after every step.

`gradual_pruning(...)` is an optax transformation; chained last onto the run's optimizer
(`optax.chain(tx, gradual_pruning(...))`) it needs nothing from the train step, which already
calls `tx.update(grads, opt_state, params)`. `apply_masks` is the same masking as a function.
From gin, `t5lite.optimizer` chains it on:

  optimizer.sparsity_schedule = @t5lite.pruning.cubic_sparsity
  cubic_sparsity.final = 0.5
  cubic_sparsity.begin_step = 1000
  cubic_sparsity.end_step = 8000
  cubic_sparsity.frequency = 100
"""

from __future__ import annotations

from typing import NamedTuple

import gin
import jax
import jax.numpy as jnp
import optax

from t5lite.config import INT8_DENSE_FAMILIES
from t5lite.quantization.calibration import family_of


@gin.configurable(module="t5lite.pruning", denylist=["step"])
def cubic_sparsity(step, final: float, begin_step: int, end_step: int, initial: float = 0.0, frequency: int = 1):
    """Zhu & Gupta's sparsity at `step` (0 before `begin_step`, `final` from `end_step`), updated
    every `frequency` steps."""
    if not 0 <= initial <= final < 1:
        raise ValueError(f"Need 0 <= initial ({initial}) <= final ({final}) < 1.")
    if not 0 <= begin_step < end_step or frequency < 1:
        raise ValueError(f"Need 0 <= begin_step ({begin_step}) < end_step ({end_step}) and frequency >= 1.")
    step = jnp.asarray(step)
    at = begin_step + (step - begin_step) // frequency * frequency
    progress = jnp.clip((at - begin_step) / (end_step - begin_step), 0.0, 1.0)
    sparsity = final + (initial - final) * (1 - progress) ** 3
    return jnp.where(step < begin_step, 0.0, sparsity)


def _names(path) -> list[str]:
    return [str(getattr(key, "key", getattr(key, "name", key))) for key in path]


def _is_prunable(path, families) -> bool:
    names = _names(path)
    return names[-1] == "kernel" and family_of(names) in families


def _stacked(path) -> bool:
    """A kernel of scanned layers: a leading `layers` axis, each layer masked on its own."""
    return "layers" in _names(path)


def magnitude_masks(params, sparsity, families=INT8_DENSE_FAMILIES):
    """A pytree like `params`: for each prunable kernel a bool mask (True: kept) that removes the
    `sparsity` share (a traced scalar is fine) of its smallest |w|, per layer; a scalar True elsewhere."""

    def mask(path, w):
        if not _is_prunable(path, families):
            return jnp.ones([], bool)
        flat = jnp.abs(w).reshape(w.shape[0] if _stacked(path) else 1, -1)
        pruned = jnp.floor(sparsity * flat.shape[1]).astype(jnp.int32)
        threshold = jnp.take_along_axis(jnp.sort(flat, axis=1), jnp.maximum(pruned - 1, 0)[None, None], axis=1)
        keep = (flat > threshold) | (pruned == 0)
        return keep.reshape(w.shape)

    return jax.tree_util.tree_map_with_path(mask, params)


def apply_masks(params, masks):
    """Zeroes the masked weights (masks from `magnitude_masks`)."""
    return jax.tree_util.tree_map(lambda w, m: jnp.where(m, w, jnp.zeros_like(w)), params, masks)


class PruningState(NamedTuple):
    count: jax.Array
    masks: object  # bool pytree like the params (a scalar True where not pruned)


def gradual_pruning(schedule, families=INT8_DENSE_FAMILIES) -> optax.GradientTransformation:
    """Chained after the optimizer: each update recomputes the masks at `schedule(step)` (e.g.
    `functools.partial(cubic_sparsity, final=0.5, begin_step=100, end_step=1000, frequency=50)`)
    from the updated weights and turns the update of a masked weight into -w, so that it lands
    on exactly zero. The masks stay in the state between steps."""

    def init(params):
        return PruningState(jnp.zeros([], jnp.int32), magnitude_masks(params, 0.0, families))

    def update(updates, state, params=None):
        if params is None:
            raise ValueError("gradual_pruning needs the params: call tx.update(grads, opt_state, params).")
        updated = optax.apply_updates(params, updates)
        masks = magnitude_masks(apply_masks(updated, state.masks), schedule(state.count), families)
        masks = jax.tree_util.tree_map(jnp.logical_and, state.masks, masks)
        updates = jax.tree_util.tree_map(lambda u, p, m: jnp.where(m, u, -p), updates, params, masks)
        return updates, PruningState(state.count + 1, masks)

    return optax.GradientTransformation(init, update)
