"""Uniform quantisation of weight matrices: x_q = round(x / S) - Z, x ~= S * (x_q + Z).

A weight is a matrix [K, N] (K inputs, N outputs). Its scales S and zero points Z are [G, N]:
one per output column and group of K // G consecutive inputs (G = 1: per channel), or [1, 1]
for the whole tensor. Symmetric schemes have Z = 0 and use [-(2^(b-1) - 1), 2^(b-1) - 1];
asymmetric ones map [min, max] of a group onto the full [-2^(b-1), 2^(b-1) - 1]. Values are
stored in int8 whatever the bit width; `pack_int4` puts two 4-bit values in a byte.

Format "nf4" (QLoRA's 4-bit NormalFloat, Dettmers et al. 2023) replaces the uniform grid by
`NF4_LEVELS`, 16 quantiles of N(0, 1) scaled to [-1, 1]: x ~= S * NF4_LEVELS[x_q + 8] with S the
group's abs-max. Weights are roughly normal, so these levels waste fewer codes on the rare tails
than int4's evenly spaced ones. `double_quant` stores the scales S themselves in int8
(`quantize_scales`).
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np
from scipy.special import ndtri

FORMATS = ("int", "nf4")


def normal_float_levels(offset: float = 0.9677083) -> np.ndarray:
    """NF4's 16 levels (float64, ascending), built as bitsandbytes' `create_normal_map` does:
    quantiles of N(0, 1) at 8 evenly spaced probabilities from 0.5 up to `offset` on the positive
    side and 7 on the negative, and an exact 0, divided by the largest. The asymmetry spends the
    16th code on an exact zero (zero weights and padding stay zero); `offset` (~ 1 - (1/30 + 1/32) / 2)
    keeps the outermost quantile finite."""
    positive = ndtri(np.linspace(offset, 0.5, 9)[:-1])
    negative = -ndtri(np.linspace(offset, 0.5, 8)[:-1])
    levels = np.sort(np.concatenate([negative, [0.0], positive]))
    return levels / levels.max()


NF4_LEVELS = normal_float_levels()


@dataclasses.dataclass(frozen=True)
class Scheme:
    """`bits` 8 or 4; `symmetric` or with zero points; per output channel (group_size None), per
    `group_size` inputs, or `per_tensor`. `format` "int" (the uniform grid) or "nf4" (4-bit,
    symmetric, in groups); `double_quant` stores the group scales in int8 (needs groups)."""

    bits: int = 8
    symmetric: bool = True
    group_size: int | None = None
    per_tensor: bool = False
    format: str = "int"
    double_quant: bool = False

    def __post_init__(self):
        if self.bits not in (4, 8):
            raise ValueError(f"bits={self.bits!r}: only 8 and 4 are supported.")
        if self.group_size is not None and (not isinstance(self.group_size, int) or self.group_size < 1):
            raise ValueError(f"group_size={self.group_size!r} must be a positive int or None (per channel).")
        if self.per_tensor and self.group_size is not None:
            raise ValueError("per_tensor=True has one scale for the whole tensor; leave group_size=None.")
        if self.format not in FORMATS:
            raise ValueError(f"format={self.format!r} is not supported. Allowed values: {', '.join(FORMATS)}.")
        if self.format == "nf4" and (self.bits != 4 or not self.symmetric or self.group_size is None):
            raise ValueError(
                f"format='nf4' is 4-bit, symmetric (abs-max scaled) and in groups; got bits={self.bits}, "
                f"symmetric={self.symmetric}, group_size={self.group_size}."
            )
        if self.double_quant and self.group_size is None:
            raise ValueError("double_quant=True quantises the scales of groups; set a group_size.")

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
    the given range `lo`, `hi` (broadcastable to [G, N]; e.g. clipped by a search). With
    `double_quant` the scales are those their int8 codes give back, so that `quantize` rounds
    against the scales the stored layout holds."""
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
        scale = jnp.maximum(-lo, hi) / (1.0 if scheme.format == "nf4" else scheme.qmax)
    else:
        scale = (hi - lo) / (scheme.qmax - scheme.qmin)
    # A group of zeros gets scale 1 (any positive scale stores it exactly); double quantisation
    # gives it its column's smallest code instead, as 1 could dwarf the column's other scales.
    scale = dequantize_scales(*quantize_scales(scale)) if scheme.double_quant else jnp.where(scale > 0, scale, 1.0)
    scale = scale.astype(jnp.float32)
    if scheme.symmetric:
        return scale, jnp.zeros(shape, jnp.int32)
    return scale, jnp.round(lo / scale).astype(jnp.int32) - scheme.qmin


def _expand(x, k: int):
    """[G, N] (or [1, 1]) -> [K, N] by repeating each group's row."""
    return jnp.repeat(x, k // x.shape[0], axis=0)


def quantize(w, scale, zero, scheme: Scheme):
    """int8 [K, N] holding round(w / S) - Z, clipped to the scheme's range; for nf4, the index of
    the level nearest to w / S, minus 8 (so that `pack_int4` takes it), ties to the lower level."""
    w = jnp.asarray(w, jnp.float32)
    k = w.shape[0]
    if scheme.format == "nf4":
        midpoints = jnp.asarray((NF4_LEVELS[1:] + NF4_LEVELS[:-1]) / 2, jnp.float32)
        return (jnp.searchsorted(midpoints, w / _expand(scale, k)) - 8).astype(jnp.int8)
    q = jnp.round(w / _expand(scale, k)) - _expand(zero, k)
    return jnp.clip(q, scheme.qmin, scheme.qmax).astype(jnp.int8)


def dequantize(q, scale, zero=None, scheme: Scheme | None = None):
    """float32 [K, N]: S * (x_q + Z) (no Z: 0), or for nf4 S * NF4_LEVELS[x_q + 8]."""
    k = q.shape[0]
    if scheme is not None and scheme.format == "nf4":
        return _expand(scale, k) * jnp.asarray(NF4_LEVELS, jnp.float32)[jnp.asarray(q, jnp.int32) + 8]
    q = jnp.asarray(q, jnp.float32)
    return _expand(scale, k) * (q if zero is None else q + _expand(zero, k))


def quantize_scales(scale):
    """Double quantisation: (codes int8 [G, N], step float32 [1, N]) of positive scales [G, N], which
    come back as (codes + 128) * step (`dequantize_scales`).

    QLoRA stores its abs-max constants in 8-bit floats, in blocks of 256 minus their mean; our layout
    is per output column: its G group scales share one float32 step, the column's largest / 255, so
    the codes -127..127 are 255 even steps up to that largest (scales are positive: the sign bit
    buys precision). The smallest, one step, keeps every scale above zero. At 64 inputs a group
    this stores 8 / 64 + 32 / K bits per weight for the scales instead of 32 / 64."""
    scale = jnp.asarray(scale, jnp.float32)
    top = jnp.max(scale, axis=0, keepdims=True)
    step = jnp.where(top > 0, top / 255, 1.0)
    return jnp.clip(jnp.round(scale / step) - 128, -127, 127).astype(jnp.int8), step


def dequantize_scales(codes, step):
    """float32 [G, N] scales of int8 `codes` [G, N] and their column's `step` [1, N]."""
    return (jnp.asarray(codes, jnp.float32) + 128) * step


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
