"""The kernels' product in plain XLA ops, for platforms Pallas cannot compile for (the CPU):
int8 x int8 in exact int32 per scale group, zero points removed in int32, scales applied once
per group. What `backend="auto"` runs on a CPU; the kernels' numerics are tested in interpret mode."""

import jax.numpy as jnp


def matmul(a, b, a_scale, b_scale, a_zero, b_zero, out_dtype):
    """a [M, K], b [K, N] int8; a_scale [M, G], b_scale [G, N]; zero points [M, 1] / [1, N] or None."""
    (M, K), N, G = a.shape, b.shape[1], a_scale.shape[1]
    a32, b32 = a.astype(jnp.int32), b.astype(jnp.int32)
    if a_zero is not None:
        a32, b32 = a32 - a_zero, b32 - b_zero
    per_group = jnp.einsum(
        "mgk,gkn->gmn", a32.reshape(M, G, K // G), b32.reshape(G, K // G, N), preferred_element_type=jnp.int32
    )
    scaled = per_group.astype(jnp.float32) * a_scale.T[:, :, None] * b_scale[:, None, :]
    return jnp.sum(scaled, axis=0).astype(out_dtype)
