"""Loss scaling, for training in float16: the loss is multiplied by a scale before the backward pass
(so that small gradients do not underflow float16's 2^-24) and the gradients divided by it after.

`train.loss_scale = 'dynamic'` starts at `train.loss_scale_initial` (2^15) and adapts, as PyTorch's
GradScaler and Apex do: a step whose gradients are not finite (the scale overflowed float16's
65504 somewhere in the backward pass) is skipped, parameters and optimizer state untouched, and
the scale halved; after `train.loss_scale_growth_interval` (2000) finite steps in a row it doubles.
It stays within [MIN_SCALE, MAX_SCALE]; a step that overflows at MIN_SCALE is not the scale's
doing and counts as a non-finite step (the run stops, or `train.skip_nonfinite_steps` skips it).
`train.loss_scale = 1024.0` (a number) scales by that, always. The scale is part of the train
state, so a resumed run continues with the scale it saved.

The scale is of the mean loss, as PyTorch's is: the step's objective sums its token losses (t5lite
divides by the number of target tokens after the backward pass), so it is scaled by the scale over
the largest power of two not above the batch's target positions (`objective_scale`). Powers of two
divide out exactly.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import flax
import jax
import jax.numpy as jnp

DYNAMIC = "dynamic"
MIN_SCALE = 1.0
MAX_SCALE = 2.0**64  # far above what float16 allows; keeps a float32 scale finite whatever happens
GROWTH_FACTOR = 2.0  # up after a run of finite steps; down by the same factor at a non-finite one


@flax.struct.dataclass
class LossScaleState:
    """The loss scale of a run, in its train state (and so in every checkpoint)."""

    scale: jax.Array  # float32
    finite_steps: jax.Array  # int32: finite steps in a row since the scale last changed
    overflows: jax.Array  # int32: steps of the run skipped for non-finite gradients (dynamic scaling)


@dataclasses.dataclass(frozen=True)
class LossScaling:
    """How a run scales its loss: by `initial` always (`dynamic=False`), or dynamically from `initial`."""

    dynamic: bool
    initial: float
    growth_interval: int = 2000

    @classmethod
    def from_settings(cls, loss_scale, initial: float, growth_interval: int, dtype: str) -> LossScaling | None:
        """The scaling `train.loss_scale` (None, 'dynamic' or a number), `train.loss_scale_initial` and
        `train.loss_scale_growth_interval` ask for, with a model computing in `dtype`; None: no scaling.
        float16 without scaling is refused (its gradients underflow)."""
        if loss_scale is None:
            if dtype == "float16":
                raise ValueError(
                    "ModelConfig.dtype='float16' needs loss scaling, or small gradients underflow to 0 and "
                    "large ones overflow: set train.loss_scale='dynamic' (or a fixed scale such as 1024.0). "
                    "bfloat16 (the default) and float32 need none."
                )
            return None
        if loss_scale == DYNAMIC:
            if not _positive_number(initial) or not MIN_SCALE <= initial <= MAX_SCALE:
                raise ValueError(
                    f"train.loss_scale_initial={initial!r} must be a number from {MIN_SCALE:g} to "
                    f"{MAX_SCALE:g} (default 2**15 = 32768.0)."
                )
            if isinstance(growth_interval, bool) or not isinstance(growth_interval, int) or growth_interval < 1:
                raise ValueError(
                    f"train.loss_scale_growth_interval={growth_interval!r} must be a positive number of steps "
                    f"(default 2000): how many finite steps in a row double the scale."
                )
            return cls(dynamic=True, initial=float(initial), growth_interval=growth_interval)
        if not _positive_number(loss_scale):
            raise ValueError(
                f"train.loss_scale={loss_scale!r} must be None (no loss scaling), 'dynamic' (adapted as "
                f"gradients overflow; what float16 wants) or a fixed positive scale such as 1024.0."
            )
        return cls(dynamic=False, initial=float(loss_scale))

    def init(self) -> LossScaleState:
        return LossScaleState(
            scale=jnp.asarray(self.initial, jnp.float32),
            finite_steps=jnp.zeros((), jnp.int32),
            overflows=jnp.zeros((), jnp.int32),
        )

    def update(self, state: LossScaleState, grads_finite: jax.Array) -> LossScaleState:
        """The scale after a step whose (unscaled) gradients were all finite, or not. A fixed scale
        stays as it is."""
        if not self.dynamic:
            return state
        grow = grads_finite & (state.finite_steps + 1 >= self.growth_interval)
        scale = jnp.where(
            grads_finite,
            jnp.where(grow, jnp.minimum(state.scale * GROWTH_FACTOR, MAX_SCALE), state.scale),
            jnp.maximum(state.scale / GROWTH_FACTOR, MIN_SCALE),
        )
        return LossScaleState(
            scale=scale.astype(jnp.float32),
            finite_steps=jnp.where(grads_finite & ~grow, state.finite_steps + 1, 0).astype(jnp.int32),
            overflows=state.overflows + (~grads_finite).astype(jnp.int32),
        )

    def absorbs(self, state: LossScaleState, loss_finite: jax.Array, grads_finite: jax.Array) -> jax.Array:
        """Whether a step's non-finite gradients are the scale's doing (a finite loss, gradients that
        are not, a dynamic scale above its minimum): the step is skipped, and that is no error."""
        if not self.dynamic:
            return jnp.zeros((), bool)
        return loss_finite & ~grads_finite & (state.scale > MIN_SCALE)


def objective_scale(scale: jax.Array, batch, pairs: bool = False) -> jax.Array:
    """What a step multiplies its objective (a sum over the batch) by for a loss `scale`: the scale over
    the largest power of two not above the most weight the batch can hold, its target positions (or
    its pairs of rows, for preference objectives). Static, and exact to divide out for powers of two."""
    targets = batch["decoder_target_tokens"]
    capacity = max(targets.shape[0] // 2 if pairs else targets.size, 1)
    return scale / float(2 ** (capacity.bit_length() - 1))


def scaled(objective: Callable, scale: jax.Array) -> Callable:
    """`objective` (returning (value, aux)) with its value multiplied by `scale`."""

    def scaled_objective(*args):
        value, aux = objective(*args)
        return value * scale, aux

    return scaled_objective


def _positive_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0
