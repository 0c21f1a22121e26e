"""GPTQ (Frantar et al. 2022): quantise a weight one input row at a time, pushing each row's
rounding error onto the rows not yet quantised through the inverse Hessian of the layer's
reconstruction error ||X W - X W_q||^2, whose Hessian is H = X^T X.

The solver runs in numpy float64 on the host: the Cholesky factor of H^-1 for real activations
is badly conditioned (float32 needs much heavier damping to stay positive definite), and the
pass over the K inputs is sequential anyway; it is a one-off, offline step.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import scipy.linalg

from t5lite.layers.quant import Scheme, dequantize, fit, quantize


def hessian(x):
    """X^T X [K, K] in float32 of activations x [..., K] (summed over tokens), for `gptq`."""
    x = jnp.asarray(x, jnp.float32)
    x = x.reshape(-1, x.shape[-1])
    return jnp.dot(x.T, x, precision=jax.lax.Precision.HIGHEST)


def gptq(w, hessian, scheme: Scheme, damp=0.01, block_size=128):
    """(q int8 [K, N], scale [G, N], zero [G, N]) of w [K, N] for inputs with `hessian` [K, K].

    `damp` times the mean diagonal is added to H's diagonal; inputs never active (H_kk = 0) get
    weight 0. Errors are applied lazily: within a block of `block_size` inputs row by row, to the
    later rows once per block. Blocks also start at every group start, so a group's scales are
    fitted on rows that already carry all earlier errors. Per channel and per tensor, the scales
    are fitted once on the whole weight (dead rows zeroed), before any update.
    """
    w = np.array(w, np.float64)
    h = np.array(hessian, np.float64)
    if w.ndim != 2 or h.shape != (w.shape[0], w.shape[0]):
        raise ValueError(f"gptq needs w [K, N] and hessian [K, K]; got {w.shape} and {h.shape}")
    if damp < 0:
        raise ValueError(f"damp={damp!r} must be >= 0 (a fraction of the mean Hessian diagonal).")
    if not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"block_size={block_size!r} must be a positive int.")
    k_in, n_out = w.shape
    scheme.groups(k_in)  # a group size that does not divide K fails here, before the work
    dead = np.diag(h) == 0
    h[dead, dead] = 1.0
    w[dead] = 0.0
    h[np.diag_indices(k_in)] += damp * np.mean(np.diag(h))
    u = _inverse_cholesky(h)

    group = scheme.group_size
    if group is None:
        scale, zero = fit(w, scheme)
    scales, zeros = [], []
    q = np.empty((k_in, n_out), np.int8)
    starts = sorted(set(range(0, k_in, block_size)) | set(range(0, k_in, group or k_in)))
    for b0, b1 in zip(starts, starts[1:] + [k_in]):
        if group is not None and b0 % group == 0:
            scale, zero = fit(w[b0 : b0 + group], scheme)
            scales.append(scale)
            zeros.append(zero)
        err = np.empty((b1 - b0, n_out))
        for k in range(b0, b1):
            q_k, deq_k = _round_row(w[k].astype(np.float32), scale, zero, scheme)
            q[k] = q_k
            err[k - b0] = (w[k] - np.asarray(deq_k, np.float64)) / u[k, k]
            w[k + 1 : b1] -= np.outer(u[k, k + 1 : b1], err[k - b0])
        w[b1:] -= u[b0:b1, b1:].T @ err
    if group is not None:
        scale, zero = jnp.concatenate(scales), jnp.concatenate(zeros)
    return jnp.asarray(q), scale, zero


def _inverse_cholesky(h):
    """Upper Cholesky factor U of H^-1 (H^-1 = U^T U): row k holds how the error of input k
    spreads to the later inputs.

    With the inputs in reverse order (J), J H J = L L^T gives H^-1 = V^T V for the upper
    triangular V = J L^-1 J: one factorisation and one triangular inverse (2-3x faster at K = 4096
    than inverting H and factorising the inverse).
    """
    try:
        lower = np.linalg.cholesky(h[::-1, ::-1])
    except np.linalg.LinAlgError:
        raise ValueError(
            "The dampened Hessian is not positive definite; raise `damp` or calibrate on more tokens."
        ) from None
    return scipy.linalg.lapack.dtrtri(lower, lower=1)[0][::-1, ::-1]


@functools.partial(jax.jit, static_argnums=3)
def _round_row(row, scale, zero, scheme):
    """One input row [N] quantised with its group's scale and zero point, and dequantised."""
    q = quantize(row[None], scale, zero, scheme)
    return q[0], dequantize(q, scale, zero, scheme)[0]
