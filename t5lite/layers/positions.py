"""Position information: T5 relative bias, RoPE, ALiBi, sinusoidal and learned absolute.

Every function takes explicit integer positions ([batch or 1, length]) rather than
assuming 0..L-1, so packed examples (positions restart per segment) and cached
decoding (positions continue from the cache index) need no special cases.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax.numpy as jnp
import numpy as np


def relative_position_bucket(
    relative_position, bidirectional: bool = True, num_buckets: int = 32, max_distance: int = 128
):
    """T5's bucket of `key_position - query_position`: exact for small offsets, log-spaced up to
    `max_distance`, clipped beyond. Unidirectional buckets only distinguish offsets into the past."""
    bucket = jnp.zeros_like(relative_position)
    if bidirectional:
        num_buckets //= 2
        bucket = bucket + (relative_position > 0).astype(relative_position.dtype) * num_buckets
        distance = jnp.abs(relative_position)
    else:
        distance = jnp.maximum(-relative_position, 0)
    max_exact = num_buckets // 2
    log_ratio = jnp.log(jnp.maximum(distance, max_exact).astype(jnp.float32) / max_exact) / math.log(
        max_distance / max_exact
    )
    large = max_exact + (log_ratio * (num_buckets - max_exact)).astype(relative_position.dtype)
    large = jnp.minimum(large, num_buckets - 1)
    return bucket + jnp.where(distance < max_exact, distance, large)


class RelativePositionBias(nn.Module):
    """T5's learned scalar per (head, bucket); one table per stack. It returns the table itself:
    XLA attention materialises the bias with `relative_position_bias`, the Pallas kernel computes
    it per tile from the table."""

    num_heads: int
    num_buckets: int = 32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self):
        return self.param(
            "rel_embedding",
            nn.with_logical_partitioning(nn.initializers.normal(1.0), ("heads", "relpos_buckets")),
            (self.num_heads, self.num_buckets),
            self.param_dtype,
        )


def relative_position_bias(table, query_positions, key_positions, bidirectional: bool = True, max_distance: int = 128):
    """table [heads, buckets] looked up at each pair's bucket: [batch, heads, q, k] float32."""
    relative = key_positions[:, None, :] - query_positions[:, :, None]
    buckets = relative_position_bucket(relative, bidirectional, table.shape[1], max_distance)
    return jnp.moveaxis(jnp.take(table.astype(jnp.float32), buckets, axis=1), 0, 1)


def rope_frequencies(head_dim: int, theta: float = 10_000.0, scaling: str = "none", factor: float = 1.0):
    """Inverse frequencies of RoPE. `linear` divides positions by `factor` (position interpolation);
    `ntk` raises the base to theta * factor**(d/(d-2)) so the lowest frequency stretches by `factor`."""
    if scaling == "ntk":
        theta = theta * factor ** (head_dim / (head_dim - 2))
    inv_freq = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))
    if scaling == "linear":
        inv_freq = inv_freq / factor
    return jnp.asarray(inv_freq, jnp.float32)


def rope_cos_sin(positions, inv_freq):
    """cos and sin of shape [batch, length, head_dim] for the rotate-half convention."""
    angles = positions[..., None].astype(jnp.float32) * inv_freq
    angles = jnp.concatenate([angles, angles], axis=-1)
    return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x, cos, sin):
    """Rotates x [batch, length, heads, head_dim] by its position (first half pairs with second)."""
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]
    return (x.astype(jnp.float32) * cos + rotated.astype(jnp.float32) * sin).astype(x.dtype)


def alibi_slopes(num_heads: int) -> np.ndarray:
    """Press et al. (2022): 2^(-8i/n) for n a power of two; otherwise the closest power of two's
    slopes followed by every other slope of twice that many heads."""

    def power_of_two(n):
        return [2.0 ** (-8.0 * (i + 1) / n) for i in range(n)]

    if math.log2(num_heads).is_integer():
        return np.asarray(power_of_two(num_heads))
    closest = 2 ** math.floor(math.log2(num_heads))
    return np.asarray(power_of_two(closest) + list(alibi_slopes(2 * closest)[0::2][: num_heads - closest]))


def alibi_bias(query_positions, key_positions, num_heads: int):
    """-slope * |q - k| per head: [batch, heads, q, k]."""
    return slope_bias(jnp.asarray(alibi_slopes(num_heads), jnp.float32), query_positions, key_positions)


def slope_bias(slopes, query_positions, key_positions):
    """-slopes[h] * |q - k|: [batch, heads, q, k] (ALiBi for `alibi_slopes`)."""
    distance = jnp.abs(query_positions[:, :, None] - key_positions[:, None, :]).astype(jnp.float32)
    return -slopes[None, :, None, None] * distance[:, None]


def sinusoidal_embedding(positions, features: int, max_timescale: float = 10_000.0):
    """Vaswani et al. sinusoids, laid out as [sin(p·w_0..w_{d/2-1}), cos(p·w_0..w_{d/2-1})]."""
    inv_freq = 1.0 / (max_timescale ** (np.arange(0, features, 2, dtype=np.float64) / features))
    angles = positions[..., None].astype(jnp.float32) * jnp.asarray(inv_freq, jnp.float32)
    return jnp.concatenate([jnp.sin(angles), jnp.cos(angles)], axis=-1)


class LearnedPositionEmbedding(nn.Module):
    max_length: int
    features: int
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, positions):
        table = self.param(
            "embedding",
            nn.with_logical_partitioning(nn.initializers.normal(0.02), ("abspos_buckets", "embed")),
            (self.max_length, self.features),
            self.param_dtype,
        )
        return jnp.take(table, positions, axis=0).astype(self.dtype)
