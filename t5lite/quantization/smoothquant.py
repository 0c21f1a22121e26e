"""SmoothQuant (Xiao et al. 2023): W8A8 inference for activations with outlier channels.
Activation outliers sit in a few fixed input channels, which per-token int8 cannot represent
without crushing the other channels. Dividing each input channel by s and multiplying the
weight's row by it, x @ w = (x / s) @ (diag(s) w), moves part of that range into the weight,
which quantises per output column and tolerates it. The run-time product is
`t5lite.layers.int8_matmul.smoothquant_matmul`.
"""

from __future__ import annotations

import jax.numpy as jnp

from pallas_kernels.int8_matmul import quantize


def smoothing_factors(x_absmax, w, alpha=0.5):
    """s [K] float32: max|x_k|^alpha / max_n |w_kn|^(1 - alpha) from calibration abs-maxima
    `x_absmax` [K] and w [K, N]. Channels with no activation or no weight keep s = 1."""
    x_absmax = jnp.asarray(x_absmax, jnp.float32)
    w = jnp.asarray(w, jnp.float32)
    if w.ndim != 2 or x_absmax.shape != (w.shape[0],):
        raise ValueError(f"smoothing_factors needs x_absmax [K] and w [K, N]; got {x_absmax.shape} and {w.shape}")
    if not 0 <= alpha <= 1:
        raise ValueError(f"alpha={alpha!r} must lie in [0, 1] (the share of the range moved into the weight).")
    w_absmax = jnp.max(jnp.abs(w), axis=1)
    live = (x_absmax > 0) & (w_absmax > 0)
    return jnp.where(live, x_absmax, 1.0) ** alpha / jnp.where(live, w_absmax, 1.0) ** (1 - alpha)


def smoothquant_weights(w, s):
    """(q int8 [K, N], w_scale [1, N]): diag(s) w, symmetric int8 per output column."""
    w = jnp.asarray(w, jnp.float32)
    if w.ndim != 2 or jnp.shape(s) != (w.shape[0],):
        raise ValueError(f"smoothquant_weights needs w [K, N] and s [K]; got {w.shape} and {jnp.shape(s)}")
    return quantize(w * jnp.asarray(s, jnp.float32)[:, None], axis=0)
