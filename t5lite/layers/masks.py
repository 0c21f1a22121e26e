"""Boolean attention masks of shape [batch, 1, queries, keys]; True means "may attend".

Masks are built from per-token facts (validity, segment ids, positions, the prefix
region) so that the same code serves full forward passes, packed examples and
cached decoding.
"""

from __future__ import annotations

import jax.numpy as jnp


def pairwise(query_values, key_values, fn):
    return fn(query_values[:, :, None], key_values[:, None, :])[:, None]


def attention_mask(
    *,
    query_positions,
    key_positions,
    query_valid=None,
    key_valid=None,
    query_segments=None,
    key_segments=None,
    causal=False,
    query_bidirectional=None,
    key_bidirectional=None,
    sliding_window=None,
    attention_sinks=0,
):
    """Combines every rule that applies.

    causal: a query sees keys at positions <= its own; pairs where both tokens are in the
      bidirectional (prefix-LM inputs) region see each other regardless.
    sliding_window: keys fewer than `sliding_window` positions away (on the allowed side);
      keys at positions < `attention_sinks` stay visible (Λ-shaped mask).
    """
    mask = jnp.ones((query_positions.shape[0], 1, query_positions.shape[1], key_positions.shape[1]), bool)
    if query_valid is not None:
        mask &= pairwise(query_valid, key_valid, jnp.logical_and)
    if query_segments is not None:
        mask &= pairwise(query_segments, key_segments, jnp.equal)
    distance = pairwise(query_positions, key_positions, jnp.subtract)  # query minus key
    if causal:
        allowed = distance >= 0
        if query_bidirectional is not None:
            allowed |= pairwise(query_bidirectional, key_bidirectional, jnp.logical_and)
        mask &= allowed
    if sliding_window is not None:
        local = jnp.abs(distance) < sliding_window
        if attention_sinks:
            local |= (key_positions < attention_sinks)[:, None, None, :]
        mask &= local
    return mask


def cross_attention_mask(query_valid, key_valid, query_segments=None, key_segments=None):
    """Decoder queries over encoder keys: both valid and, when packed, in the same segment."""
    mask = pairwise(query_valid, key_valid, jnp.logical_and)
    if query_segments is not None:
        mask &= pairwise(query_segments, key_segments, jnp.equal)
    return mask
