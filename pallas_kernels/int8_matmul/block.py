"""Math on one (row block, column block, K block) step, shared by the TPU and GPU kernels.

A K block holds `subs` scale groups (1 when scales are per tensor or per channel). Each group is
one int8 x int8 -> int32 matmul; zero points are removed exactly in int32 through row and
column sums: (a - za)(b - zb) = ab - za*colsum(b) - zb*rowsum(a) + n*za*zb, n counting only
real (unpadded) K positions.
"""

import dataclasses

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class Config:
    block_m: int
    block_n: int
    block_k: int
    k: int  # real K (before padding)
    groups: int  # scale groups along K; 1 means one scale per row/column for all of K
    zero_points: bool

    @property
    def group_size(self):
        """K positions per group step inside a block."""
        return self.block_k if self.groups == 1 else self.k // self.groups

    @property
    def subs(self):
        return self.block_k // self.group_size

    @property
    def acc_dtype(self):
        """int32 across all of K when one scale covers it; float32 across differently scaled groups."""
        return jnp.int32 if self.groups == 1 else jnp.float32


def _column(x, idx):
    """x[:, idx] as a [rows, 1] column, for a traced idx (one-hot sum: no dynamic lane slicing)."""
    lane = jax.lax.broadcasted_iota(jnp.int32, x.shape, 1)
    return jnp.sum(jnp.where(lane == idx, x, 0.0), axis=1, keepdims=True)


def _row(x, idx):
    sub = jax.lax.broadcasted_iota(jnp.int32, x.shape, 0)
    return jnp.sum(jnp.where(sub == idx, x, 0.0), axis=0, keepdims=True)


def step(cfg: Config, kk, a, b, a_scale, b_scale, a_zero, b_zero):
    """This K block's contribution to the accumulator (cfg.acc_dtype, [bm, bn]).

    a [bm, bk] int8, b [bk, bn] int8; a_scale [bm, G] / b_scale [G, bn] float32 (used only when
    groups > 1); a_zero [bm, 1] / b_zero [1, bn] int32 or None.
    """
    g = cfg.group_size
    total = jnp.zeros((cfg.block_m, cfg.block_n), cfg.acc_dtype)
    for s in range(cfg.subs):
        a_s, b_s = a[:, s * g : (s + 1) * g], b[s * g : (s + 1) * g, :]
        part = jax.lax.dot_general(a_s, b_s, (((1,), (0,)), ((), ())), preferred_element_type=jnp.int32)
        if cfg.zero_points:
            start = kk * cfg.block_k + s * g
            count = jnp.clip(cfg.k - start, 0, g)
            row_sum = jnp.sum(a_s.astype(jnp.int32), axis=1, keepdims=True)
            col_sum = jnp.sum(b_s.astype(jnp.int32), axis=0, keepdims=True)
            part = part - a_zero * col_sum - b_zero * row_sum + count * a_zero * b_zero
        if cfg.groups == 1:
            total = total + part
        else:
            group = kk * cfg.subs + s
            total = total + part.astype(jnp.float32) * _column(a_scale, group) * _row(b_scale, group)
    return total


def finish(cfg: Config, acc, a_scale, b_scale):
    """Scaled float32 result; per-group scales were applied in `step` already."""
    if cfg.groups == 1:
        return acc.astype(jnp.float32) * a_scale[:, :1] * b_scale[:1, :]
    return acc
