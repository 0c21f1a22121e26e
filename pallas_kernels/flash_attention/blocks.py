"""Which tiles can hold an allowed (query, key) pair, decided once per call outside the kernels.

Per-block minima and maxima of positions and segment ids bound every mask kind, so a tile
whose bounds exclude all pairs is skipped: the GPU loop runs only over the span of live key
blocks and the TPU pipeline re-uses the previous block instead of fetching a dead one. The
test is conservative; the kernel still applies the exact mask inside live tiles.
"""

import typing

import jax
import jax.numpy as jnp


class BlockTables(typing.NamedTuple):
    """int32 tables, each flattened to 1-D so they sit unpadded in scalar memory."""

    live: jax.Array  # [B * nq * nk]: 1 if tile (b, qi, ki) may hold an allowed pair
    kv_fetch: jax.Array  # [B * nq * nk]: key block to have loaded at step (qi, ki)
    q_fetch: jax.Array  # [B * nk * nq]: query block to have loaded at step (ki, qi)
    kv_span: jax.Array  # [B * nq * 2]: first live key block, last + 1
    q_span: jax.Array  # [B * nk * 2]: first live query block, last + 1


def _block_range(x, block):
    b, n = x.shape
    x = x.reshape(b, n // block, block)
    return x.min(-1), x.max(-1)


def live_tiles(cfg, q_pos, kv_pos, q_seg, kv_seg, prefix):
    """Boolean [B, nq, nk]; inputs are the padded [B, T] / [B, S] arrays the kernels see."""
    q_lo, q_hi = (a[:, :, None] for a in _block_range(q_pos, cfg.block_q))
    k_lo, k_hi = (a[:, None, :] for a in _block_range(kv_pos, cfg.block_k))
    live = jnp.ones((q_pos.shape[0], q_lo.shape[1], k_lo.shape[2]), bool)
    if cfg.causal or cfg.prefix:
        causal = k_lo <= q_hi
        if cfg.prefix:
            causal |= k_lo < prefix[:, None, None]
        live &= causal
    if cfg.window is not None:
        gap = jnp.maximum(jnp.maximum(k_lo - q_hi, q_lo - k_hi), 0)
        local = gap < cfg.window
        if cfg.sinks:
            local |= k_lo < cfg.sinks
        live &= local
    if cfg.segments:
        qs_lo, qs_hi = (a[:, :, None] for a in _block_range(q_seg, cfg.block_q))
        ks_lo, ks_hi = (a[:, None, :] for a in _block_range(kv_seg, cfg.block_k))
        live &= jnp.maximum(qs_lo, jnp.maximum(ks_lo, 1)) <= jnp.minimum(qs_hi, ks_hi)
    return live


def _fetch(live):
    """Along the last axis: own index when live, else the last live one before (or the first)."""
    n = live.shape[-1]
    idx = jnp.where(live, jnp.arange(n, dtype=jnp.int32), -1)
    filled = jax.lax.cummax(idx, axis=live.ndim - 1)
    first = jnp.argmax(live, axis=-1).astype(jnp.int32)[..., None]
    return jnp.where(filled < 0, first, filled)


def _span(live):
    """[first live, last live + 1] along the last axis; [0, 0] when none is live."""
    n = live.shape[-1]
    idx = jnp.arange(n, dtype=jnp.int32)
    any_live = live.any(-1)
    first = jnp.where(any_live, jnp.argmax(live, -1), 0)
    last = jnp.where(any_live, jnp.max(jnp.where(live, idx + 1, 0), -1), 0)
    return jnp.stack([first, last], -1).astype(jnp.int32)


def block_tables(live):
    live_t = jnp.swapaxes(live, 1, 2)
    return BlockTables(
        live=live.astype(jnp.int32).reshape(-1),
        kv_fetch=_fetch(live).reshape(-1),
        q_fetch=_fetch(live_t).reshape(-1),
        kv_span=_span(live).reshape(-1),
        q_span=_span(live_t).reshape(-1),
    )
