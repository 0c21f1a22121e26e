"""Quantised dense layers built on `int8_matmul`.

Training (`int8_dense`): activations are quantised per row and weights per output column (or
per K group) on the fly, the forward runs in int8, and the backward is the straight-through
estimator: the gradient of the unquantised `x @ w`, computed in `backward_dtype`.
Inference (`weight_only_dense`): int8 weights dequantised next to a bf16/f32 matmul, halving
weight memory and bandwidth without quantising activations.
"""

import functools

import jax
import jax.numpy as jnp

from pallas_kernels.int8_matmul.api import int8_matmul
from pallas_kernels.int8_matmul.quant import dequantize, quantize


def int8_dense(x, w, *, group_size=None, backward_dtype=jnp.bfloat16, backend="auto"):
    """x [..., K] @ w [K, N] with an int8 forward; gradients by the straight-through estimator."""
    if x.shape[-1] != w.shape[0] or w.ndim != 2:
        raise ValueError(f"int8_dense needs x [..., K] and w [K, N]; got {x.shape} and {w.shape}")
    lead = x.shape[:-1]
    y = _int8_dense(group_size, jnp.dtype(backward_dtype), backend, x.reshape(-1, x.shape[-1]), w)
    return y.reshape(*lead, w.shape[1])


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _int8_dense(group_size, backward_dtype, backend, x, w):
    xq, xs = quantize(x, axis=1, group_size=group_size)
    wq, ws = quantize(w, axis=0, group_size=group_size)
    return int8_matmul(xq, wq, xs, ws, x.dtype, backend=backend)


def _int8_dense_fwd(group_size, backward_dtype, backend, x, w):
    return _int8_dense(group_size, backward_dtype, backend, x, w), (x, w)


def _int8_dense_bwd(group_size, backward_dtype, backend, residuals, g):
    x, w = residuals
    g, xb, wb = g.astype(backward_dtype), x.astype(backward_dtype), w.astype(backward_dtype)
    dx = jnp.dot(g, wb.T, preferred_element_type=jnp.float32)
    dw = jnp.dot(xb.T, g, preferred_element_type=jnp.float32)
    return dx.astype(x.dtype), dw.astype(w.dtype)


_int8_dense.defvjp(_int8_dense_fwd, _int8_dense_bwd)


def quantize_weight(w, *, group_size=None):
    """(int8 [K, N], float32 scales [G, N]) for `weight_only_dense`."""
    return quantize(w, axis=0, group_size=group_size)


def weight_only_dense(x, w_int8, w_scale):
    """x [..., K] @ dequantised weight, in x's dtype (float32 accumulation). Per-column scales
    ([1, N]) multiply the output instead of the weight: the same product, one multiply per output."""
    if w_scale.shape[0] == 1:
        y = jnp.dot(x, w_int8.astype(x.dtype), preferred_element_type=jnp.float32) * w_scale[0]
        return y.astype(x.dtype)
    w = dequantize(w_int8, w_scale, axis=0).astype(x.dtype)
    return jnp.dot(x, w, preferred_element_type=jnp.float32).astype(x.dtype)
