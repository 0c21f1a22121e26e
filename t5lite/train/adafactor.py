"""Adafactor (Shazeer & Stern 2018) as T5X runs it: statistics per tensor follow the logical axes.

Each parameter's axes are named (`embed`, `heads`, `kv`, `mlp`, `layers`, ...), and the names,
not the shapes, say how Adafactor treats them (T5X's `logical_factor_rules`):

  batch   `layers`, `expert`    every layer (and expert) of a stacked kernel is its own tensor:
                                its own parameter scale, update clipping and factored moments
  row     `embed`               the second moment is factored into a row and a column statistic;
  column  `vocab`, `mlp`,       several column axes count as one joined dimension, so an
          `heads`, `kv`, ...    attention kernel [embed, heads, kv] is factored as [embed, joined_kv]
  none    `relpos_buckets`, -   never factored

A parameter is factored when it has row and column axes and each side holds at least
`min_dim_size_to_factor` entries; the rule reads the axes without their batch axes, so a scanned
stack and its unrolled layers get the same optimizer, step for step. Update:

  v_row = d·v_row + (1-d)·mean_cols(g² + ε1),   v_col = d·v_col + (1-d)·mean_rows(g² + ε1)
  u = g / sqrt(v_row ⊗ v_col / mean_rows(v_row))        (or g / sqrt(v) unfactored)
  u /= max(1, rms(u) / clipping_threshold)
  p -= lr · max(ε2, rms(p)) · u                          d = 1 - (step + 1)^-decay_rate

with the means and rms taken over the non-batch axes. Factored statistics keep the parameter's
rank (the averaged axes have size 1), so they shard like the parameter along the axes they keep.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

BATCH, ROW, COLUMN, NONE = "batch", "row", "column", "none"
# Logical axis name -> how Adafactor treats it. Every axis a parameter can carry is listed.
FACTOR_RULES = {
    "layers": BATCH,
    "expert": BATCH,
    "embed": ROW,
    "vocab": COLUMN,
    "mlp": COLUMN,
    "expert_mlp": COLUMN,
    "heads": COLUMN,
    "kv_heads": COLUMN,
    "kv": COLUMN,
    "joined_kv": COLUMN,
    "abspos_buckets": COLUMN,
    "relpos_buckets": NONE,
    None: NONE,
}


@dataclasses.dataclass(frozen=True)
class Layout:
    """How one parameter's axes are treated: indices of its batch, row and column axes (rows and
    columns empty when its second moment is kept whole)."""

    batch: tuple[int, ...]
    rows: tuple[int, ...]
    cols: tuple[int, ...]
    ndim: int

    @property
    def factored(self) -> bool:
        return bool(self.rows)

    @property
    def averaged(self) -> tuple[int, ...]:
        """The axes a statistic of one tensor (its rms, its scale) is taken over."""
        return tuple(axis for axis in range(self.ndim) if axis not in self.batch)


def layout(axes: Sequence[str | None], shape: Sequence[int], min_dim_size_to_factor: int = 128) -> Layout:
    """The Layout of a parameter of `shape` whose axes are named `axes`."""
    unknown = [name for name in axes if name not in FACTOR_RULES]
    if unknown or len(axes) != len(shape):
        raise ValueError(
            f"Adafactor has no factoring rule for axes {tuple(axes)} of a parameter shaped "
            f"{tuple(shape)}; add {unknown or 'one name per axis'} to "
            f"t5lite.train.adafactor.FACTOR_RULES."
        )
    kinds = [FACTOR_RULES[name] for name in axes]
    of = lambda kind: tuple(i for i, k in enumerate(kinds) if k == kind)  # noqa: E731
    batch, rows, cols = of(BATCH), of(ROW), of(COLUMN)
    size = lambda dims: math.prod(shape[i] for i in dims)  # noqa: E731
    factored = rows and cols and not of(NONE) and min(size(rows), size(cols)) >= min_dim_size_to_factor
    return Layout(batch, rows, cols, len(shape)) if factored else Layout(batch, (), (), len(shape))


class AdafactorState(NamedTuple):
    """Trees shaped like the parameters; statistics a parameter does not use are size-1 placeholders."""

    count: jax.Array
    v_row: Any
    v_col: Any
    v: Any


def adafactor(
    learning_rate: float | Callable,
    param_axes: Mapping[str, Sequence[str | None]],
    *,
    decay_rate: float = 0.8,
    clipping_threshold: float | None = 1.0,
    epsilon1: float = 1e-30,
    epsilon2: float = 1e-3,
    min_dim_size_to_factor: int = 128,
    weight_decay_rate: float | None = None,
) -> optax.GradientTransformation:
    """T5X's Adafactor (no momentum) for parameters whose "/"-joined paths `param_axes` names the
    logical axes of; `learning_rate` is a number or a schedule of the step. Weight decay, as in
    T5X, shrinks the parameters by `weight_decay_rate` each step, whatever the learning rate."""

    def layouts(params):
        def one(path, param):
            name = "/".join(str(getattr(key, "key", key)) for key in path)
            if name not in param_axes:
                raise ValueError(
                    f"Adafactor knows no logical axes for parameter {name!r}; build it with the "
                    f"param_axes of the model it trains."
                )
            return layout(param_axes[name], param.shape, min_dim_size_to_factor)

        return jax.tree_util.tree_map_with_path(one, params)

    def init(params):
        def statistics(param, lay):
            reduced = lambda dims: tuple(1 if i in dims else n for i, n in enumerate(param.shape))  # noqa: E731
            placeholder = jnp.zeros((1,) * param.ndim, jnp.float32)
            if lay.factored:
                return jnp.zeros(reduced(lay.cols), jnp.float32), jnp.zeros(reduced(lay.rows), jnp.float32), placeholder
            return placeholder, placeholder, jnp.zeros(param.shape, jnp.float32)

        stats = jax.tree.map(statistics, params, layouts(params))
        v_row, v_col, v = (
            jax.tree.map(lambda s, i=i: s[i], stats, is_leaf=lambda x: isinstance(x, tuple)) for i in range(3)
        )
        return AdafactorState(jnp.zeros((), jnp.int32), v_row, v_col, v)

    def update(grads, state, params):
        if params is None:
            raise ValueError("Adafactor scales updates by the parameters' size: pass params to update().")
        decay = 1.0 - (state.count + 1.0) ** -decay_rate
        lr = learning_rate(state.count) if callable(learning_rate) else learning_rate

        def one(grad, param, v_row, v_col, v, lay):
            grad = grad.astype(jnp.float32)
            squared = grad * grad + epsilon1
            if lay.factored:
                v_row = decay * v_row + (1 - decay) * jnp.mean(squared, axis=lay.cols, keepdims=True)
                v_col = decay * v_col + (1 - decay) * jnp.mean(squared, axis=lay.rows, keepdims=True)
                row_mean = jnp.mean(v_row, axis=lay.rows, keepdims=True)
                u = grad * jax.lax.rsqrt(v_row / row_mean) * jax.lax.rsqrt(v_col)
            else:
                v = decay * v + (1 - decay) * squared
                u = grad * jax.lax.rsqrt(v)
            if clipping_threshold is not None:
                u = u / jnp.maximum(1.0, _rms(u, lay.averaged) / clipping_threshold)
            scale = jnp.maximum(epsilon2, _rms(param.astype(jnp.float32), lay.averaged))
            step = -lr * scale * u
            if weight_decay_rate:
                step = step - weight_decay_rate * param
            return (step.astype(param.dtype), v_row, v_col, v)

        out = jax.tree.map(one, grads, params, state.v_row, state.v_col, state.v, layouts(params))
        pick = lambda i: jax.tree.map(lambda o: o[i], out, is_leaf=lambda x: isinstance(x, tuple))  # noqa: E731
        return pick(0), AdafactorState(state.count + 1, pick(1), pick(2), pick(3))

    return optax.GradientTransformation(init, update)


def _rms(x: jax.Array, axes: tuple[int, ...]) -> jax.Array:
    return jnp.sqrt(jnp.mean(x * x, axis=axes, keepdims=True))


def from_optax(saved: Mapping[str, Any], params, like: AdafactorState) -> AdafactorState:
    """This optimizer's state, shaped as `like`, from `optax.adafactor`'s `FactoredState` of the same
    parameters (`saved`: its fields count, v_row, v_col, v): what runs saved before t5lite's
    Adafactor followed T5X's rules hold. Each parameter's second-moment estimate is rebuilt as
    optax kept it (whole, or factored along its two largest axes) and refit along this layout's
    rows and columns, so a resumed run keeps its statistics and its step."""

    def refit(param, v_row, v_col, v, *targets):
        if v.shape == param.shape:
            full = v
        else:
            rows, cols = (int(axis) for axis in np.argsort(param.shape)[-2:])
            row_mean = jnp.mean(v_row, axis=rows - (rows > cols), keepdims=True)
            full = jnp.expand_dims(v_row / row_mean, cols) * jnp.expand_dims(v_col, rows)
        return tuple(
            jnp.zeros(t.shape, jnp.float32) if t.size == 1 < param.size else _mean_to(full, t.shape) for t in targets
        )

    out = jax.tree.map(refit, params, saved["v_row"], saved["v_col"], saved["v"], like.v_row, like.v_col, like.v)
    pick = lambda i: jax.tree.map(lambda o: o[i], out, is_leaf=lambda x: isinstance(x, tuple))  # noqa: E731
    return AdafactorState(jnp.asarray(saved["count"], jnp.int32), pick(0), pick(1), pick(2))


def _mean_to(x: jax.Array, shape: Sequence[int]) -> jax.Array:
    """`x` averaged over the axes that `shape` has of size 1."""
    return jnp.mean(x, axis=tuple(i for i, n in enumerate(shape) if n == 1 and x.shape[i] != 1), keepdims=True)
