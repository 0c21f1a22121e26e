"""AWQ (Lin et al. 2023): protect the weights of salient input channels, those with large
activations, by scaling them up before round-to-nearest and dividing the inputs by the same
factor: x @ w = (x / s) @ (diag(s) w). A larger row loses less to rounding relative to its size,
and its error is later divided by s. The scales s = mean|x|^alpha follow the activations, with
alpha searched on calibration data.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from t5lite.layers.quant import Scheme, dequantize, fit, quantize

_HIGHEST = jax.lax.Precision.HIGHEST


def awq(w, x, scheme: Scheme, grid=20):
    """(q int8 [K, N], scale [G, N], zero [G, N], input_scale [K]) of w [K, N], for a layer that
    computes (x / input_scale) @ dequantize(q, scale, zero).

    alpha is tried at 0, 1/grid, ..., (grid - 1)/grid and the one with the smallest output error
    ||x @ w - (x / s) @ w_q||^2 on the calibration activations x [..., K] wins. alpha = 0 is s = 1,
    plain round-to-nearest, so the result is never worse than that on x.
    """
    w = jnp.asarray(w, jnp.float32)
    x = jnp.asarray(x, jnp.float32)
    if w.ndim != 2 or x.shape[-1] != w.shape[0]:
        raise ValueError(f"awq needs w [K, N] and calibration activations x [..., K]; got {w.shape} and {x.shape}")
    if not isinstance(grid, int) or grid < 1:
        raise ValueError(f"grid={grid!r} must be a positive int (the number of alphas tried).")
    scheme.groups(w.shape[0])  # a group size that does not divide K fails here, with its message
    return _awq(w, x.reshape(-1, w.shape[0]), scheme, grid)


@functools.partial(jax.jit, static_argnums=(2, 3))
def _awq(w, x, scheme, grid):
    # Inputs (nearly) never active in calibration would get s ~ 0, zeroing their rows: floor them.
    magnitude = jnp.mean(jnp.abs(x), axis=0)
    magnitude = jnp.maximum(magnitude, jnp.maximum(1e-4 * jnp.max(magnitude), jnp.finfo(jnp.float32).tiny))
    target = jnp.dot(x, w, precision=_HIGHEST)

    def input_scale(alpha):
        s = magnitude**alpha
        return s / jnp.sqrt(jnp.max(s) * jnp.min(s))  # around 1 whatever the activations' size

    def quantized(s):
        scaled = w * s[:, None]
        scale, zero = fit(scaled, scheme)
        return quantize(scaled, scale, zero, scheme), scale, zero

    def error(alpha):
        s = input_scale(alpha)
        out = jnp.dot(x / s, dequantize(*quantized(s), scheme), precision=_HIGHEST)
        return jnp.sum((out - target) ** 2)

    alphas = jnp.arange(grid, dtype=jnp.float32) / grid
    s = input_scale(alphas[jnp.argmin(jax.lax.map(error, alphas))])  # one weight copy at a time
    return (*quantized(s), s)
