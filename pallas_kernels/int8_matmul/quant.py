"""Symmetric abs-max int8 quantisation in the scale layouts `int8_matmul` takes."""

import jax.numpy as jnp

QMAX = 127


def _absmax_scale(amax):
    return jnp.where(amax > 0, amax / QMAX, 1.0).astype(jnp.float32)


def quantize(x, *, axis, group_size=None):
    """int8 values and float32 scales of a 2-D array, x ~= q * scale.

    axis=1 (an activation / left operand [M, K]): scales [M, G], per row and K group;
    axis=0 (a weight / right operand [K, N]): scales [G, N], per column and K group;
    axis=None: one scale for the whole tensor. G = K // group_size, or 1 without groups.
    """
    x = jnp.asarray(x, jnp.float32)
    if x.ndim != 2:
        raise ValueError(f"quantize expects a 2-D array, got shape {x.shape}")
    if axis is None:
        scale = _absmax_scale(jnp.max(jnp.abs(x)))
        return _round(x / scale), scale
    if axis not in (0, 1):
        raise ValueError(f"axis must be 0, 1 or None, got {axis!r}")
    k = x.shape[axis]
    group = group_size or k
    if k % group:
        raise ValueError(f"group_size {group_size} does not divide the K axis ({k})")
    if axis == 1:
        scale = _absmax_scale(jnp.max(jnp.abs(x.reshape(x.shape[0], k // group, group)), axis=2))  # [M, G]
        expanded = jnp.repeat(scale, group, axis=1)
    else:
        scale = _absmax_scale(jnp.max(jnp.abs(x.reshape(k // group, group, x.shape[1])), axis=1))  # [G, N]
        expanded = jnp.repeat(scale, group, axis=0)
    return _round(x / expanded), scale


def dequantize(q, scale, *, axis):
    """Inverse of `quantize` (up to rounding), float32."""
    q = jnp.asarray(q, jnp.float32)
    if axis is None:
        return q * scale
    group = q.shape[axis] // scale.shape[axis]
    return q * jnp.repeat(scale, group, axis=axis)


def _round(x):
    return jnp.clip(jnp.round(x), -QMAX, QMAX).astype(jnp.int8)
