"""Math on one (query block, key block) tile, shared by the TPU and GPU kernels.

Backends differ in how they walk tiles (a grid axis on TPU, a loop on GPU) and how they load
them; what happens inside a tile is written once, here, on plain arrays: query-side vectors are
columns `[bq, 1]`, key-side vectors rows `[1, bk]`, scores `[bq, bk]` in float32.
"""

import dataclasses
import typing

import jax
import jax.numpy as jnp

from pallas_kernels.flash_attention.relpos import RelposSteps

# Finite, so that `m_prev - m_new` stays finite while a row has seen only masked keys.
MASK_VALUE = -1e30


@dataclasses.dataclass(frozen=True)
class Config:
    """Everything static about one attention call (hashable: it keys the kernel caches)."""

    sm_scale: float
    block_q: int
    block_k: int
    group: int  # query heads per kv head
    causal: bool = False
    prefix: bool = False  # bidirectional over kv_pos < prefix_length[b], causal elsewhere
    window: int | None = None  # |q_pos - kv_pos| < window ...
    sinks: int = 0  # ... or kv_pos < sinks
    segments: bool = False
    q_positions: bool = False  # positions come from arrays, not from the index
    kv_positions: bool = False
    kv_len: int | None = None  # keys at index >= kv_len are padding added by the wrapper
    relpos: RelposSteps | None = None
    alibi: bool = False
    bias: bool = False  # general additive bias tile
    precision: typing.Any = None

    @property
    def num_weights(self):
        """Columns of the per-head weight matrix: relpos steps, then the ALiBi slope."""
        return (len(self.relpos.thresholds) if self.relpos else 0) + int(self.alibi)

    @property
    def needs_distance(self):
        return self.relpos is not None or self.alibi


class Tile(typing.NamedTuple):
    """Coordinates of one tile. Unused fields are None."""

    q_pos: jax.Array  # [bq, 1] int32
    kv_pos: jax.Array  # [1, bk] int32
    kv_idx: jax.Array  # [1, bk] int32, index in the padded key axis
    q_seg: typing.Any = None  # [bq, 1]
    kv_seg: typing.Any = None  # [1, bk]
    prefix: typing.Any = None  # scalar int32


def _and(a, b):
    return b if a is None else jnp.logical_and(a, b)


def allowed(cfg: Config, t: Tile):
    """Boolean [bq, bk] of allowed (query, key) pairs, or None when every pair is allowed."""
    shape = (t.q_pos.shape[0], t.kv_pos.shape[1])
    q_pos = jnp.broadcast_to(t.q_pos, shape)
    kv_pos = jnp.broadcast_to(t.kv_pos, shape)
    ok = None
    if cfg.causal or cfg.prefix:
        causal = kv_pos <= q_pos
        if cfg.prefix:
            causal = jnp.logical_or(causal, kv_pos < t.prefix)
        ok = causal
    if cfg.window is not None:
        local = jnp.abs(q_pos - kv_pos) < cfg.window
        if cfg.sinks:
            local = jnp.logical_or(local, kv_pos < cfg.sinks)
        ok = _and(ok, local)
    if cfg.segments:
        q_seg = jnp.broadcast_to(t.q_seg, shape)
        kv_seg = jnp.broadcast_to(t.kv_seg, shape)
        ok = _and(ok, jnp.logical_and(q_seg == kv_seg, kv_seg != 0))
    if cfg.kv_len is not None:
        ok = _and(ok, jnp.broadcast_to(t.kv_idx, shape) < cfg.kv_len)
    return ok


def _features(cfg: Config, t: Tile):
    """Yield (column, feature) for the positional-bias terms: bias = sum_k w[k] * feature_k."""
    shape = (t.q_pos.shape[0], t.kv_pos.shape[1])
    d = jnp.broadcast_to(t.kv_pos, shape) - jnp.broadcast_to(t.q_pos, shape)
    col = 0
    if cfg.relpos is not None:
        code = cfg.relpos.distance_code(d)
        for threshold in cfg.relpos.thresholds:
            yield col, code >= threshold
            col += 1
    if cfg.alibi:
        yield col, -jnp.abs(d).astype(jnp.float32)


def positional_bias(cfg: Config, t: Tile, weight):
    """T5 relpos + ALiBi bias tile; `weight(k)` reads this head's k-th weight (a scalar)."""
    bias = 0.0
    for k, feature in _features(cfg, t):
        if feature.dtype == jnp.bool_:
            bias = bias + jnp.where(feature, weight(k), 0.0)
        else:
            bias = bias + weight(k) * feature
    return bias


def positional_bias_grads(cfg: Config, t: Tile, ds, width):
    """Row [1, width] whose k-th entry is sum(ds * feature_k): this tile's share of d weights."""
    lane = jax.lax.broadcasted_iota(jnp.int32, (1, width), 1)
    row = jnp.zeros((1, width), jnp.float32)
    for k, feature in _features(cfg, t):
        term = jnp.where(feature, ds, 0.0) if feature.dtype == jnp.bool_ else ds * feature
        total = jnp.sum(jnp.sum(term, axis=1, keepdims=True), axis=0, keepdims=True)
        row = row + jnp.where(lane == k, total, 0.0)
    return row


def _dot(cfg, a, b, contract):
    """2-D matmul with float32 accumulation; `contract` = (dim of a, dim of b)."""
    dims = (((contract[0],), (contract[1],)), ((), ()))
    return jax.lax.dot_general(a, b, dims, precision=cfg.precision, preferred_element_type=jnp.float32)


def scores(cfg: Config, t: Tile, q, k, weight, bias_tile):
    """Masked float32 logits [bq, bk] and the mask (or None)."""
    s = _dot(cfg, q, k, (1, 1)) * cfg.sm_scale
    if cfg.needs_distance:
        s = s + positional_bias(cfg, t, weight)
    if cfg.bias:
        s = s + bias_tile.astype(jnp.float32)
    mask = allowed(cfg, t)
    if mask is not None:
        s = jnp.where(mask, s, MASK_VALUE)
    return s, mask


def forward_step(cfg: Config, t: Tile, q, k, v, weight, bias_tile, carry):
    """One online-softmax step: (m, l, acc) after also attending to this key block."""
    m_prev, l_prev, acc_prev = carry
    s, mask = scores(cfg, t, q, k, weight, bias_tile)
    m_new = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))
    alpha = jnp.exp(m_prev - m_new)
    p = jnp.exp(s - m_new)
    if mask is not None:
        p = jnp.where(mask, p, 0.0)  # rows that saw only masked keys must stay empty
    l_new = alpha * l_prev + jnp.sum(p, axis=1, keepdims=True)
    acc_new = alpha * acc_prev + _dot(cfg, p.astype(v.dtype), v, (1, 0))
    return m_new, l_new, acc_new


def forward_finish(m, l, acc):
    """Normalised output and log-sum-exp; rows with no allowed key give 0 (and lse 0)."""
    empty = l == 0.0
    out = acc / jnp.where(empty, 1.0, l)
    lse = jnp.where(empty, 0.0, m + jnp.log(jnp.where(empty, 1.0, l)))
    return out, lse


def backward_step(cfg: Config, t: Tile, q, k, v, do, lse, delta, weight, bias_tile):
    """Probabilities p and logit gradients ds = p * (dp - delta) for one tile, both float32."""
    s, mask = scores(cfg, t, q, k, weight, bias_tile)
    p = jnp.exp(s - lse)
    if mask is not None:
        p = jnp.where(mask, p, 0.0)
    dp = _dot(cfg, do, v, (1, 1))
    return p, p * (dp - delta)


def grad_dq(cfg, ds, k):
    return _dot(cfg, ds.astype(k.dtype), k, (1, 0)) * cfg.sm_scale


def grad_dk(cfg, ds, q):
    return _dot(cfg, ds.astype(q.dtype), q, (0, 0)) * cfg.sm_scale


def grad_dv(cfg, p, do):
    return _dot(cfg, p.astype(do.dtype), do, (0, 0))


def make_tile(cfg: Config, q0, k0, load_q, load_kv, prefix):
    """Tile coordinates for query rows from `q0` and key columns from `k0`.

    `load_q(name)` / `load_kv(name)` read this tile's slice of a query-side ([bq, 1]) or
    key-side ([1, bk]) input; backends differ only in how they slice.
    """
    q_idx = q0 + jax.lax.broadcasted_iota(jnp.int32, (cfg.block_q, 1), 0)
    kv_idx = k0 + jax.lax.broadcasted_iota(jnp.int32, (1, cfg.block_k), 1)
    return Tile(
        q_pos=load_q("q_pos") if cfg.q_positions else q_idx,
        kv_pos=load_kv("kv_pos") if cfg.kv_positions else kv_idx,
        kv_idx=kv_idx,
        q_seg=load_q("q_seg") if cfg.segments else None,
        kv_seg=load_kv("kv_seg") if cfg.segments else None,
        prefix=prefix,
    )
