"""What `int8_matmul` computes, written as a float matmul of the dequantised operands."""

import jax
import jax.numpy as jnp


def int8_matmul_reference(a, b, a_scale, b_scale, *, a_zero_point=0, b_zero_point=0, dtype=jnp.float32):
    """((a - a_zero) * a_scale) @ ((b - b_zero) * b_scale) in `dtype` (use float64 for exactness).

    Scale layouts as in `int8_matmul`; per-group scales repeat over their K // G positions.
    """
    K = a.shape[1]
    a_scale = _matrix(a_scale, dtype, vector_axis=1)  # [M or 1, G or 1]
    b_scale = _matrix(b_scale, dtype, vector_axis=0)  # [G or 1, N or 1]
    a_scale = jnp.repeat(a_scale, K // a_scale.shape[1], axis=1)
    b_scale = jnp.repeat(b_scale, K // b_scale.shape[0], axis=0)
    a_zero = jnp.reshape(jnp.asarray(a_zero_point, dtype), (-1, 1))
    b_zero = jnp.reshape(jnp.asarray(b_zero_point, dtype), (1, -1))
    a_deq = (a.astype(dtype) - a_zero) * a_scale
    b_deq = (b.astype(dtype) - b_zero) * b_scale
    return jnp.dot(a_deq, b_deq, precision=jax.lax.Precision.HIGHEST)


def _matrix(scale, dtype, vector_axis):
    scale = jnp.asarray(scale, dtype)
    if scale.ndim == 0:
        return scale.reshape(1, 1)
    return jnp.expand_dims(scale, vector_axis) if scale.ndim == 1 else scale
