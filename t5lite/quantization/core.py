"""Uniform quantisation of weight matrices: x_q = round(x / S) - Z, x ~= S * (x_q + Z).

A weight is a matrix [K, N] (K inputs, N outputs). Its scales S and zero points Z are [G, N]:
one per output column and group of K // G consecutive inputs (G = 1: per channel), or [1, 1]
for the whole tensor. Symmetric schemes have Z = 0 and use [-(2^(b-1) - 1), 2^(b-1) - 1];
asymmetric ones map [min, max] of a group onto the full [-2^(b-1), 2^(b-1) - 1]. Values are
stored in int8 whatever the bit width; `pack_int4` puts two 4-bit values in a byte.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class Scheme:
    """`bits` 8 or 4; `symmetric` or with zero points; per output channel (group_size None), per
    `group_size` inputs, or `per_tensor`."""

    bits: int = 8
    symmetric: bool = True
    group_size: int | None = None
    per_tensor: bool = False

    def __post_init__(self):
        if self.bits not in (4, 8):
            raise ValueError(f"bits={self.bits!r}: only 8 and 4 are supported.")
        if self.group_size is not None and (not isinstance(self.group_size, int) or self.group_size < 1):
            raise ValueError(f"group_size={self.group_size!r} must be a positive int or None (per channel).")
        if self.per_tensor and self.group_size is not None:
            raise ValueError("per_tensor=True has one scale for the whole tensor; leave group_size=None.")

    @property
    def qmin(self) -> int:
        return -(2 ** (self.bits - 1)) + (1 if self.symmetric else 0)

    @property
    def qmax(self) -> int:
        return 2 ** (self.bits - 1) - 1

    def groups(self, k: int) -> int:
        """Scale rows G for a matrix of K inputs."""
        if self.group_size is None:
            return 1
        if k % self.group_size:
            raise ValueError(f"group_size={self.group_size} does not divide the {k} inputs of the weight.")
        return k // self.group_size


def _grouped(w, groups: int):
    """[K, N] -> [G, K // G, N]."""
    return w.reshape(groups, w.shape[0] // groups, w.shape[1])


def fit(w, scheme: Scheme, lo=None, hi=None):
    """(scale [G, N] float32, zero [G, N] int32) covering the range of each group of `w` [K, N], or
    the given range `lo`, `hi` (broadcastable to [G, N]; e.g. clipped by a search)."""
    w = jnp.asarray(w, jnp.float32)
    if w.ndim != 2:
        raise ValueError(f"fit expects a weight matrix [K, N], got shape {w.shape}")
    axes = (0, 1, 2) if scheme.per_tensor else (1,)
    grouped = _grouped(w, scheme.groups(w.shape[0]))
    lo = jnp.min(grouped, axis=axes) if lo is None else lo
    hi = jnp.max(grouped, axis=axes) if hi is None else hi
    shape = (1, 1) if scheme.per_tensor else (grouped.shape[0], w.shape[1])
    lo, hi = jnp.broadcast_to(jnp.minimum(lo, 0.0), shape), jnp.broadcast_to(jnp.maximum(hi, 0.0), shape)
    if scheme.symmetric:
        scale = jnp.maximum(-lo, hi) / scheme.qmax
        zero = jnp.zeros(shape, jnp.int32)
    else:
        scale = (hi - lo) / (scheme.qmax - scheme.qmin)
        zero = jnp.round(lo / jnp.where(scale > 0, scale, 1.0)).astype(jnp.int32) - scheme.qmin
    return jnp.where(scale > 0, scale, 1.0).astype(jnp.float32), zero


def _expand(x, k: int):
    """[G, N] (or [1, 1]) -> [K, N] by repeating each group's row."""
    return jnp.repeat(x, k // x.shape[0], axis=0)


def quantize(w, scale, zero, scheme: Scheme):
    """int8 [K, N] holding round(w / S) - Z, clipped to the scheme's range."""
    w = jnp.asarray(w, jnp.float32)
    k = w.shape[0]
    q = jnp.round(w / _expand(scale, k)) - _expand(zero, k)
    return jnp.clip(q, scheme.qmin, scheme.qmax).astype(jnp.int8)


def dequantize(q, scale, zero):
    """float32 [K, N]: S * (x_q + Z)."""
    k = q.shape[0]
    return _expand(scale, k) * (jnp.asarray(q, jnp.float32) + _expand(zero, k))


def pack_int4(q):
    """int8 [K, N] of 4-bit values (-8..7) -> int8 [K // 2, N], rows 2i and 2i + 1 in one byte."""
    if q.shape[0] % 2:
        raise ValueError(f"int4 packing pairs rows; {q.shape[0]} is odd.")
    low, high = q[0::2].astype(jnp.uint8) & 0xF, q[1::2].astype(jnp.uint8) & 0xF
    return (low | (high << 4)).astype(jnp.int8)


def unpack_int4(packed):
    """Inverse of `pack_int4`, sign-extending each nibble."""
    byte = packed.astype(jnp.uint8)
    low, high = (byte & 0xF).astype(jnp.int8), (byte >> 4).astype(jnp.int8)
    low, high = jnp.where(low > 7, low - 16, low), jnp.where(high > 7, high - 16, high)
    return jnp.stack([low, high], axis=1).reshape(2 * packed.shape[0], packed.shape[1]).astype(jnp.int8)
