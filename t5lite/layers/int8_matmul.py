"""The run-time int8 products of quantised layers.

LLM.int8() (Dettmers et al. 2022): int8 inference that stays accurate when a few input features
carry huge activations. Those outlier features go through a float matmul; the rest use vector-wise
int8 (one scale per token and per output column), so the outliers no longer inflate every token's
scale. SmoothQuant (Xiao et al. 2023): W8A8 on inputs divided by per-channel smoothing factors
(made offline by `t5lite.quantization.smoothquant`).
"""

from __future__ import annotations

import jax.numpy as jnp

from pallas_kernels.int8_matmul import int8_matmul, quantize, weight_only_dense


def vectorwise_matmul(x, q, w_scale, out_dtype=None, backend="auto"):
    """x [..., K] @ (q int8 [K, N] * w_scale [1, N] or [N]) -> [..., N] in `out_dtype` (default x's).

    x is quantised to int8 per token (row abs-max) at run time; the product accumulates exactly
    in int32 and both scales apply once at the end.
    """
    rows, w_scale = _operands(x, q, w_scale)
    xq, x_scale = quantize(rows, axis=1)
    out = int8_matmul(xq, q, x_scale, w_scale, out_dtype or rows.dtype, backend=backend)
    return out.reshape(*x.shape[:-1], q.shape[1])


def llm_int8_matmul(x, q, w_scale, threshold=6.0, backend="auto"):
    """x [..., K] @ (q int8 [K, N] * w_scale [1, N] or [N]) -> [..., N] in x's dtype.

    Input features where any |x| >= `threshold` in this call are outliers: they multiply the
    dequantised weight in x's dtype (float32 accumulation), the others go through
    `vectorwise_matmul`. Shapes stay static under jit because both parts mask columns of x instead
    of gathering them; the float part is therefore a full-size matmul over mostly zero columns
    (a gather of the few outlier columns would be the faster variant).
    """
    rows, w_scale = _operands(x, q, w_scale)
    outlier = jnp.any(jnp.abs(rows) >= threshold, axis=0)
    regular = vectorwise_matmul(jnp.where(outlier, 0, rows).astype(jnp.float32), q, w_scale, jnp.float32, backend)
    outliers = weight_only_dense(jnp.where(outlier, rows, 0), q, w_scale)
    return (regular + outliers.astype(jnp.float32)).astype(rows.dtype).reshape(*x.shape[:-1], q.shape[1])


def _operands(x, q, w_scale):
    """x as rows [M, K] and w_scale as [1, N], after checking the shapes."""
    if q.ndim != 2 or q.dtype != jnp.int8 or x.shape[-1] != q.shape[0]:
        raise ValueError(
            f"Expected x [..., K] and an int8 weight [K, N]; got x {x.shape} and weight {q.shape} {q.dtype}"
        )
    if jnp.size(w_scale) != q.shape[1]:
        raise ValueError(
            f"w_scale must hold one scale per output column ([1, {q.shape[1]}] or "
            f"[{q.shape[1]}]); got shape {jnp.shape(w_scale)}"
        )
    return jnp.asarray(x).reshape(-1, x.shape[-1]), jnp.reshape(w_scale, (1, q.shape[1]))


def smoothquant_matmul(x, q, w_scale, s, backend="auto"):
    """x [..., K] @ w -> [..., N] in x's dtype, from `smoothquant_weights(w, s)`: x / s is
    quantised to int8 per token at run time and multiplied in int8 with exact int32 accumulation."""
    x = jnp.asarray(x)
    if jnp.shape(s) != (x.shape[-1],):
        raise ValueError(f"s must have one factor per input feature ({x.shape[-1]}); got shape {jnp.shape(s)}")
    return vectorwise_matmul(x.astype(jnp.float32) / s, q, w_scale, x.dtype, backend)
