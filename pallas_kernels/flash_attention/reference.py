"""Plain-XLA attention with the same arguments and semantics as the kernel.

It materialises the [B, H, T, S] scores: it is the specification the kernels are tested
against (in float64) and the "XLA attention" the benchmarks compare with. Masks and biases
are written here independently of the kernels' tile code.
"""

import jax
import jax.numpy as jnp

from pallas_kernels.flash_attention.relpos import relative_position_bucket


def attention_mask(
    q_pos, kv_pos, *, causal=False, prefix_length=None, window=None, sinks=0, q_segment_ids=None, kv_segment_ids=None
):
    """Boolean [B, T, S]: may query t attend to key s? (positions [B, T] / [B, S])."""
    qp, kp = q_pos[:, :, None], kv_pos[:, None, :]
    mask = jnp.ones(jnp.broadcast_shapes(qp.shape, kp.shape), bool)
    if causal or prefix_length is not None:
        rule = kp <= qp
        if prefix_length is not None:
            rule |= kp < jnp.asarray(prefix_length)[:, None, None]
        mask &= rule
    if window is not None:
        mask &= (jnp.abs(qp - kp) < window) | (kp < sinks)
    if q_segment_ids is not None:
        qs, ks = q_segment_ids[:, :, None], kv_segment_ids[:, None, :]
        mask &= (qs == ks) & (ks != 0)
    return mask


def attention_bias(q_pos, kv_pos, num_heads, *, relpos_bias=None, alibi_slopes=None, bias=None, dtype=jnp.float32):
    """Additive [B, H, T, S] bias (or 0.0 when there is none)."""
    d = kv_pos[:, None, :] - q_pos[:, :, None]  # [B, T, S]
    total = jnp.zeros((), dtype)
    if relpos_bias is not None:
        table, bidirectional, max_distance = relpos_bias
        buckets = relative_position_bucket(
            d, bidirectional=bidirectional, num_buckets=table.shape[1], max_distance=max_distance
        )
        total = total + jnp.moveaxis(table.astype(dtype)[:, buckets], 0, 1)
    if alibi_slopes is not None:
        total = total - alibi_slopes.astype(dtype)[None, :, None, None] * jnp.abs(d).astype(dtype)[:, None]
    if bias is not None:
        total = total + bias.astype(dtype)
    return total


def attention_reference(
    q,
    k,
    v,
    *,
    causal=False,
    segment_ids=None,
    prefix_length=None,
    relpos_bias=None,
    alibi_slopes=None,
    bias=None,
    window=None,
    sinks=0,
    q_positions=None,
    kv_positions=None,
    sm_scale=None,
):
    """Attention over [B, T, H, D] queries and [B, S, KVH, D] keys/values, in q's dtype.

    Rows with no allowed key give zeros, as in the kernel.
    """
    B, T, H, D = q.shape
    S, kv_heads = k.shape[1], k.shape[2]
    k = jnp.repeat(k, H // kv_heads, axis=2)
    v = jnp.repeat(v, H // kv_heads, axis=2)
    q_pos = _positions(q_positions, B, T)
    kv_pos = _positions(kv_positions, B, S)
    scale = D**-0.5 if sm_scale is None else sm_scale
    dtype = jnp.promote_types(q.dtype, jnp.float32)
    s = jnp.einsum("bthd,bshd->bhts", q.astype(dtype), k.astype(dtype)) * scale
    s = s + attention_bias(q_pos, kv_pos, H, relpos_bias=relpos_bias, alibi_slopes=alibi_slopes, bias=bias, dtype=dtype)
    q_seg, kv_seg = (segment_ids, segment_ids) if not isinstance(segment_ids, (tuple, list)) else segment_ids
    mask = attention_mask(
        q_pos,
        kv_pos,
        causal=causal,
        prefix_length=prefix_length,
        window=window,
        sinks=sinks,
        q_segment_ids=q_seg,
        kv_segment_ids=kv_seg,
    )[:, None]
    s = jnp.where(mask, s, -jnp.inf)
    m = jax.lax.stop_gradient(jnp.max(s, axis=-1, keepdims=True))
    p = jnp.where(mask, jnp.exp(s - jnp.where(jnp.isfinite(m), m, 0.0)), 0.0)
    total = jnp.sum(p, axis=-1, keepdims=True)
    p = p / jnp.where(total == 0, 1.0, total)
    return jnp.einsum("bhts,bshd->bthd", p, v.astype(dtype)).astype(q.dtype)


def _positions(pos, batch, length):
    if pos is None:
        return jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length))
    return jnp.broadcast_to(jnp.asarray(pos, jnp.int32), (batch, length))
